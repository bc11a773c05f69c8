"""Where a rank sits in the tensor x pipeline grid, and the size checks made before any process starts.

Ranks are numbered ``pp_rank * tp_size + tp_rank`` within one data-parallel replica: the ranks of a
pipeline stage are neighbours (on a GPU node they share the fast links the all-reduces need).
"""
from __future__ import annotations

from dataclasses import dataclass

from minivllm.config.engine import EngineConfig
from minivllm.config.model import ModelConfig
from minivllm.config.parallel import pipeline_stages


@dataclass(frozen=True)
class RankLayout:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    expert_parallel: bool = False  # MoE layers: whole experts per rank instead of a shard of each

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def samples(self) -> bool:
        """One rank turns logits into tokens and answers the driver: TP rank 0 of the last stage."""
        return self.is_last_stage and self.tp_rank == 0

    def stage_layers(self, num_layers: int) -> range:
        """This stage's contiguous slice of the decoder layers, split as the planner (and vLLM's
        ``get_pp_indices``) splits them; the first stage also embeds, the last also computes logits."""
        sizes = pipeline_stages(num_layers, self.pp_size)
        start = sum(sizes[:self.pp_rank])
        return range(start, start + sizes[self.pp_rank])


def replica_layouts(tp_size: int, pp_size: int, expert_parallel: bool = False) -> list[RankLayout]:
    """Every rank of one replica, in rank order."""
    return [RankLayout(t, tp_size, p, pp_size, expert_parallel) for p in range(pp_size) for t in range(tp_size)]


def check_parallel_sizes(cfg: EngineConfig, mc: ModelConfig) -> None:
    """Refuse a split the model cannot take. TP larger than the KV heads is refused rather than
    replicating KV heads across ranks: every rank must own whole query and KV heads. Expert parallel
    spreads each MoE layer's experts over the tensor-parallel ranks."""
    tp, pp = cfg.parallel_config.tensor_parallel_size, cfg.parallel_config.pipeline_parallel_size
    if mc.num_attention_heads % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide num_attention_heads="
                         f"{mc.num_attention_heads}")
    if mc.num_key_value_heads % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide num_key_value_heads="
                         f"{mc.num_key_value_heads} (KV heads are split, never replicated)")
    if any(not mc.is_moe_layer(i) for i in range(mc.num_hidden_layers)) and mc.intermediate_size % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide intermediate_size={mc.intermediate_size}")
    if cfg.parallel_config.enable_expert_parallel:
        if mc.num_experts == 0:
            raise ValueError(f"enable_expert_parallel=True but {mc.architecture} has no experts")
        if mc.num_experts % tp:
            raise ValueError(f"tensor_parallel_size={tp} does not divide num_experts={mc.num_experts} "
                             "(expert parallel gives each rank whole experts)")
    elif mc.num_experts and mc.moe_intermediate_size % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide moe_intermediate_size="
                         f"{mc.moe_intermediate_size}")
    if pp > mc.num_hidden_layers:
        raise ValueError(f"pipeline_parallel_size={pp} is more stages than num_hidden_layers="
                         f"{mc.num_hidden_layers}")
