"""Structured output: what a JSON-schema constraint adds to each decode step, on the course target.

The same batch (1 and 32 requests, the same prompts, greedy) decodes twice, unconstrained and
constrained by a JSON schema, the two runs alternating in one process ``--repeats`` times. Every
request emits exactly ``--tokens`` tokens (the schema's shortest document is far longer, and the
unconstrained run ignores EOS), so every step timed decodes the whole batch; the first ``--skip``
decode steps of each run are left out. Printed per batch size: the mean milliseconds per decode step
both ways, their difference and ratio, and the time spent inside
``StructuredOutputManager.attach_masks`` (xgrammar fills each request's token bitmask) plus
``accept`` (it advances each request's matcher) per step: the grammar's own CPU work. The rest of
the difference is applying the masks to the logits.

    python -m minivllm.benchmarks.structured_output [--batch-sizes 1 32] [--tokens 64] [--skip 4]
        [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import time
from typing import Callable

import torch

from minivllm import LLM, SamplingParams, course
from minivllm.benchmarks.offline_throughput import cpu_model, load_average
from minivllm.benchmarks.spec_decode import code_prompts
from minivllm.sampling_params import StructuredOutputsParams
from minivllm.structured_output import StructuredOutputManager

# A list of at least 40 records (hundreds of tokens at the least), each with strings, an integer
# range, an enum, a boolean and a nested array: the matcher walks every kind of JSON state. Compact
# (``disable_any_whitespace``): with any whitespace allowed, greedy decoding pads with newlines and
# spaces for ever, and the matcher would sit in one state.
SCHEMA = {"type": "array", "minItems": 40, "items": {
    "type": "object",
    "properties": {"name": {"type": "string", "pattern": "^[a-z_][a-z0-9_]{0,15}$"},
                   "line": {"type": "integer", "minimum": 1, "maximum": 9999},
                   "kind": {"enum": ["function", "class", "constant"]},
                   "public": {"type": "boolean"},
                   "args": {"type": "array", "items": {"type": "string", "pattern": "^[a-z_]{1,8}$"},
                            "maxItems": 4}},
    "required": ["name", "line", "kind", "public", "args"], "additionalProperties": False}}


class GrammarTimer:
    """Wraps a manager's ``attach_masks`` and ``accept`` (on the instance) and adds up their time."""

    def __init__(self, manager: StructuredOutputManager):
        self.seconds = 0.0
        for name in ("attach_masks", "accept"):
            setattr(manager, name, self._timed(getattr(manager, name)))

    def _timed(self, fn: Callable) -> Callable:
        def timed(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


def decode_steps(llm: LLM, prompts: list[str], params: SamplingParams, skip: int, ids: itertools.count,
                 timer: GrammarTimer | None) -> tuple[list[float], list[float], list]:
    """Run the batch to the end, one ``step`` at a time: the seconds of each decode step of the whole
    batch after the first ``skip``, the grammar's seconds in each, and the outputs."""
    engine = llm.llm_engine
    for p in prompts:
        engine.add_request(f"bench{next(ids)}", p, params)
    steps, grammar, outputs = [], [], []
    while engine.has_unfinished_requests():
        before = timer.seconds if timer else 0.0
        start = time.perf_counter()
        outputs += engine.step()
        elapsed = time.perf_counter() - start
        record = engine.trace[-1]
        if record.num_prefill_tokens == 0 and len(record.chunks) == len(prompts):
            steps.append(elapsed)
            grammar.append((timer.seconds if timer else 0.0) - before)
    return steps[skip:], grammar[skip:], outputs


def mean_ms(values: list[float]) -> float:
    return 1e3 * sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--tokens", type=int, default=64, help="output tokens of every request")
    parser.add_argument("--skip", type=int, default=4, help="decode steps left out at the start of each run")
    parser.add_argument("--repeats", type=int, default=5, help="pairs of runs per batch size")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("minivllm").setLevel(logging.WARNING)
    llm = LLM(course.model_path("target"), num_kv_blocks=2048, seed=0)
    constraint = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    plain = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=args.tokens, structured_outputs=constraint)
    ids = itertools.count()
    start = time.perf_counter()
    llm.generate("def f(x):", constrained, use_tqdm=False)  # imports xgrammar, compiles the schema
    first = time.perf_counter() - start
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s), "
          f"{load_average()} (before)")
    print(f"course target (vocabulary {llm.llm_engine.model_config.vocab_size}), greedy, {args.tokens} tokens "
          f"per request, the first {args.skip} decode steps of each run left out, {args.repeats} pairs of runs; "
          f"the first constrained request (xgrammar import, schema compile) took {first:.2f} s, before the runs\n")
    timer = GrammarTimer(llm.llm_engine.structured_output)
    print(f"{'batch':>5} {'plain ms':>9} {'json ms':>9} {'diff ms':>8} {'ratio':>6} {'grammar ms':>10} "
          f"{'grammar us/req':>14}  (per decode step; grammar: attach_masks + accept)")
    sample = None
    for batch in args.batch_sizes:
        prompts = (code_prompts(16, 200) * (batch // 16 + 1))[:batch]
        plain_steps, json_steps, grammar_steps = [], [], []
        for _ in range(args.repeats):
            steps, _, outs = decode_steps(llm, prompts, plain, args.skip, ids, None)
            plain_steps += steps
            steps, grammar, outs = decode_steps(llm, prompts, constrained, args.skip, ids, timer)
            assert all(len(o.outputs[0].token_ids) == args.tokens for o in outs), "a document ended early"
            json_steps += steps
            grammar_steps += grammar
            sample = sample or outs[0].outputs[0].text
        p, j, g = mean_ms(plain_steps), mean_ms(json_steps), mean_ms(grammar_steps)
        print(f"{batch:>5} {p:>9.2f} {j:>9.2f} {j - p:>8.2f} {j / p:>6.2f} {g:>10.2f} {1e3 * g / batch:>14.1f}")
    print(f"\nthe start of a constrained output: {sample[:120]!r}")
    print(f"{load_average()} (after)")


if __name__ == "__main__":
    main()
