"""Attention and fused-op kernels, imported as ``minivllm.kernels``.

``reference`` holds the torch implementations the engine runs on the CPU (and that every faster
kernel is tested against).
"""
