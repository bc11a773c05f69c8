"""Model shapes: what the cost model needs to know about a transformer (no weights, no torch).

Parameter count of a dense decoder (Llama, Qwen2/3), ``L`` layers of hidden size ``d``, ``H`` query
heads and ``K`` key/value heads of size ``h``, MLP size ``m``, vocabulary ``V``:

    per layer  = d*H*h (q) + 2*d*K*h (k, v) + H*h*d (o) + 3*d*m (gate, up, down) + 2*d (norms)
    total      = L * per layer + V*d (embedding) + V*d (lm_head, unless tied) + d (final norm)

KV cache per token = 2 (K and V) * L * K * h * bytes per element.

A mixture of experts (Qwen3-MoE, DeepSeek-V3) replaces the MLP of its last ``L - num_dense_layers``
layers by a router (``E*d``) and ``E`` routed experts plus ``num_shared_experts``, each an MLP of size
``moe_intermediate_size``; a token runs through ``num_experts_per_token`` routed experts and the shared
ones. `num_params` counts every expert (what memory holds), `active_params` the ones a token runs
through (what it computes). Norms inside the attention (Qwen3's q/k norms) are left out: 2*h per layer.
"""
from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, fields

from minivllm.config.model import ModelConfig


@dataclass(frozen=True)
class ModelSpec:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    max_model_len: int
    num_experts: int = 0  # routed experts per MoE layer; 0: a dense model
    num_experts_per_token: int = 0  # top-k
    moe_intermediate_size: int = 0  # MLP size of one expert
    num_shared_experts: int = 0  # experts every token runs through besides its top-k (DeepSeek)
    num_dense_layers: int = 0  # leading layers that keep a dense MLP (DeepSeek's first_k_dense_replace)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            minimum = 1 if f.default is MISSING else 0
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                raise ValueError(f"ModelSpec.{f.name}={value!r} must be an int >= {minimum}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelSpec.num_kv_heads={self.num_kv_heads} must divide "
                             f"num_heads={self.num_heads}")
        if self.num_experts:
            if not 1 <= self.num_experts_per_token <= self.num_experts:
                raise ValueError(f"ModelSpec.num_experts_per_token={self.num_experts_per_token} must be in "
                                 f"1..num_experts={self.num_experts}")
            if self.moe_intermediate_size < 1:
                raise ValueError(f"ModelSpec.moe_intermediate_size={self.moe_intermediate_size} must be >= 1")
            if self.num_dense_layers >= self.num_layers:
                raise ValueError(f"ModelSpec.num_dense_layers={self.num_dense_layers} must be below "
                                 f"num_layers={self.num_layers}")
        else:
            moe = {n: getattr(self, n) for n in ("num_experts_per_token", "moe_intermediate_size",
                                                  "num_shared_experts", "num_dense_layers") if getattr(self, n)}
            if moe:
                raise ValueError(f"ModelSpec.num_experts=0 (a dense model) but {moe} are set")

    @property
    def attention_params(self) -> int:
        """Weights of one layer's attention (q, k, v, o) and its two norms."""
        d, h = self.hidden_size, self.head_dim
        return d * self.num_heads * h * 2 + d * self.num_kv_heads * h * 2 + 2 * d

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def expert_params(self) -> int:
        """One expert (routed or shared): gate, up and down of size ``moe_intermediate_size``."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers if self.num_experts else 0

    @property
    def moe_mlp_params(self) -> int:
        """One MoE layer's MLP: router and every expert (0 for a dense model)."""
        if not self.num_experts:
            return 0
        return self.num_experts * self.hidden_size + (self.num_experts + self.num_shared_experts) * self.expert_params

    @property
    def active_moe_mlp_params(self) -> int:
        """The part of `moe_mlp_params` one token runs through: router, top-k and shared experts."""
        if not self.num_experts:
            return 0
        experts = self.num_experts_per_token + self.num_shared_experts
        return self.num_experts * self.hidden_size + experts * self.expert_params

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer (attention, MLP, two norms); of a MoE layer for a MoE model."""
        return self.attention_params + (self.moe_mlp_params if self.num_experts else self.dense_mlp_params)

    @property
    def decoder_params(self) -> int:
        """Weights of all decoder layers."""
        dense = self.num_layers - self.num_moe_layers
        return (self.num_layers * self.attention_params + dense * self.dense_mlp_params
                + self.num_moe_layers * self.moe_mlp_params)

    @property
    def active_decoder_params(self) -> int:
        """Decoder weights one token runs through (`decoder_params` for a dense model)."""
        return self.decoder_params - self.num_moe_layers * (self.moe_mlp_params - self.active_moe_mlp_params)

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        return self.decoder_params + self._outer_params

    @property
    def active_params(self) -> int:
        """Weights one token runs through, embedding and LM head included (`num_params` if dense)."""
        return self.active_decoder_params + self._outer_params

    @property
    def _outer_params(self) -> int:
        """Embedding, LM head (unless tied) and the final norm."""
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else self.lm_head_params
        return embed + head + self.hidden_size

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_folder(cls, folder: str, name: str | None = None) -> "ModelSpec":
        """The shape of a local checkpoint, read from its ``config.json`` by the engine's own
        `ModelConfig`."""
        mc = ModelConfig.from_folder(folder)
        return cls(name or os.path.basename(os.path.normpath(folder)), mc.vocab_size, mc.hidden_size,
                   mc.intermediate_size, mc.num_hidden_layers, mc.num_attention_heads,
                   mc.num_key_value_heads, mc.head_dim, mc.tie_word_embeddings, mc.max_position_embeddings)


# From each model's public config.json on the Hugging Face hub.
MODELS = {
    "Qwen3-0.6B": ModelSpec("Qwen3-0.6B", 151936, 1024, 3072, 28, 16, 8, 128, True, 40960),
    "Qwen3-8B": ModelSpec("Qwen3-8B", 151936, 4096, 12288, 36, 32, 8, 128, False, 40960),
    "Llama-3.2-1B": ModelSpec("Llama-3.2-1B", 128256, 2048, 8192, 16, 32, 8, 64, True, 131072),
    "Llama-3.1-8B": ModelSpec("Llama-3.1-8B", 128256, 4096, 14336, 32, 32, 8, 128, False, 131072),
    "Llama-3.1-70B": ModelSpec("Llama-3.1-70B", 128256, 8192, 28672, 80, 64, 8, 128, False, 131072),
    "Qwen3-30B-A3B": ModelSpec("Qwen3-30B-A3B", 151936, 2048, 6144, 48, 32, 4, 128, False, 40960,
                               num_experts=128, num_experts_per_token=8, moe_intermediate_size=768),
    "Qwen3-235B-A22B": ModelSpec("Qwen3-235B-A22B", 151936, 4096, 12288, 94, 64, 4, 128, False, 40960,
                                 num_experts=128, num_experts_per_token=8, moe_intermediate_size=1536),
    # DeepSeek-V3's MLA attention caches one latent of kv_lora_rank + rope dims = 512 + 64 = 576 values
    # per token and layer, shared by all heads (and, in vLLM, kept whole on every TP rank). It is stood in
    # for by one KV head of 288 (2 * 288 = 576 values, replicated under TP as a single KV head is) and 48
    # query heads, which puts the attention weights (202M per layer) near MLA's 187M; MLA's 128 heads
    # are not modelled, so TP sizes must divide 48. Totals: 672B parameters, 38B active (published:
    # 671B, 37B); the multi-token-prediction module (14B) is left out.
    "DeepSeek-V3": ModelSpec("DeepSeek-V3", 129280, 7168, 18432, 61, 48, 1, 288, False, 163840,
                             num_experts=256, num_experts_per_token=8, moe_intermediate_size=2048,
                             num_shared_experts=1, num_dense_layers=3),
}


def get_model(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"model={name!r} is unknown; known: {', '.join(MODELS)} (or ModelSpec.from_folder)")
    return MODELS[name]
