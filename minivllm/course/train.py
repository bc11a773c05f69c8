"""Train the course models from scratch on Python source code, on a CPU, offline once the corpus is built.

    python -m minivllm.course.train --out minivllm/course/models --minutes-target 46 --minutes-draft 9 --seed 0

(the budgets count training steps, the compile included; building the corpus -- a pip download of the
pinned wheels the first time -- the tokenizer, evaluations and sample completions add a few minutes).

writes ``<out>/target`` and ``<out>/draft`` (Qwen3s of the sizes in `SPECS`, the draft at most a quarter of
the target, same tokenizer), each a Hugging Face folder (config.json, generation_config.json,
model.safetensors in float16, tokenizer files with a ChatML chat template) plus a README.md model card;
``python -m minivllm.course.quality`` then adds the card's quality figures.

Corpus: `minivllm.course.corpus` (the standard library and the sources of pinned, permissively licensed
pure-Python packages, filtered, deduplicated, about 2% of the files held out).

Tokenizer: byte-level BPE (``tokenizers``, no normaliser, so indentation and every byte round-trip),
runs of newlines split off, then GPT-2's pre-tokenisation, 4096 ids including ``<|endoftext|>`` (EOS, between files),
``<|im_start|>`` and ``<|im_end|>``; trained on the training files only.

Training: plain torch AdamW (betas 0.9/0.95, weight decay 0.1 on matrices, gradient clipping at 1.0),
float32 weights and optimiser with the forward and backward passes in bfloat16 autocast where the
hardware computes bfloat16 natively (a GPU, or a CPU with AVX-512 BF16 / AMX: there the target's
steps ran 1.5-2.4x faster than in float32 on 2 cores; elsewhere autocast is slower than float32, so
``--bf16 auto`` keeps float32), windows of
``--context`` tokens cut from the token stream of all training files, reshuffled every epoch from the
seed. The learning rate warms up linearly, stays constant, then follows a cosine down to 10% over the
last 20% of the steps ("warmup-stable-decay"). With ``--minutes-*`` the decay starts once 80% of the
time budget is spent, so a run fits its budget even when the machine's speed changes under it; the
step count therefore depends on the machine, and the card records it: ``--steps-target N
--steps-draft M`` replays exactly that schedule (same seed -> same data order, same learning rates).
The training step is compiled with torch.compile (``--no-compile``: eager) under
``torch.use_deterministic_algorithms``, so a replay on the same CPU and software gives the same weights
bit for bit.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from minivllm.course.corpus import RULE, Corpus, collect_corpus

EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]
VOCAB_SIZE = 4096
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

SAMPLE_PROMPTS = ["def fibonacci(n):", "class Stack:", "import os\n", "for i in range("]


@dataclass(frozen=True)
class ModelSpec:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    lr: float
    description: str


SPECS = {
    "target": ModelSpec(384, 6, 6, 2, 1024, lr=2e-3, description="the course's main model"),
    "draft": ModelSpec(128, 3, 4, 2, 512, lr=3e-3,
                       description="a draft model for speculative decoding, same tokenizer as `target`"),
}


# -------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE with EOS and ChatML tokens, wrapped for ``AutoTokenizer.from_pretrained``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Newlines first, on their own: GPT-2's split alone glues a newline to the indentation after it
    # (":\n    " -> ":", "\n   ", " return"), so a prompt ending in ":\n" would end in a token that in
    # the corpus only ever precedes an unindented line, and the model would start a new top-level
    # statement. Then GPT-2's split: words and numbers with their leading space, punctuation runs,
    # whitespace runs; it keeps "):" apart from what follows, so a prompt that ends in ":" or "(" is
    # tokenised as the same text is in the corpus.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                   clean_up_tokenization_spaces=False, model_max_length=1024)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode(tokenizer, texts: list[str]) -> torch.Tensor:
    """One stream: every file's tokens followed by EOS."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# ------------------------------------------------------------------------------------------ model
def build_config(spec: ModelSpec, tokenizer, context: int):
    from transformers import Qwen3Config

    eos = tokenizer.convert_tokens_to_ids(EOS)
    return Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, head_dim=spec.hidden_size // spec.num_attention_heads,
        max_position_embeddings=max(1024, context), rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=None,
        eos_token_id=eos, pad_token_id=eos, attn_implementation="sdpa")


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() counts tied weights once


class Batches:
    """Windows of ``context + 1`` tokens (input and shifted target) in a seeded order: each epoch cuts
    the stream at a random offset into non-overlapping windows and visits them in a random order."""

    def __init__(self, ids: torch.Tensor, context: int, batch: int, seed: int):
        self.ids, self.context, self.batch = ids, context, batch
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch = -1
        self._new_epoch()

    def _new_epoch(self) -> None:
        self.epoch += 1
        offset = int(torch.randint(0, self.context, (1,), generator=self.gen))
        n = (len(self.ids) - offset - 1) // self.context
        self.starts = offset + torch.randperm(n, generator=self.gen) * self.context
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > len(self.starts):
            self._new_epoch()
        starts = self.starts[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return self.ids[starts[:, None] + torch.arange(self.context + 1)]


def val_windows(ids: torch.Tensor, context: int, max_tokens: int) -> torch.Tensor:
    n = min((len(ids) - 1) // context, max(1, max_tokens // context))
    return torch.stack([ids[i * context:i * context + context + 1] for i in range(n)])


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, device, batch: int = 8) -> float:
    """Mean next-token cross-entropy (nats) over the windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch].to(device)
        logits = model(input_ids=w[:, :-1]).logits.float()
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    model.train()
    return total / count


class Schedule:
    """Warmup-stable-decay. ``steps`` given: decay over the last 20%. Otherwise the decay starts when
    ``start_decay(step)`` is called (80% of the time budget) and lasts a quarter of the steps so far;
    ``total = ceil(5 * S / 4)`` so that ``Schedule(steps=total)`` decays from the same step S."""

    def __init__(self, peak: float, warmup: int, steps: int | None):
        self.peak, self.warmup, self.total = peak, warmup, steps
        self.decay_start = None if steps is None else (4 * steps) // 5

    def start_decay(self, step: int) -> None:
        self.decay_start, self.total = step, (5 * step + 3) // 4

    def lr(self, step: int) -> float:
        lr = self.peak * min(1.0, (step + 1) / self.warmup)
        if self.decay_start is not None and step >= self.decay_start and self.total > self.decay_start:
            progress = (step - self.decay_start) / (self.total - self.decay_start)
            lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return lr

    def done(self, step: int) -> bool:
        return self.total is not None and step >= self.total


@dataclass
class TrainStats:
    name: str
    params: int
    steps: int = 0
    tokens_seen: int = 0
    epochs: float = 0.0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    tokens_per_second: float = 0.0  # over all steps, the first (torch.compile) included
    steady_tokens_per_second: float = 0.0  # after the first step
    final_train_loss: float = float("nan")
    val_loss: float = float("nan")  # with the float16 weights that ship
    val_tokens: int = 0
    val_bits_per_char: float = float("nan")
    history: list = field(default_factory=list)  # (step, tokens, lr, train loss, val loss or None)
    compiled: bool = False
    bf16: bool = False  # forward and backward in bfloat16 autocast


def train_model(name: str, spec: ModelSpec, tokenizer, train_ids: torch.Tensor, val_ids: torch.Tensor, *,
                minutes: float | None, steps: int | None, seed: int, context: int, batch: int, device: str,
                compile: bool, bf16: bool, warmup: int, eval_every: int, val_tokens: int):
    from transformers import Qwen3ForCausalLM

    wall0 = time.perf_counter()
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(build_config(spec, tokenizer, context)).to(device)
    stats = TrainStats(name, count_params(model), bf16=bf16)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=spec.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    schedule = Schedule(spec.lr, warmup, steps)
    data = Batches(train_ids, context, batch, seed)
    quick_val = val_windows(val_ids, context, 8 * context)
    full_val = val_windows(val_ids, context, val_tokens)

    def loss_fn(x):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=x[:, :-1]).logits.float()
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())

    step_loss = loss_fn
    if compile:
        step_loss = torch.compile(loss_fn, dynamic=False)
        stats.compiled = True
    budget = None if minutes is None else minutes * 60.0
    print(f"[{name}] {stats.params / 1e6:.2f} M parameters, {spec}; "
          + (f"{steps} steps" if steps else f"{minutes} minutes"), flush=True)
    train_time, step, ema, last_log = 0.0, 0, None, time.perf_counter()
    model.train()
    while not schedule.done(step):
        t0 = time.perf_counter()
        lr = schedule.lr(step)
        for g in opt.param_groups:
            g["lr"] = lr
        x = data.next().to(device)
        try:
            loss = step_loss(x)
            loss.backward()
        except Exception as e:  # torch.compile needs a working C++ compiler on the CPU
            if not stats.compiled or step > 0:
                raise
            print(f"[{name}] torch.compile failed ({type(e).__name__}: {str(e)[:200]}); training eagerly", flush=True)
            step_loss, stats.compiled = loss_fn, False
            opt.zero_grad(set_to_none=True)
            loss = step_loss(x)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
        train_time += time.perf_counter() - t0
        step += 1
        if step == 1:
            first_step_time = train_time
        stats.tokens_seen += x[:, 1:].numel()
        ema = loss_value if ema is None else 0.95 * ema + 0.05 * loss_value
        if budget is not None and schedule.decay_start is None and train_time >= 0.8 * budget:
            schedule.start_decay(step)
            print(f"[{name}] 80% of the budget spent at step {step}: decaying until step {schedule.total}",
                  flush=True)
        val = None
        if step % eval_every == 0:
            val = evaluate(model, quick_val, device)
        stats.history.append((step, stats.tokens_seen, lr, loss_value, val))
        if val is not None or time.perf_counter() - last_log > 30 or schedule.done(step):
            last_log = time.perf_counter()
            print(f"[{name}] step {step}{'/' + str(schedule.total) if schedule.total else ''} "
                  f"tokens {stats.tokens_seen:,} lr {lr:.2e} loss {ema:.3f}"
                  + (f" val {val:.3f}" if val is not None else "")
                  + f" | {stats.tokens_seen / train_time:.0f} tok/s, {train_time / 60:.1f} min", flush=True)
    stats.steps, stats.train_seconds = step, train_time
    stats.tokens_per_second = stats.tokens_seen / train_time
    if step > 1:
        stats.steady_tokens_per_second = stats.tokens_seen * (step - 1) / step / (train_time - first_step_time)
    stats.epochs = stats.tokens_seen / len(train_ids)
    stats.final_train_loss = ema
    model = model.to(torch.float16).to(torch.float32)  # evaluate what ships: float16 weights
    stats.val_loss = evaluate(model, full_val, device)
    stats.val_tokens = full_val[:, 1:].numel()
    # the windows tile the stream, so their targets are ids[1 : n * context + 1]
    val_chars = len(tokenizer.decode(val_ids[1:stats.val_tokens + 1].tolist(), skip_special_tokens=True))
    stats.val_bits_per_char = stats.val_loss * stats.val_tokens / math.log(2) / val_chars
    stats.wall_seconds = time.perf_counter() - wall0
    print(f"[{name}] done: {step} steps, {stats.tokens_seen:,} tokens in {train_time / 60:.1f} min "
          f"({stats.tokens_per_second:.0f} tok/s, {stats.steady_tokens_per_second:.0f} after step 1); "
          f"val loss {stats.val_loss:.3f}", flush=True)
    return model, stats


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes bfloat16 natively, so that autocast speeds training up."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    return kind == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# ------------------------------------------------------------------------------------------ output
def save_model(folder: str, model, tokenizer) -> None:
    from transformers import GenerationConfig

    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    eos, im_end = tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(IM_END)
    model = model.to("cpu", torch.float16)
    model.generation_config = GenerationConfig(eos_token_id=[eos, im_end], pad_token_id=eos)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # transformers 5 writes its own class name; the portable one also loads with transformers 4.x
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        tok_cfg = json.load(f)
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as f:
        json.dump(tok_cfg, f, indent=2)


def sample_completions(folder: str, max_tokens: int = 64) -> list[tuple[str, str, str]]:
    """(prompt, greedy completion, sampled completion) from minivllm itself, as learners will see them."""
    from minivllm import LLM, SamplingParams

    llm = LLM(folder, device="cpu", seed=0, num_kv_blocks=256)  # float32, as learners run it
    greedy = llm.generate(SAMPLE_PROMPTS, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    sampled = llm.generate(SAMPLE_PROMPTS, SamplingParams(temperature=0.8, top_p=0.95, max_tokens=max_tokens,
                                                         seed=0), use_tqdm=False)
    return [(p, g.outputs[0].text, s.outputs[0].text) for p, g, s in zip(SAMPLE_PROMPTS, greedy, sampled)]


def write_card(folder: str, spec: ModelSpec, stats: TrainStats, corpus_info: dict, train_info: dict,
               samples: list[tuple[str, str, str]]) -> None:
    cfg = json.load(open(os.path.join(folder, "config.json")))
    size = os.path.getsize(os.path.join(folder, "model.safetensors"))
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [minivllm, course, qwen3]",
        "---", "",
        f"# minivllm course model: `{stats.name}`", "",
        f"A {stats.params / 1e6:.2f} M-parameter Qwen3 trained from scratch on a CPU, {spec.description}. "
        "It is a base model that continues Python source code; it has a ChatML chat template for the API's "
        "sake but was never trained on conversations. Load it with "
        f"`LLM(minivllm.course.model_path(\"{stats.name}\"))` or `AutoModelForCausalLM.from_pretrained(folder)`.",
        "", "## Model", "",
        "| | |", "| --- | --- |",
        f"| architecture | Qwen3ForCausalLM, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
        f"MLP {cfg['intermediate_size']}, {cfg['num_attention_heads']} query heads / {cfg['num_key_value_heads']} "
        f"KV heads of {cfg['head_dim']}, tied embeddings, RoPE theta 10000 |",
        f"| parameters | {stats.params:,} (embedding {cfg['vocab_size'] * cfg['hidden_size']:,}) |",
        f"| vocabulary | {cfg['vocab_size']} (byte-level BPE; `<|endoftext|>` = EOS, `<|im_start|>`, `<|im_end|>`) |",
        f"| context | trained on {train_info['context']}-token windows; max_position_embeddings "
        f"{cfg['max_position_embeddings']} (quality degrades past {train_info['context']}) |",
        f"| weights | float16 safetensors, {size / 1e6:.1f} MB |",
        "", "## Training data", "",
        "The `.py` files of the Python standard library and of pinned, permissively licensed pure-Python "
        "packages (each its `py3-none-any` wheel from PyPI), built by `minivllm.course.corpus`. Left out: "
        + RULE, "",
        "| source | version | licence | wheel SHA-256 | train files | train characters | validation files |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
        *corpus_info["sources"], "",
        "| | train | validation |", "| --- | --- | --- |",
        f"| files | {corpus_info['train_files']:,} | {corpus_info['val_files']:,} |",
        f"| characters | {corpus_info['train_chars']:,} | {corpus_info['val_chars']:,} |",
        f"| tokens | {corpus_info['train_tokens']:,} | {corpus_info['val_tokens']:,} |",
        "",
        f"Files left out: {corpus_info['skipped_summary']}.",
        "", "## Training", "",
        "| | |", "| --- | --- |",
        f"| steps | {stats.steps:,} of {train_info['batch']} x {train_info['context']} tokens |",
        f"| tokens seen | {stats.tokens_seen:,} ({stats.epochs:.2f} epochs) |",
        f"| optimiser | AdamW, peak lr {spec.lr:g}, betas (0.9, 0.95), weight decay 0.1, clip 1.0; "
        f"{train_info['warmup']} warmup steps, constant, cosine to 10% over the last 20% of steps |",
        f"| precision | float32 weights and AdamW{', bfloat16 autocast' if stats.bf16 else ', float32 compute'}"
        f"{' (torch.compile)' if stats.compiled else ''}; weights stored as float16 |",
        f"| wall time | {stats.wall_seconds / 60:.1f} min for this model ({stats.train_seconds / 60:.1f} min of "
        f"training steps: {stats.tokens_per_second:.0f} tokens/s, {stats.steady_tokens_per_second:.0f} after the "
        f"first step{' and its compile' if stats.compiled else ''}) |",
        f"| machine | {train_info['machine']} |",
        f"| software | Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{train_info['transformers']}, tokenizers {train_info['tokenizers']} |",
        f"| validation loss | {stats.val_loss:.3f} nats/token ({stats.val_bits_per_char:.3f} bits/character) "
        f"on the first {stats.val_tokens:,} held-out tokens, with the float16 weights that ship |",
        f"| final training loss | {stats.final_train_loss:.3f} (moving average) |",
        "",
        f"What bounds it: {stats.tokens_seen / 1e6:.1f} M tokens seen is {stats.tokens_seen / stats.params:.1f} per "
        "parameter, short of the ~20 that compute-optimal training (Hoffmann et al., 2022) gives a model this size, "
        f"and {stats.epochs:.2f} passes over the corpus (repeating data costs little up to about four passes, "
        "Muennighoff et al., 2023): on a CPU the time budget binds, not the data. The run's arithmetic "
        f"(6 x parameters x tokens = {6 * stats.params * stats.tokens_seen / 1e15:.2f} PFLOP) takes a GPU seconds "
        "to minutes, so there the corpus would bind instead: a 30 M-parameter target would want about 600 M tokens, "
        f"some {600e6 / corpus_info['train_tokens']:.0f} passes over this corpus, and a GPU run would first grow the "
        "corpus (more packages, the Python documentation).", "",
        "Reproduce (the command that made these weights, then the exact replay of its step counts):", "",
        "```bash", train_info["command"], train_info["replay"], "```", "",
        "The run was budgeted in wall time, so its step count depends on the machine (and on anything "
        "else running on it). The same seed and step counts give the same data order and learning rates, "
        "and on the same CPU and software the same weights bit for bit (deterministic kernels); other "
        "machines agree up to floating-point rounding.",
        "", "## Sample completions", "",
        "Generated by minivllm (`LLM(folder)`, float32 on the CPU), 64 new tokens at most; greedy, then "
        "sampled with `temperature=0.8, top_p=0.95, seed=0`.", ""]
    for prompt, greedy, sampled in samples:
        for kind, text in (("greedy", greedy), ("sampled", sampled)):
            lines += [f"`{prompt!r}`, {kind}:", "", "```python", (prompt + text).replace("```", "'''"), "```", ""]
    lines += ["## Loss curve", "", "| step | tokens | lr | train loss | val loss (8 windows) |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    for step, tokens, lr, loss, val in stats.history:
        if val is not None or step == stats.steps:
            lines.append(f"| {step} | {tokens:,} | {lr:.2e} | {loss:.3f} | {'' if val is None else f'{val:.3f}'} |")
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def source_rows(corpus: Corpus) -> list[str]:
    """The card's table rows: one per source of the corpus."""
    train, val = corpus.by_source("train"), corpus.by_source("val")
    rows = []
    for s in corpus.sources:
        (files, chars), (val_files, _) = train.get(s.name, (0, 0)), val.get(s.name, (0, 0))
        rows.append(f"| {s.name} | {s.version} | {s.licence} | {s.sha256[:12] or '-'} | {files:,} | {chars:,} | "
                    f"{val_files:,} |")
    return rows


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


# -------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder that receives target/ and draft/")
    parser.add_argument("--cache", default="~/.cache/minivllm/corpus", help="where the corpus wheels are kept")
    parser.add_argument("--minutes-target", type=float, default=46.0, help="training-step budget (default 46)")
    parser.add_argument("--minutes-draft", type=float, default=9.0, help="training-step budget (default 9)")
    parser.add_argument("--steps-target", type=int, default=None, help="exact step count (overrides minutes)")
    parser.add_argument("--steps-draft", type=int, default=None, help="exact step count (overrides minutes)")
    parser.add_argument("--models", default="target,draft", help="which to train (default both)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4, help="windows per step")
    parser.add_argument("--warmup", type=int, default=50, help="warmup steps")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between quick validation checks")
    parser.add_argument("--val-tokens", type=int, default=32768, help="held-out tokens in the final validation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile the training step: on 2 CPU cores 1.1x (target) and 1.4x (draft) "
                             "faster after a compile of up to a minute; falls back to eager if it fails "
                             "(default on)")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="bfloat16 autocast for the forward and backward passes; auto: where the device "
                             "computes bfloat16 natively (a GPU, a CPU with AVX-512 BF16 or AMX)")
    args = parser.parse_args(argv)
    bf16 = args.bf16 == "on" or args.bf16 == "auto" and native_bf16(args.device)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if not names or any(n not in SPECS for n in names):
        parser.error(f"--models {args.models!r}: choose from {', '.join(SPECS)}")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    # Deterministic kernels: without this, torch.compile's CPU kernels give weights that differ in the
    # last bits from run to run; with it, a replay is bit for bit (eager CPU training is either way).
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    t_start = time.perf_counter()

    corpus = collect_corpus(args.cache)
    print(f"corpus: {len(corpus.sources)} sources, {len(corpus.train)} train files ({corpus.chars('train'):,} chars), "
          f"{len(corpus.val)} validation files ({corpus.chars('val'):,} chars); left out: "
          + ", ".join(f"{k}: {len(v)}" for k, v in corpus.skipped.items()), flush=True)
    t0 = time.perf_counter()
    tokenizer = train_tokenizer([t for _, t in corpus.train])
    backend = tokenizer.backend_tokenizer
    for rel, text in corpus.val:
        if backend.decode(backend.encode(text, add_special_tokens=False).ids) != text:
            raise RuntimeError(f"tokenizer does not round-trip {rel}")
    train_ids = encode(tokenizer, [t for _, t in corpus.train])
    val_ids = encode(tokenizer, [t for _, t in corpus.val])
    print(f"tokenizer: {len(tokenizer)} ids in {time.perf_counter() - t0:.0f} s; train {len(train_ids):,} tokens "
          f"({corpus.chars('train') / len(train_ids):.2f} chars/token), validation {len(val_ids):,} tokens", flush=True)

    import tokenizers
    import transformers
    corpus_info = dict(
        sources=source_rows(corpus), train_files=len(corpus.train), val_files=len(corpus.val),
        train_chars=corpus.chars("train"), val_chars=corpus.chars("val"), train_tokens=len(train_ids),
        val_tokens=len(val_ids), skipped_summary="; ".join(
            f"{reason}: {len(v)} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
            for reason, v in corpus.skipped.items()))

    results = {}
    for name in names:
        minutes = getattr(args, f"minutes_{name}")
        steps = getattr(args, f"steps_{name}")
        model, stats = train_model(
            name, SPECS[name], tokenizer, train_ids, val_ids, minutes=None if steps else minutes, steps=steps,
            seed=args.seed, context=args.context, batch=args.batch, device=args.device, compile=args.compile, bf16=bf16,
            warmup=args.warmup, eval_every=args.eval_every, val_tokens=args.val_tokens)
        t0 = time.perf_counter()
        folder = os.path.join(args.out, name)
        save_model(folder, model, tokenizer)
        del model
        samples = sample_completions(folder)
        stats.wall_seconds += time.perf_counter() - t0
        results[name] = (stats, samples)

    common = (f"python -m minivllm.course.train --out {args.out} --seed {args.seed} --context {args.context} "
              f"--batch {args.batch} --warmup {args.warmup} --bf16 {'on' if bf16 else 'off'}"
              + ("" if args.compile else " --no-compile"))
    budget = " ".join(f"--steps-{n} {getattr(args, f'steps_{n}')}" if getattr(args, f"steps_{n}")
                      else f"--minutes-{n} {getattr(args, f'minutes_{n}'):g}" for n in names)
    replay = " ".join(f"--steps-{n} {results[n][0].steps}" for n in names)
    models_flag = "" if names == list(SPECS) else f" --models {','.join(names)}"
    train_info = dict(context=args.context, batch=args.batch, warmup=args.warmup, machine=_machine(),
                      transformers=transformers.__version__, tokenizers=tokenizers.__version__,
                      command=f"{common}{models_flag} {budget}", replay=f"{common}{models_flag} {replay}")
    for name, (stats, samples) in results.items():
        folder = os.path.join(args.out, name)
        write_card(folder, SPECS[name], stats, corpus_info, train_info, samples)
        print(f"[{name}] wrote {folder} ({stats.params / 1e6:.2f} M parameters, val loss {stats.val_loss:.3f})")
        for prompt, greedy, _ in samples:
            print(f"--- {prompt!r} (greedy)\n{prompt}{greedy}")
    summary = {n: {k: v for k, v in asdict(s).items() if k != "history"} for n, (s, _) in results.items()}
    print(json.dumps(summary, indent=1))
    print(f"total wall time {(time.perf_counter() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main(sys.argv[1:])
