"""``minivllm serve [MODEL]``: the OpenAI-compatible server on uvicorn, on 127.0.0.1 unless told.

    minivllm serve                               # the course model, http://127.0.0.1:8000/v1
    python -m minivllm serve /path/to/Qwen3-0.6B --port 8001 --api-key secret --max-model-len 4096
"""
from __future__ import annotations

import argparse

COURSE_MODEL_NAME = "minivllm/course-target"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    for flag, kind in (("--dtype", str), ("--seed", int), ("--max-model-len", int), ("--max-num-seqs", int),
                       ("--max-num-batched-tokens", int), ("--block-size", int), ("--num-kv-blocks", int),
                       ("--kv-cache-memory", int), ("--gpu-memory-utilization", float),
                       ("--tensor-parallel-size", int), ("--pipeline-parallel-size", int),
                       ("--data-parallel-size", int)):
        engine.add_argument(flag, type=kind, default=None)
    engine.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None)
    engine.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false",
                        default=None)
    return p.parse_args(argv)


ENGINE_ARGS = ("dtype", "seed", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
               "num_kv_blocks", "kv_cache_memory", "gpu_memory_utilization", "tensor_parallel_size",
               "pipeline_parallel_size", "data_parallel_size", "enable_prefix_caching", "enable_chunked_prefill")


def serve(argv: list[str] | None = None) -> None:
    import uvicorn

    from minivllm.engine.async_llm import AsyncLLM
    from minivllm.entrypoints.openai.api_server import build_app

    args = parse_args(argv)
    model = args.model
    if model is None:
        from minivllm import course
        model = course.model_path("target")
    engine_args = {k: getattr(args, k) for k in ENGINE_ARGS if getattr(args, k) is not None}
    llm = AsyncLLM.from_args(model, max_trace_steps=args.max_trace_steps, **engine_args)
    name = args.served_model_name or args.model or COURSE_MODEL_NAME
    try:
        uvicorn.run(build_app(llm, name, args.api_key), host=args.host, port=args.port, log_level="info")
    finally:
        llm.shutdown()
