"""Generate from the command line, or serve.

    python -m minivllm [--prompt "def fibonacci(n):" ...]   # the course model (minivllm.course)
    python -m minivllm serve [MODEL] [--port 8000 ...]   # the OpenAI-compatible server (minivllm serve)
    python -m minivllm --model FOLDER_OR_HUB_ID [--prompt ...]
    python -m minivllm --tiny-demo      # a tiny random checkpoint built on the spot (output is noise)
"""
from __future__ import annotations

import argparse
import sys
import tempfile

from minivllm import LLM, SamplingParams


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from minivllm.entrypoints.cli import serve
        return serve(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m minivllm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a Qwen3, Qwen2 or Llama checkpoint folder (or a hub id, online); "
                                        "default: the course's target model")
    source.add_argument("--tiny-demo", action="store_true",
                        help="build a tiny random Qwen3 checkpoint and run it: shows the engine, not language")
    parser.add_argument("--prompt", action="append", help="repeat for a batch (default: a few code prompts)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    args = parser.parse_args(argv)

    prompts = args.prompt or ["def fibonacci(n):", "class Stack:", "import os\n"]
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None and not args.tiny_demo:
            from minivllm import course
            model = course.model_path("target")
        if args.tiny_demo:
            from minivllm.models.tiny import save_tiny_checkpoint
            model = save_tiny_checkpoint(tmp, "qwen3")
            print("Random weights: the tokens below show the engine at work, not a trained model.")
        llm = LLM(model, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed)
        outputs = llm.generate(prompts, params)
    for out in outputs:
        comp = out.outputs[0]
        print(f"--- prompt: {out.prompt!r} ({len(out.prompt_token_ids)} tokens, "
              f"finish_reason={comp.finish_reason}, {len(comp.token_ids)} tokens)")
        print(out.prompt + comp.text)
    steps = llm.llm_engine.trace
    print(f"--- {len(steps)} engine steps, {sum(r.num_batched_tokens for r in steps)} tokens computed, "
          f"{sum(len(r.preempted) for r in steps)} preemptions")


if __name__ == "__main__":
    main()
