"""Attention and fused-op kernels, imported as ``minivllm.kernels``.

``reference`` holds the torch implementations the engine runs on the CPU (and that every faster
kernel is tested against). The Triton kernels, used by ``attention_backend="triton"``:

* ``paged_attention``: decode (one query per sequence, split-KV for long contexts) and
  prefill/extend (new tokens over a cached prefix) attention, reading the cache through block tables;
* ``store_kv``: new K/V into their cache slots;
* ``fused``: RMSNorm with the residual add, rotary embedding, SiLU-and-multiply (their references
  are the torch layers in ``minivllm.layers``).

Triton is optional: nothing here imports it until one of those modules is imported. On a machine
without a GPU they run in the Triton interpreter (``TRITON_INTERPRET=1`` set before the import).
"""
