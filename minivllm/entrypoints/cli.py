"""``minivllm serve [MODEL]``: the OpenAI-compatible server on uvicorn, on 127.0.0.1 unless told.

    minivllm serve                               # the course model, http://127.0.0.1:8000/v1
    python -m minivllm serve /path/to/Qwen3-0.6B --port 8001 --api-key secret --max-model-len 4096
"""
from __future__ import annotations

import argparse

COURSE_MODEL_NAME = "minivllm/course-target"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``engine_args`` holds the engine arguments it sets (as `LLM`'s)."""
    p = argparse.ArgumentParser(prog="minivllm serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="a checkpoint folder (default: the course's target model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="clients must send 'Authorization: Bearer KEY'")
    p.add_argument("--served-model-name", default=None, help="the name clients ask for (default: MODEL)")
    p.add_argument("--max-trace-steps", type=int, default=10_000,
                   help="the engine's step trace keeps this many of the last steps (memory stays bounded)")
    engine = p.add_argument_group("engine arguments (as LLM's)")
    actions = [engine.add_argument(flag, type=kind, default=None) for flag, kind in (
        ("--dtype", str), ("--seed", int), ("--max-model-len", int), ("--max-num-seqs", int),
        ("--max-num-batched-tokens", int), ("--block-size", int), ("--num-kv-blocks", int),
        ("--kv-cache-memory", int), ("--gpu-memory-utilization", float), ("--tensor-parallel-size", int),
        ("--pipeline-parallel-size", int), ("--data-parallel-size", int))]
    actions += [engine.add_argument(f"--no-{dest.replace('_', '-')}", dest=dest, action="store_false", default=None)
                for dest in ("enable_prefix_caching", "enable_chunked_prefill")]
    args = p.parse_args(argv)
    args.engine_args = {a.dest: getattr(args, a.dest) for a in actions if getattr(args, a.dest) is not None}
    return args


def serve(argv: list[str] | None = None) -> None:
    import uvicorn

    from minivllm.engine.async_llm import AsyncLLM
    from minivllm.entrypoints.openai.api_server import build_app

    args = parse_args(argv)
    model = args.model
    if model is None:
        from minivllm import course
        model = course.model_path("target")
    llm = AsyncLLM.from_args(model, max_trace_steps=args.max_trace_steps, **args.engine_args)
    name = args.served_model_name or args.model or COURSE_MODEL_NAME
    try:
        uvicorn.run(build_app(llm, name, args.api_key), host=args.host, port=args.port, log_level="info")
    finally:
        llm.shutdown()
