"""Benchmarks that measure minivllm against baselines."""
