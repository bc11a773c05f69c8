"""Qwen3-MoE: a tiny checkpoint built with transformers' Qwen3MoeConfig. Routing and the MoE block
match transformers; greedy tokens match in one process, with tensor parallel (every expert split)
and with expert parallel (whole experts per rank); expert parallel loads only a rank's experts."""
from __future__ import annotations

import pytest
import torch

from minivllm import LLM, SamplingParams
from minivllm.config.model import ModelConfig
from minivllm.models.loader import load_weights
from minivllm.models.moe import Expert
from minivllm.models.registry import build_model
from tests.reference import compare_greedy

PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 40)), [3] * 9, [200, 17]]
MAX_TOKENS = [6, 4, 8, 5]


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory) -> str:
    """4 experts, 2 per token, renormalised; layer 1 of 3 keeps a dense MLP (mlp_only_layers)."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from minivllm.models.tiny import build_tokenizer

    folder = str(tmp_path_factory.mktemp("tiny-qwen3-moe"))
    tokenizer = build_tokenizer(384)
    cfg = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
                         max_position_embeddings=1024, initializer_range=0.3, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def generate(llm: LLM):
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    return llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)


def test_moe_block_matches_transformers(moe_checkpoint, reference):
    hf_layer = reference(moe_checkpoint).model.model.layers[0].mlp
    mc = ModelConfig.from_folder(moe_checkpoint)
    model = build_model(mc)
    load_weights(model, moe_checkpoint)
    x = torch.randn(37, mc.hidden_size)
    with torch.inference_mode():
        expected = hf_layer(x[None])[0]
        got = model.model.layers[0].mlp(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert type(model.model.layers[1].mlp).__name__ == "DecoderMLP", "mlp_only_layers keep a dense MLP"


def test_expert_parallel_rank_loads_only_its_experts(moe_checkpoint):
    from safetensors.torch import load_file

    mc = ModelConfig.from_folder(moe_checkpoint)
    model = build_model(mc, tp_rank=1, tp_size=2, expert_parallel=True)
    load_weights(model, moe_checkpoint)
    experts = model.model.layers[2].mlp.experts
    assert [isinstance(e, Expert) for e in experts] == [False, False, True, True]
    full = load_file(f"{moe_checkpoint}/model.safetensors")
    torch.testing.assert_close(experts[3].down_proj.weight, full["model.layers.2.mlp.experts.3.down_proj.weight"])
    # attention stays tensor-parallel: rank 1 holds query heads 2 and 3
    q = full["model.layers.2.self_attn.q_proj.weight"]
    torch.testing.assert_close(model.model.layers[2].self_attn.qkv_proj.weight[:32], q[32:])


@pytest.mark.parametrize("parallel", [{}, {"tensor_parallel_size": 2},
                                      {"tensor_parallel_size": 2, "enable_expert_parallel": True}],
                         ids=["single", "tp2", "ep2"])
def test_moe_greedy_matches_transformers(parallel, moe_checkpoint, reference):
    with LLM(moe_checkpoint, **parallel) as llm:
        outputs = generate(llm)
        trace = llm.llm_engine.trace
    compare_greedy(outputs, PROMPTS, MAX_TOKENS, reference(moe_checkpoint), max_ties=0)
    if parallel:  # one all-reduce per attention and per MLP, MoE or dense, plus the embedding's
        for record in trace:
            for rank in record.comm:
                assert rank.calls("all_reduce") == 2 * 3 + 1
                assert rank.bytes("all_reduce") == 7 * record.num_batched_tokens * 64 * 4


def test_expert_parallel_refuses_what_it_cannot_split(moe_checkpoint, checkpoint):
    with pytest.raises(ValueError, match="tensor_parallel_size=8 does not divide num_attention_heads"):
        LLM(moe_checkpoint, tensor_parallel_size=8, enable_expert_parallel=True)
    with pytest.raises(ValueError, match="enable_expert_parallel=True but Qwen3ForCausalLM has no experts"):
        LLM(checkpoint("qwen3"), tensor_parallel_size=2, enable_expert_parallel=True)
