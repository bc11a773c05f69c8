"""The Llama decoder family: Llama, Qwen2 (Llama with a q/k/v bias), Qwen3 (Llama with per-head
RMSNorm on q and k) and Qwen3-MoE (Qwen3 with mixture-of-experts MLPs, `moe.py`). `registry.py` says
which architecture gets which variant.

The forward pass works on a flat batch: every scheduled token of every sequence, concatenated
(``[tokens, hidden]``), with ``positions`` and the attention metadata saying where each belongs.

Tensor parallel: every linear layer holds its rank's shard (``minivllm/layers``). Pipeline parallel:
a model built for a stage (``layers``, a range) holds only those decoder layers, the embedding only
on the first stage and the final norm and LM head only on the last.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minivllm.config.model import ModelConfig
from minivllm.layers.activation import SiluAndMul
from minivllm.layers.attention import Attention, AttentionMetadata
from minivllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from minivllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from minivllm.layers.norm import RMSNorm
from minivllm.layers.rotary import RotaryEmbedding
from minivllm.models.moe import SparseMoeBlock


@dataclass(frozen=True)
class Variant:
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3
    # o_proj's and down_proj's layer: the stock one, or a learner's (`row_parallel_linear_class=`, exercise 08)
    row_parallel_linear: type[RowParallelLinear] = RowParallelLinear


class DecoderAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, variant: Variant, tp_rank: int, tp_size: int):
        super().__init__()
        d = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, d, cfg.num_attention_heads, cfg.num_key_value_heads,
                                          bias=variant.qkv_bias or cfg.attention_bias,
                                          tp_rank=tp_rank, tp_size=tp_size)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = variant.row_parallel_linear(cfg.num_attention_heads * d, cfg.hidden_size, bias=cfg.attention_bias,
                                        tp_rank=tp_rank, tp_size=tp_size)
        self.rotary_emb = RotaryEmbedding(d, cfg.max_position_embeddings, cfg.rope_parameters)
        self.attn = Attention(self.num_heads, self.num_kv_heads, d, scale=d ** -0.5)
        if variant.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qk_norm = variant.qk_norm
        self.head_dim = d

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim], -1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, meta).flatten(1))


class DecoderMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, variant: Variant, tp_rank: int, tp_size: int):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2,
                                                       bias=cfg.mlp_bias, tp_rank=tp_rank, tp_size=tp_size)
        self.down_proj = variant.row_parallel_linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias,
                                                     tp_rank=tp_rank, tp_size=tp_size)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, variant: Variant, tp_rank: int, tp_size: int, index: int,
                 expert_parallel: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DecoderAttention(cfg, variant, tp_rank, tp_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (SparseMoeBlock(cfg, tp_rank, tp_size, expert_parallel) if cfg.is_moe_layer(index)
                    else DecoderMLP(cfg, variant, tp_rank, tp_size))

    def forward(self, positions, x, residual, meta):
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, variant: Variant, tp_rank: int, tp_size: int, layers: range,
                 expert_parallel: bool):
        super().__init__()
        self.stage = layers
        self.is_first_stage, self.is_last_stage = layers.start == 0, layers.stop == cfg.num_hidden_layers
        self.embed_tokens = (VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_rank, tp_size)
                             if self.is_first_stage else None)
        # other stages' layers are parameter-free placeholders, so that layer i keeps its checkpoint name
        self.layers = nn.ModuleList(DecoderLayer(cfg, variant, tp_rank, tp_size, i, expert_parallel)
                                    if i in layers else nn.Identity() for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if self.is_last_stage else None

    def forward(self, input_ids, positions, meta, intermediate=None):
        """The final hidden states on the last stage; on an earlier one the ``(hidden, residual)`` pair
        the next stage continues from (``intermediate``)."""
        x, residual = (self.embed_tokens(input_ids), None) if intermediate is None else intermediate
        for i in self.stage:
            x, residual = self.layers[i](positions, x, residual, meta)
        if not self.is_last_stage:
            return x, residual
        x, _ = self.norm(x, residual)
        return x


class DecoderForCausalLM(nn.Module):
    # checkpoint projection name -> (fused module, shard id)
    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, cfg: ModelConfig, variant: Variant, tp_rank: int = 0, tp_size: int = 1,
                 layers: range | None = None, expert_parallel: bool = False):
        super().__init__()
        self.model = DecoderModel(cfg, variant, tp_rank, tp_size, layers or range(cfg.num_hidden_layers),
                                  expert_parallel)
        self.tie_word_embeddings = cfg.tie_word_embeddings
        self.lm_head = (ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp_rank, tp_size)
                        if self.model.is_last_stage else None)
        if cfg.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None):
        return self.model(input_ids, positions, meta, intermediate)

    def weight_name(self, checkpoint_name: str) -> str | None:
        """The parameter a checkpoint tensor loads into, or None when it belongs to another pipeline
        stage, or to an expert on another rank. A last stage without the embedding loads a tied LM
        head from the embedding's tensor."""
        m = self.model
        if checkpoint_name.startswith("model.layers."):
            index = int(checkpoint_name.split(".")[2])
            if index not in m.stage:
                return None
            if ".mlp.experts." in checkpoint_name:
                expert = int(checkpoint_name.split(".mlp.experts.")[1].split(".")[0])
                return checkpoint_name if expert in m.layers[index].mlp.local_experts else None
            return checkpoint_name
        if checkpoint_name.startswith("model.embed_tokens."):
            if m.embed_tokens is not None:
                return checkpoint_name
            return "lm_head.weight" if self.tie_word_embeddings and self.lm_head is not None else None
        if checkpoint_name.startswith("model.norm."):
            return checkpoint_name if m.norm is not None else None
        if checkpoint_name.startswith("lm_head."):
            return checkpoint_name if self.lm_head is not None and not self.tie_word_embeddings else None
        return checkpoint_name

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
