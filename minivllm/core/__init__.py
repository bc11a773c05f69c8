"""The core: what every driver of the engine shares, in plain Python with no torch.

`sequence` (a request's state), `block_manager` (paged KV blocks, the hash prefix cache),
`radix_block_manager` (the radix-tree prefix cache, matched token by token), `policy` and
`scheduler` (who runs each step, continuous batching, chunked prefill, preemption), `step` (one step
of any driver), `trace` (the `StepRecord` of each step), `perfetto` (a trace as a Perfetto / Chrome
trace file) and `records` (what the layers above report through them). The real engine (`minivllm.engine`), the simulator (`minivllm.sim`) and the labs drive
these same objects. An import-linter contract (`tests/test_layers.py`) keeps torch and every layer
above out of it.
"""
