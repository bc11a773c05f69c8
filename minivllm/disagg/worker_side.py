"""The KV connector's worker side (torch): moving K/V between the two instances' paged caches over a
``torch.distributed`` group of two ranks (gloo on the CPU, NCCL between GPUs).

The cache is ``[2 (K, V), layers, slots, kv_heads, head_dim]`` (`minivllm.worker.kv_cache`). The
prefill side saves a finished prompt's K/V right after the forward pass (vLLM's ``save_kv_layer`` /
``wait_for_save``), so its blocks return to its cache at once; the copy waits until the decode side
has blocks for it. The decode side asks for what it needs, then receives layer by layer straight
into its own blocks (vLLM's ``start_load_kv`` / ``wait_for_layer_load``).

Every round the decode side sends a header, ``[n]`` then ``n`` rows of ``(request id, first
position, number of positions)``; the prefill side answers with one tensor per request per layer,
that layer's K and V of those positions.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from minivllm.disagg.records import KVTransfer
from minivllm.disagg.scheduler_side import KVLoad, KVSave, kv_load

PREFILL_RANK, DECODE_RANK = 0, 1


class KVSender:
    """The prefill instance's side: K/V saved per request until the decode instance asks for it."""

    def __init__(self, kv_cache: torch.Tensor, link_device: torch.device):
        self.kv_cache = kv_cache
        self.link_device = link_device  # where tensors travel from: the CPU for gloo, the GPU for NCCL
        self.saved: dict[str, torch.Tensor] = {}  # request id -> [2, layers, prompt positions, heads, dim]

    def save(self, saves: list[KVSave]) -> None:
        for s in saves:
            index = torch.tensor(s.slots, dtype=torch.long, device=self.kv_cache.device)
            self.saved[s.request_id] = self.kv_cache[:, :, index].to(self.link_device)  # a copy

    def drop(self, request_id: str) -> None:
        self.saved.pop(request_id, None)

    def serve(self) -> list[str]:
        """Answer one header from the decode side: send what it asks for, layer by layer, and forget
        it. Returns the request ids sent."""
        count = torch.zeros(1, dtype=torch.long)
        dist.recv(count, DECODE_RANK)
        rows = torch.zeros(int(count.item()), 3, dtype=torch.long)
        if len(rows):
            dist.recv(rows, DECODE_RANK)
        sent = []
        for request_id, first, num_tokens in rows.tolist():
            kv = self.saved.pop(str(request_id))
            if num_tokens:
                for layer in range(kv.shape[1]):
                    dist.send(kv[:, layer, first:first + num_tokens].contiguous(), DECODE_RANK)
            sent.append(str(request_id))
        return sent


class KVReceiver:
    """The decode instance's side: asks for the K/V its admitted requests lack, and writes it into
    their blocks.

    A subclass may replace the two per-request parts (``DisaggregatedLLM(kv_receiver_class=...)``,
    exercise 10): `plan_load`, which positions to ask for and which slots they go into, and
    `load_layers`, receiving one tensor per layer into those slots. The header and the records stay
    here."""

    def __init__(self, kv_cache: torch.Tensor, link_device: torch.device):
        self.kv_cache = kv_cache  # [2 (K, V), layers, slots, kv_heads, head_dim]
        self.link_device = link_device  # where tensors arrive: the CPU for gloo, the GPU for NCCL

    def plan_load(self, request_id: str, num_prompt_tokens: int, num_cached_tokens: int, block_table: list[int],
                  block_size: int) -> KVLoad:
        """The `KVLoad` of a request just admitted with ``block_table``, whose first
        ``num_cached_tokens`` prompt positions this instance's prefix cache already holds."""
        return kv_load(request_id, num_prompt_tokens, num_cached_tokens, block_table, block_size)

    def recv_layer(self, buf: torch.Tensor) -> None:
        """Fill ``buf`` with the next tensor the prefill instance sends."""
        dist.recv(buf, PREFILL_RANK)

    def load_layers(self, load: KVLoad) -> int:
        """Receive ``load``'s K/V, one tensor ``[2, positions, kv_heads, head_dim]`` per layer in layer
        order, into its slots of the cache; return the bytes received."""
        _, num_layers, _, heads, dim = self.kv_cache.shape
        buf = torch.empty(2, len(load.slots), heads, dim, dtype=self.kv_cache.dtype, device=self.link_device)
        index = torch.tensor(load.slots, dtype=torch.long, device=self.kv_cache.device)
        for layer in range(num_layers):
            self.recv_layer(buf)
            self.kv_cache[:, layer, index] = buf.to(self.kv_cache.device)
        return num_layers * buf.numel() * buf.element_size()

    def receive(self, loads: list[KVLoad]) -> list[KVTransfer]:
        """One header (possibly empty: nothing fitted this round), then each load's layers."""
        dist.send(torch.tensor([len(loads)], dtype=torch.long), PREFILL_RANK)
        if loads:
            dist.send(torch.tensor([[int(ld.request_id), ld.first_position, len(ld.slots)] for ld in loads],
                                   dtype=torch.long), PREFILL_RANK)
        num_layers = self.kv_cache.shape[1]
        transfers = []
        for ld in loads:
            start = time.time()
            num_bytes = self.load_layers(ld) if ld.slots else 0
            transfers.append(KVTransfer(ld.request_id, ld.num_prompt_tokens, ld.first_position, len(ld.slots),
                                        tuple(ld.block_ids), num_layers, num_bytes, start, time.time()))
        return transfers
