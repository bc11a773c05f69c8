"""The link that carries a request's KV cache from a prefill instance to a decode instance (chapter 10).

A request whose prompt has ``n`` tokens leaves the prefill side with ``n`` tokens of KV cache:

    bytes = n * 2 (K and V) * layers * KV heads * head size * dtype bytes
    time  = bytes / bandwidth + latency

For Llama-3.1-8B in bf16 that is 2 * 32 * 8 * 128 * 2 = 131,072 bytes (128 KiB) a token: a
1,000-token prompt is 131 MB, 0.29 ms over NVLink, 2.6 ms over 400 Gb/s InfiniBand, 10.5 ms over
100 Gb/s Ethernet.

Each GPU has its own link (NVLink port, NIC) and holds its share of the KV (its KV heads with TP, its
layers with PP), so an instance of several GPUs sends (or receives) its shares in parallel: the
transfer takes as long as the GPU with the most bytes, on either side. With the same layout on both
sides that is ``bytes / (GPUs x bandwidth)``; the planner's KV bytes per GPU (`LayoutPlan`) say
which GPU that is, KV heads replicated past TP = KV heads included.

The links (``bandwidth`` one direction, per GPU; ``latency`` per transfer, an assumption of the order
RDMA reaches for a request's first bytes):

* ``"nvlink"``: both pools in one node, on the node's interconnect (`Hardware.interconnect_bandwidth`,
  a datasheet figure for both directions, so half of it each way: 450 GB/s on an H100; the L4's is
  PCIe); latency `Hardware.link_latency`. Only for pools that fit in one node.
* ``"infiniband"``: 400 Gb/s NDR per GPU (50 GB/s), 25 us.
* ``"ethernet"``: 100 Gb/s per GPU (12.5 GB/s), 50 us: a cheaper cluster's network.
* ``"ethernet-25g"``: 25 Gb/s per GPU (3.125 GB/s), 50 us: a commodity cloud network, where the KV of
  long prompts outruns the link (chapter 10 shows P/D turning into a loss there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from minivllm.sim.hardware import GB, Hardware

LINK_NAMES = ("nvlink", "infiniband", "ethernet", "ethernet-25g")


@dataclass(frozen=True)
class KVLink:
    """A link between one prefill GPU and one decode GPU: ``bandwidth`` in bytes/s one direction
    (``math.inf``: instant), ``latency`` in seconds per transfer."""

    name: str
    bandwidth: float
    latency: float = 0.0

    def __post_init__(self) -> None:
        if not self.bandwidth > 0:
            raise ValueError(f"KVLink.bandwidth={self.bandwidth!r} must be > 0 bytes/s (math.inf: instant)")
        if not (self.latency >= 0 and math.isfinite(self.latency)):
            raise ValueError(f"KVLink.latency={self.latency!r} must be a finite number of seconds >= 0")

    def wire_seconds(self, num_bytes: float) -> float:
        """Seconds the link is busy with ``num_bytes`` (the latency comes on top, once)."""
        return num_bytes / self.bandwidth

    def __str__(self) -> str:
        bw = "instant" if math.isinf(self.bandwidth) else f"{self.bandwidth / GB:g} GB/s per GPU"
        return f"{self.name} ({bw}, {self.latency * 1e6:g} us)"


INSTANT = KVLink("instant", math.inf, 0.0)  # the hand-worked cases: no transfer cost at all


def kv_link(link: str | KVLink, hardware: Hardware) -> KVLink:
    """The `KVLink` named ``link`` on ``hardware`` (see the module), or ``link`` itself."""
    if isinstance(link, KVLink):
        return link
    if link == "nvlink":
        if not hardware.interconnect_bandwidth > 0:
            raise ValueError(f"link='nvlink': {hardware.name} has no interconnect bandwidth")
        kind = "PCIe" if hardware.interconnect_bandwidth < 200 * GB else "NVLink"
        return KVLink(f"{kind} (in the node)", *hardware.link(spans_nodes=False))
    if link == "infiniband":
        return KVLink("InfiniBand 400 Gb/s", 50 * GB, 25e-6)
    if link == "ethernet":
        return KVLink("Ethernet 100 Gb/s", 12.5 * GB, 50e-6)
    if link == "ethernet-25g":
        return KVLink("Ethernet 25 Gb/s", 3.125 * GB, 50e-6)
    raise ValueError(f"link={link!r} must be one of {LINK_NAMES} or a KVLink")
