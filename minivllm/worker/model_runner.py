"""Runs one scheduled step on the model: flat tensors in, one sampled token per finished chunk out."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minivllm.config.engine import EngineConfig, resolve_dtype
from minivllm.config.model import ModelConfig
from minivllm.core.block_manager import BlockManager, KVCopy
from minivllm.core.records import StepLogprobs
from minivllm.core.scheduler import ScheduledChunk, SchedulerOutput
from minivllm.core.sequence import Sequence
from minivllm.distributed.comm import smallest_across_ranks
from minivllm.distributed.layout import RankLayout
from minivllm.layers.attention import Attention, AttentionMetadata, build_attention_group, build_paged_batch
from minivllm.models.loader import load_weights
from minivllm.models.registry import build_model
from minivllm.sampling_params import SamplingParams
from minivllm.worker.kv_cache import allocate_kv_cache, choose_num_blocks
from minivllm.worker.sampler import Sampler
from minivllm.worker.logits_processors import apply_logits_processors, stack_masks
from minivllm.worker.logprobs import step_logprobs
from minivllm.worker.step_batch import SamplerOutput, StepBatch, flatten_chunks


@dataclass
class ModelInput:
    """One step's batch, flattened: token ``i`` is ``input_ids[i]`` at ``positions[i]``."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata


def split_by_context_length(entries: list[tuple], min_group: int = 8, max_padding: float = 1.5) -> list[list]:
    """Cut single-query sequences into groups of similar context length. Each group is padded to its
    longest context; a new group starts once padding would exceed ``max_padding`` times the real
    keys (and the group already has ``min_group`` members: every group costs a kernel call)."""
    groups: list[list] = []
    real = 0
    for e in sorted(entries, key=lambda e: e[2]):
        ctx = e[2]
        if groups and (len(groups[-1]) < min_group or ctx * (len(groups[-1]) + 1) <= max_padding * (real + ctx)):
            groups[-1].append(e)
            real += ctx
        else:
            groups.append([e])
            real = ctx
    return groups


class ModelRunner:
    """The model, its KV cache and the sampler of one rank (the whole model when ``layout`` is the
    default single rank). In tensor parallel every rank runs the same batch on its shard; in pipeline
    parallel a rank holds its stage's layers, and `minivllm.executor.worker_proc` passes the hidden
    states between stages."""

    last_comm: tuple = ()  # part of the `Executor` interface: one process makes no collectives
    last_logprobs: dict[str, StepLogprobs] = {}  # the `Executor`'s too: the last step's, by request id

    def __init__(self, cfg: EngineConfig, mc: ModelConfig, folder: str, max_model_len: int,
                 layout: RankLayout = RankLayout(), device: torch.device | None = None):
        self.cfg, self.mc, self.layout = cfg, mc, layout
        self.device = device or cfg.torch_device  # a worker process is given its own GPU
        self.dtype = resolve_dtype(cfg.dtype, mc.dtype, self.device)
        self.block_size = cfg.cache_config.block_size
        self.attention_backend = cfg.resolved_attention_backend
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = build_model(mc, layout.tp_rank, layout.tp_size, layout.stage_layers(mc.num_hidden_layers),
                                         layout.expert_parallel, cfg.row_parallel_linear_class)
        finally:
            torch.set_default_dtype(default_dtype)
        load_weights(self.model, folder)
        self.model.eval()
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        peak = self._profile_peak_memory(max_model_len) if self.device.type == "cuda" else None
        self.num_blocks = smallest_across_ranks(
            choose_num_blocks(cfg, mc, max_model_len, self.dtype, self.device, peak, layout), self.device)
        self.kv_cache = allocate_kv_cache(mc, self.num_blocks, self.block_size, self.dtype, self.device, layout)
        self._bind_cache(self.kv_cache)
        self.sampler = cfg.sampler or Sampler()
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)
        self.request_generators: dict[str, torch.Generator] = {}

    def _bind_cache(self, cache: torch.Tensor) -> None:
        for i, layer in enumerate(self.attention_layers):
            layer.k_cache, layer.v_cache = cache[0, i], cache[1, i]

    # ---- one step --------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[Sequence, int]:
        """Run the scheduled chunks; return the token sampled for each chunk that completes its
        sequence's known tokens (a decode, or the last chunk of a prompt). The logprobs asked for
        are left in ``last_logprobs``."""
        result = self.execute_batch(flatten_chunks(out.chunks, self.block_size, out.token_masks))
        self.last_logprobs = result.logprobs
        return dict(zip([c.seq for c in out.chunks if c.samples], result.token_ids))

    @torch.inference_mode()
    def execute_batch(self, batch: StepBatch, intermediate: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> SamplerOutput:
        """The last pipeline stage (or the whole model): run one flat batch, apply each request's
        logits rules and sample; the tokens in ``batch.sampling`` order and the logprobs asked for
        (nothing on a rank that does not sample: tensor-parallel ranks other than 0 still compute
        the logits, as they join the LM head's gather)."""
        logits = self._logits(batch, intermediate, batch.logits_rows + batch.prompt_rows)
        if logits is None or not self.layout.samples:
            return SamplerOutput()
        logits, prompt_logits = logits.split([len(batch.logits_rows), len(batch.prompt_rows)])
        params = [p for _, p in batch.sampling]
        processed = logits
        if batch.rules or batch.token_masks:
            processed = apply_logits_processors(logits, batch.rules or [None] * len(params),
                                                stack_masks(batch.token_masks, [1] * len(params)))
        gens = [self._generator_for(rid, p) for rid, p in batch.sampling]
        tokens = self.sampler(processed, params, gens, self.generator) if params else []
        return SamplerOutput(tokens, step_logprobs(batch, logits, tokens, prompt_logits))

    @torch.inference_mode()
    def compute_logits(self, batch: StepBatch, intermediate: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> torch.Tensor | None:
        """The last pipeline stage (or the whole model): run one flat batch, writing its K/V; the
        logits at ``batch.logits_rows``, None if it has none."""
        return self._logits(batch, intermediate, batch.logits_rows)

    def _logits(self, batch: StepBatch, intermediate, rows: list[int]) -> torch.Tensor | None:
        if not self.layout.is_last_stage:
            raise ValueError(f"pipeline stage {self.layout.pp_rank} is not the last: use compute_hidden")
        hidden = self._forward(batch, intermediate)
        return self.model.compute_logits(hidden[torch.tensor(rows, device=self.device, dtype=torch.long)]) \
            if rows else None

    @torch.inference_mode()
    def compute_hidden(self, batch: StepBatch, intermediate: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """A pipeline stage before the last: run its layers on one flat batch, writing their K/V; the
        ``(hidden, residual)`` pair the next stage continues from (its ``intermediate``)."""
        if self.layout.is_last_stage:
            raise ValueError(f"pipeline stage {self.layout.pp_rank} is the last: use compute_logits")
        return self._forward(batch, intermediate)

    def _forward(self, batch: StepBatch, intermediate: tuple[torch.Tensor, torch.Tensor] | None):
        """This rank's layers over one flat batch, writing its K/V: what they return."""
        inp = self.build_input(batch)
        return self.model(inp.input_ids, inp.positions, inp.attn_metadata, intermediate)

    def prepare_input(self, chunks: list[ScheduledChunk]) -> ModelInput:
        return self.build_input(flatten_chunks(chunks, self.block_size))

    def build_input(self, batch: StepBatch) -> ModelInput:
        bs, dev = self.block_size, self.device
        decodes, prefills = batch.decodes, batch.prefills
        slot_mapping = torch.tensor(batch.slot_mapping, device=dev)
        if self.attention_backend == "triton":
            decode_batch, prefill_batch = (build_paged_batch(*zip(*e), block_size=bs, device=dev) if e else None
                                           for e in (decodes, prefills))
            meta = AttentionMetadata(slot_mapping, decodes=decode_batch, prefills=prefill_batch, backend="triton")
        else:
            groups = split_by_context_length(decodes) + ([prefills] if prefills else [])
            meta = AttentionMetadata(
                slot_mapping, groups=[build_attention_group(*zip(*g), block_size=bs, device=dev) for g in groups])
        return ModelInput(torch.tensor(batch.input_ids, device=dev), torch.tensor(batch.positions, device=dev), meta)

    @torch.inference_mode()
    def copy_kv(self, copies: list[KVCopy]) -> None:
        """The radix prefix cache's copy-on-write: each `KVCopy`'s slots, K and V of every layer.
        One gather then one scatter, so a block both read and written in one call is read first."""
        if not copies:
            return
        bs = self.block_size
        slots = torch.tensor([(c.src_block * bs + j, c.dst_block * bs + j) for c in copies for j in range(c.num_tokens)],
                             device=self.device, dtype=torch.long)
        self.kv_cache[:, :, slots[:, 1]] = self.kv_cache[:, :, slots[:, 0]]

    # ---- per-request state -------------------------------------------------------------------
    def _generator_for(self, request_id: str, params: SamplingParams) -> torch.Generator | None:
        if params.seed is None or params.greedy:
            return None
        gen = self.request_generators.get(request_id)
        if gen is None:
            gen = self.request_generators[request_id] = torch.Generator(self.device).manual_seed(params.seed)
        return gen

    def release(self, request_id: str) -> None:
        self.request_generators.pop(request_id, None)

    def close(self) -> None:
        """Drop the weights and the KV cache now rather than when the engine is collected."""
        for layer in self.attention_layers:
            layer.k_cache = layer.v_cache = torch.empty(0)
        self.kv_cache = self.model = None

    # ---- CUDA memory profiling ---------------------------------------------------------------
    @torch.inference_mode()
    def _profile_peak_memory(self, max_model_len: int) -> int:
        """Peak CUDA memory of the weights plus one forward pass of a full token budget, run over a
        throwaway cache just big enough for it."""
        n = min(self.cfg.scheduler_config.max_num_batched_tokens, max_model_len)
        blocks = -(-n // self.block_size)
        bm = BlockManager(blocks, self.block_size, enable_prefix_caching=False)
        seq = Sequence("profile", [0] * n, SamplingParams(max_tokens=1))
        bm.append_slots(seq, n)
        self._bind_cache(allocate_kv_cache(self.mc, blocks, self.block_size, self.dtype, self.device, self.layout))
        torch.cuda.reset_peak_memory_stats(self.device)
        inp = self.prepare_input([ScheduledChunk(seq, 0, n)])
        if self.layout.is_first_stage:
            intermediate = None
        else:  # a later pipeline stage starts from the previous stage's hidden states
            intermediate = tuple(torch.zeros(n, self.mc.hidden_size, dtype=self.dtype, device=self.device)
                                 for _ in range(2))
        hidden = self.model(inp.input_ids, inp.positions, inp.attn_metadata, intermediate)
        if self.layout.is_last_stage:
            self.model.compute_logits(hidden[:min(self.cfg.scheduler_config.max_num_seqs, n)])  # a full batch of logits
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        for layer in self.attention_layers:  # drop the throwaway cache before the real one is made
            layer.k_cache = layer.v_cache = torch.empty(0)
        torch.cuda.empty_cache()
        return peak
