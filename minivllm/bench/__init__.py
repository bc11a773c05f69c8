"""Benchmark clients, named as `vllm bench` names them: ``python -m minivllm.bench serve ...`` measures an
OpenAI-compatible server (`minivllm.bench.serve`). The summary and the printed table are the simulator's
(`minivllm.sim.metrics`), so a measured run and a simulated one read alike."""
