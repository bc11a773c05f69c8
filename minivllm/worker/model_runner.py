"""Runs one scheduled step on the model: flat tensors in, one sampled token per finished chunk out."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minivllm.config import EngineConfig, ModelConfig, resolve_dtype
from minivllm.engine.block_manager import BlockManager
from minivllm.engine.scheduler import ScheduledChunk, SchedulerOutput
from minivllm.engine.sequence import Sequence
from minivllm.layers.attention import Attention, AttentionMetadata, build_attention_group
from minivllm.models.loader import load_weights
from minivllm.models.registry import build_model
from minivllm.sampling_params import SamplingParams
from minivllm.worker.kv_cache import allocate_kv_cache, choose_num_blocks
from minivllm.worker.sampler import Sampler


@dataclass
class ModelInput:
    """One step's batch, flattened: token ``i`` is ``input_ids[i]`` at ``positions[i]``."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    logits_rows: torch.Tensor  # rows whose hidden state predicts a sequence's next token


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
    def __init__(self, cfg: EngineConfig, mc: ModelConfig, folder: str, max_model_len: int):
        self.cfg, self.mc = cfg, mc
        self.device = cfg.torch_device
        self.dtype = resolve_dtype(cfg.dtype, mc.torch_dtype, self.device)
        self.block_size = cfg.block_size
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = build_model(mc)
        finally:
            torch.set_default_dtype(default_dtype)
        load_weights(self.model, folder)
        self.model.eval()
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        peak = self._profile_peak_memory(max_model_len) if self.device.type == "cuda" else None
        self.num_blocks = choose_num_blocks(cfg, mc, max_model_len, self.dtype, self.device, peak)
        self.kv_cache = allocate_kv_cache(mc, self.num_blocks, self.block_size, self.dtype, self.device)
        self._bind_cache(self.kv_cache)
        self.sampler = Sampler()
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)
        self.request_generators: dict[str, torch.Generator] = {}

    def _bind_cache(self, cache: torch.Tensor) -> None:
        for i, layer in enumerate(self.attention_layers):
            layer.k_cache, layer.v_cache = cache[0, i], cache[1, i]

    # ---- one step --------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[Sequence, int]:
        """Run the scheduled chunks; return the token sampled for each chunk that completes its
        sequence's known tokens (a decode, or the last chunk of a prompt)."""
        inp = self.prepare_input(out.chunks)
        hidden = self.model(inp.input_ids, inp.positions, inp.attn_metadata)
        sampling = [c.seq for c in out.chunks if c.samples]
        if not sampling:
            return {}
        logits = self.model.compute_logits(hidden[inp.logits_rows])
        params = [s.sampling_params for s in sampling]
        gens = [self._generator_for(s) for s in sampling]
        tokens = self.sampler(logits, params, gens, self.generator)
        return dict(zip(sampling, tokens))

    def prepare_input(self, chunks: list[ScheduledChunk]) -> ModelInput:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        decodes, prefills = [], []  # (first row, query length, context length, block table)
        for c in chunks:
            seq, start, end = c.seq, c.start, c.start + c.num_new_tokens
            row = len(input_ids)
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            if c.samples:
                logits_rows.append(len(input_ids) - 1)
            (decodes if c.num_new_tokens == 1 else prefills).append((row, c.num_new_tokens, end, table))
        dev = self.device
        groups = split_by_context_length(decodes) + ([prefills] if prefills else [])
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=dev),
            groups=[build_attention_group(*zip(*g), block_size=bs, device=dev) for g in groups])
        return ModelInput(torch.tensor(input_ids, device=dev), torch.tensor(positions, device=dev), meta,
                          torch.tensor(logits_rows, device=dev, dtype=torch.long))

    # ---- per-request state -------------------------------------------------------------------
    def _generator_for(self, seq: Sequence) -> torch.Generator | None:
        seed = seq.sampling_params.seed
        if seed is None or seq.sampling_params.greedy:
            return None
        gen = self.request_generators.get(seq.request_id)
        if gen is None:
            gen = self.request_generators[seq.request_id] = torch.Generator(self.device).manual_seed(seed)
        return gen

    def release(self, request_id: str) -> None:
        self.request_generators.pop(request_id, None)

    # ---- CUDA memory profiling ---------------------------------------------------------------
    @torch.inference_mode()
    def _profile_peak_memory(self, max_model_len: int) -> int:
        """Peak CUDA memory of the weights plus one forward pass of a full token budget, run over a
        throwaway cache just big enough for it."""
        n = min(self.cfg.max_num_batched_tokens, max_model_len)
        blocks = -(-n // self.block_size)
        bm = BlockManager(blocks, self.block_size, enable_prefix_caching=False)
        seq = Sequence("profile", [0] * n, SamplingParams(max_tokens=1))
        bm.append_slots(seq, n)
        self._bind_cache(allocate_kv_cache(self.mc, blocks, self.block_size, self.dtype, self.device))
        torch.cuda.reset_peak_memory_stats(self.device)
        inp = self.prepare_input([ScheduledChunk(seq, 0, n)])
        hidden = self.model(inp.input_ids, inp.positions, inp.attn_metadata)
        self.model.compute_logits(hidden[:min(self.cfg.max_num_seqs, n)])  # a full batch of logits
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        for layer in self.attention_layers:  # drop the throwaway cache before the real one is made
            layer.k_cache = layer.v_cache = torch.empty(0)
        torch.cuda.empty_cache()
        return peak
