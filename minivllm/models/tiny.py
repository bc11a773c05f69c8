"""Build tiny random Hugging Face checkpoints (Qwen3, Qwen2, Llama) offline.

Tests and benchmarks use them instead of downloading weights: ``transformers`` builds the model from
a config and ``save_pretrained`` writes a real checkpoint folder, tokenizer included. A larger-than-
usual init scale makes the logits decisive, so greedy decoding rarely meets a near-tie.

    python -m minivllm.models.tiny FOLDER [--arch qwen3|qwen2|llama]
"""
from __future__ import annotations

import argparse
import random

ARCHS = ("qwen3", "qwen2", "llama")
_WORDS = ("the engine schedules every request in small steps while the cache keeps keys and values "
          "in blocks def class return import for while if else self token batch prefill decode block "
          "page table prefix hash scheduler sampler kernel attention layer model python print list "
          "dict value key query head rotary norm").split()


def build_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE tokenizer trained on a fixed pseudo-random word corpus, with an EOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(_WORDS) for _ in range(40)) for _ in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def tiny_config(arch: str = "qwen3", **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} must be one of {ARCHS}")
    cls = {"qwen3": Qwen3Config, "qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    kwargs = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                  rms_norm_eps=1e-6, tie_word_embeddings=arch == "qwen3", initializer_range=0.3)
    kwargs.update(overrides)
    return cls(**kwargs)


def save_tiny_checkpoint(folder: str, arch: str = "qwen3", seed: int = 0, dtype=None, **overrides) -> str:
    """Write a random tiny ``arch`` checkpoint (config, safetensors, tokenizer) to ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    cfg = tiny_config(arch, **overrides)
    tokenizer = build_tokenizer(cfg.vocab_size, seed)
    cfg.vocab_size = len(tokenizer)  # every id the model can emit decodes to text
    cfg.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar (a widget in notebooks)
    try:
        model.save_pretrained(folder)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--arch", default="qwen3", choices=ARCHS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(save_tiny_checkpoint(args.folder, args.arch, args.seed))


if __name__ == "__main__":
    main()
