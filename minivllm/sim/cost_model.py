"""The roofline cost of one engine step, from what the scheduler put in it.

A step runs ``T`` tokens (all chunks together), samples ``S`` of them (one per chunk that reaches
its sequence's end) and chunk ``i`` computes positions ``s_i .. e_i - 1`` (``n_i = e_i - s_i``
tokens) over a context of ``e_i`` cached tokens. With ``P`` the decoder layers' parameters
(``active_decoder_params``: a MoE token runs only its top-k experts; the embedding is a lookup, not a
matmul), ``b`` bytes per element:

    bytes  = b * num_params                   every weight is read once per step
           + kv_bytes_per_token * sum_i e_i   attention reads each chunk's whole context
    FLOPs  = 2 * P * T                        one multiply-add per weight per token
           + 2 * V * d * S                    lm_head, only for the rows that sample
           + 4 * L * H * h * sum_i n_i * (s_i + e_i + 1) / 2
                                              QK^T and PV: causal, position p sees p + 1 keys
    time   = max(bytes / bandwidth, FLOPs / peak FLOP/s) + step_overhead + seq_overhead * R

where ``R`` is the number of chunks (requests) in the step.

The sum of ``n_i * (s_i + e_i + 1) / 2`` over chunks is the step's number of (query, key) pairs.
Decode steps of few requests are memory-bound (weights dominate), big prefills compute-bound.
"""
from __future__ import annotations

from minivllm.sim.hardware import DTYPE_BYTES, Hardware, kv_dtype_of
from minivllm.sim.model_specs import ModelSpec


class CostModel:
    """One GPU's roofline for ``model`` with weights in ``dtype`` and the KV cache in
    ``kv_cache_dtype`` (default: the same). `minivllm.sim.deployment.DeploymentCost` splits the same
    figures over a parallel layout."""

    def __init__(self, model: ModelSpec, hardware: Hardware, dtype: str = "bf16", kv_cache_dtype: str | None = None):
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype={dtype!r} must be one of {sorted(DTYPE_BYTES)}")
        kv_dtype = kv_dtype_of(dtype, kv_cache_dtype)
        self.model, self.hardware, self.dtype = model, hardware, dtype
        self.dtype_bytes = DTYPE_BYTES[dtype]
        self.peak_flops = hardware.peak_flops(dtype)
        self.weight_bytes = model.num_params * self.dtype_bytes
        self.kv_bytes_per_token = model.kv_bytes_per_token(DTYPE_BYTES[kv_dtype])
        self.linear_flops_per_token = 2 * model.active_decoder_params  # a MoE token runs its top-k experts
        self.lm_head_flops_per_sample = 2 * model.lm_head_params
        self.attn_flops_per_pair = 4 * model.num_layers * model.num_heads * model.head_dim

    def step_bytes(self, context_tokens: int) -> float:
        return self.weight_bytes + self.kv_bytes_per_token * context_tokens

    def step_flops(self, num_tokens: int, num_sampled: int, attention_pairs: float) -> float:
        return (self.linear_flops_per_token * num_tokens + self.lm_head_flops_per_sample * num_sampled
                + self.attn_flops_per_pair * attention_pairs)

    def step_time(self, num_chunks: int, num_tokens: int, num_sampled: int, context_tokens: int,
                  attention_pairs: float) -> float:
        """Seconds for a step of ``num_chunks`` requests running ``num_tokens`` tokens, sampling
        ``num_sampled``, with ``context_tokens`` (sum of every chunk's context end ``e_i``) and
        ``attention_pairs`` (see the module)."""
        hw = self.hardware
        memory = self.step_bytes(context_tokens) / hw.memory_bandwidth
        compute = self.step_flops(num_tokens, num_sampled, attention_pairs) / self.peak_flops
        return max(memory, compute) + hw.step_overhead + hw.seq_overhead * num_chunks
