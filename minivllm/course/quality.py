"""How well a course model pair writes Python, measured on held-out files of the training corpus.

    python -m minivllm.course.quality --pair before=/tmp/old_models --pair after=minivllm/course/models
        [--cache ~/.cache/minivllm/corpus] [--card minivllm/course/models/target/README.md]

For each pair (a folder holding ``target/`` and ``draft/``):
  * validation loss: the target's mean next-token cross-entropy (nats/token) on evenly spaced
    ``--context``-token windows of the held-out files, and the same in bits per character of the text
    those windows predict, which compares models whose tokenizers differ;
  * for ``--prompts`` (30) top-level function and class headers taken evenly from the held-out files, the
    target's greedy ``--max-tokens`` (64)-token completions in minivllm:
      - parses: the header and completion, cut to the last complete line, parse with `ast`;
      - free of degenerate repetition: no token 4-gram occurs more than 3 times in the completion;
  * acceptance: the share of the draft's proposals (k = ``--k``, greedy) the target accepts on the
    same prompts, in minivllm's speculative decoder;
  * beside them, the same two completion figures for what follows each header in its own file (the
    ceiling: a completion is cut mid-docstring or mid-call as often as real code is).
With ``--card`` the table replaces the card's "## Quality" section (or is appended).
"""
from __future__ import annotations

import argparse
import ast
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import asdict, dataclass

HEADER = re.compile(r"^(?:async def|def|class) \w+.*:[ \t]*$")
QUALITY_SECTION = "## Quality"


@dataclass(frozen=True)
class Quality:
    val_loss: float  # nats per target token
    val_bits_per_char: float
    val_tokens: int
    parse_share: float
    non_repetitive_share: float
    acceptance_rate: float
    num_prompts: int


# ------------------------------------------------------------------------------------- the metrics
def cut_to_complete_lines(text: str, finished: bool) -> str:
    """``text`` up to its last newline, unless generation ``finished`` on its own (then all of it)."""
    return text if finished else text[:text.rfind("\n") + 1]


def parses(source: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SyntaxWarning for odd escapes in generated strings
        try:
            ast.parse(source)
            return True
        except (SyntaxError, ValueError):  # ValueError: a NUL byte
            return False


def is_degenerate(token_ids: list[int], n: int = 4, max_repeats: int = 3) -> bool:
    """Whether some ``n``-gram of ``token_ids`` occurs more than ``max_repeats`` times."""
    grams = Counter(tuple(token_ids[i:i + n]) for i in range(len(token_ids) - n + 1))
    return any(count > max_repeats for count in grams.values())


def header_prompts(files: list[tuple[str, str]], count: int) -> list[str]:
    """``count`` distinct one-line top-level ``def``/``class`` headers, spread evenly over ``files``
    (in order), each ending at its colon."""
    headers = list(dict.fromkeys(line.rstrip() for _, text in files for line in text.splitlines()
                                 if HEADER.match(line)))
    if len(headers) < count:
        raise ValueError(f"count={count!r}: the files hold only {len(headers)} headers")
    return [headers[i * len(headers) // count] for i in range(count)]


# ----------------------------------------------------------------------------------------- running
def validation_loss(folder: str, texts: list[str], context: int, num_windows: int) -> tuple[float, float, int]:
    """(nats/token, bits/character, tokens) of the model in ``folder`` on ``num_windows`` evenly spaced
    windows of the token stream of ``texts``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minivllm.course.train import encode, evaluate

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = encode(tokenizer, texts)
    total = (len(ids) - 1) // context
    starts = [i * total // num_windows * context for i in range(min(num_windows, total))]
    windows = torch.stack([ids[s:s + context + 1] for s in starts])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    loss = evaluate(model, windows, "cpu")
    tokens = windows[:, 1:].numel()
    chars = sum(len(tokenizer.decode(w[1:].tolist(), skip_special_tokens=True)) for w in windows)
    return loss, loss * tokens / math.log(2) / chars, tokens


def reference(val_files: list[tuple[str, str]], headers: list[str], tokenizer_folder: str,
              max_tokens: int = 64) -> tuple[float, float]:
    """(parse share, repetition-free share) of what follows each header in its own file, cut to
    ``max_tokens`` tokens as a completion is: the scores a model that wrote the held-out code would get."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    parsed = clean = 0
    for header in headers:
        line = re.compile(rf"^{re.escape(header)}[ \t]*$", re.M)
        found = next(m for _, text in val_files if (m := line.search(text)))
        after = found.string[found.end():found.end() + 32 * max_tokens]  # more than max_tokens tokens hold
        ids = tokenizer.encode(after, add_special_tokens=False)[:max_tokens]
        parsed += parses(cut_to_complete_lines(header + tokenizer.decode(ids), len(ids) < max_tokens))
        clean += not is_degenerate(ids)
    return parsed / len(headers), clean / len(headers)


def measure(pair: str, val_files: list[tuple[str, str]], headers: list[str], *, max_tokens: int = 64, k: int = 4,
            context: int = 512, num_windows: int = 64) -> Quality:
    from minivllm import LLM, SamplingParams
    from minivllm.benchmarks.spec_decode import summed

    target, draft = os.path.join(pair, "target"), os.path.join(pair, "draft")
    loss, bits, tokens = validation_loss(target, [t for _, t in val_files], context, num_windows)
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outs = LLM(target, device="cpu", num_kv_blocks=512).generate(headers, greedy, use_tqdm=False)
    completions = [o.outputs[0] for o in outs]
    parsed = sum(parses(cut_to_complete_lines(h + c.text, c.finish_reason == "stop"))
                 for h, c in zip(headers, completions))
    repetitive = sum(is_degenerate(list(c.token_ids)) for c in completions)
    spec = LLM(target, device="cpu", num_kv_blocks=512, speculative_config={
        "method": "draft_model", "model": draft, "num_speculative_tokens": k})
    metrics = summed(spec.generate(headers, greedy, use_tqdm=False))
    n = len(headers)
    return Quality(loss, bits, tokens, parsed / n, 1 - repetitive / n, metrics.acceptance_rate, n)


def table(results: dict[str, Quality], k: int, ceiling: tuple[float, float]) -> list[str]:
    """Markdown rows, one column per pair and a last one for the held-out code itself (``ceiling``)."""
    n = next(iter(results.values())).num_prompts
    rows = [("validation loss, nats/token (own tokenizer)", lambda q: f"{q.val_loss:.3f}", ""),
            ("validation loss, bits/character", lambda q: f"{q.val_bits_per_char:.3f}", ""),
            (f"greedy completions of {n} held-out headers that parse", lambda q: f"{q.parse_share:.0%}",
             f"{ceiling[0]:.0%}"),
            ("... free of degenerate repetition", lambda q: f"{q.non_repetitive_share:.0%}", f"{ceiling[1]:.0%}"),
            (f"draft acceptance rate (k = {k}, greedy, same headers)", lambda q: f"{q.acceptance_rate:.0%}", "")]
    lines = ["| | " + " | ".join(results) + " | the held-out code itself |",
             "| --- |" + " ---: |" * (len(results) + 1)]
    lines += [f"| {label} | " + " | ".join(fmt(q) for q in results.values()) + f" | {own} |"
              for label, fmt, own in rows]
    return lines


def write_card_section(card: str, lines: list[str]) -> None:
    with open(card) as f:
        text = f.read()
    start = text.find(QUALITY_SECTION)
    if start >= 0:
        end = text.find("\n## ", start + len(QUALITY_SECTION))
        text = text[:start] + (text[end + 1:] if end >= 0 else "")
    with open(card, "w") as f:
        f.write(text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    import torch

    from minivllm.course.corpus import collect_corpus

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", action="append", required=True, metavar="LABEL=DIR",
                        help="a folder with target/ and draft/ (repeat to compare)")
    parser.add_argument("--cache", default="~/.cache/minivllm/corpus", help="where the corpus wheels are kept")
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--card", help="a model card whose Quality section receives the table")
    args = parser.parse_args(argv)
    pairs = dict(p.split("=", 1) for p in args.pair)
    torch.set_num_threads(args.threads)
    val = collect_corpus(args.cache).val
    headers = header_prompts(val, args.prompts)
    results = {}
    for label, folder in pairs.items():
        results[label] = measure(folder, val, headers, max_tokens=args.max_tokens, k=args.k)
        print(label, asdict(results[label]), flush=True)
    ceiling = reference(val, headers, os.path.join(list(pairs.values())[-1], "target"), args.max_tokens)
    lines = table(results, args.k, ceiling)
    print("\n".join(lines))
    if args.card:
        write_card_section(args.card, [
            QUALITY_SECTION, "", f"Measured by `python -m minivllm.course.quality` on the {len(val)} held-out files "
            f"of the corpus (validation loss on evenly spaced 512-token windows; completions of at most "
            f"{args.max_tokens} tokens by minivllm, float32 on the CPU). The last column scores what follows each "
            f"header in its own file, cut to {args.max_tokens} tokens of the last pair's tokenizer: the ceiling of "
            "the two completion figures.", "", *lines])


if __name__ == "__main__":
    main()
