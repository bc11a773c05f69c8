"""Chapter 06's lab: bytes, FLOPs and the roofline of the operations in one decoder layer.

A kernel is **memory-bound** when the GPU finishes its arithmetic before its data arrives: its
arithmetic intensity (FLOPs per byte moved to and from HBM) lies left of the roofline's ridge,
``peak FLOP/s / bandwidth`` (about 295 FLOP/byte on an H100 in bf16). Costs here are the minimum
traffic: every weight, key, value, query and output moved once; caches, launch overheads and
imperfect overlap are left out, so real kernels sit below their roofline point.

Model shapes come from `minivllm.sim.model_specs`, GPUs from `minivllm.sim.hardware`.
"""
from __future__ import annotations

from dataclasses import dataclass

import ipywidgets as widgets
from matplotlib.figure import Figure

from minivllm.lab.base import Lab, LabError
from minivllm.sim.hardware import HARDWARE, Hardware
from minivllm.sim.model_specs import ModelSpec

TABLE_ENTRY_BYTES = 4  # one int32 block id


@dataclass(frozen=True)
class Operation:
    name: str
    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        """FLOPs per byte of memory traffic."""
        return self.flops / self.bytes

    def attainable(self, gpu: Hardware, dtype: str = "bf16") -> float:
        """FLOP/s the roofline allows: the compute peak, or the bandwidth times the intensity."""
        return min(gpu.peak_flops(dtype), self.intensity * gpu.memory_bandwidth)

    def time(self, gpu: Hardware, dtype: str = "bf16") -> float:
        """Seconds at the roofline: the longer of moving the bytes and doing the FLOPs."""
        return max(self.bytes / gpu.memory_bandwidth, self.flops / gpu.peak_flops(dtype))


@dataclass(frozen=True)
class PagedAttentionCost:
    """One layer's attention over the paged cache: ``batch`` sequences of ``context`` tokens, the last
    ``new_tokens`` of each new (1: decode; ``context``: a whole prompt's prefill)."""

    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    batch: int
    context: int
    new_tokens: int = 1
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for name in ("heads", "kv_heads", "head_dim", "block_size", "batch", "context", "new_tokens", "dtype_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LabError(f"{name}={value!r} must be an int >= 1")
        if self.heads % self.kv_heads:
            raise LabError(f"kv_heads={self.kv_heads} must divide heads={self.heads}")
        if self.new_tokens > self.context:
            raise LabError(f"new_tokens={self.new_tokens} cannot exceed context={self.context}")

    @property
    def flops(self) -> int:
        """QK^T and PV: 2 FLOPs per multiply-add each, over every (query, visible key) pair."""
        n, c = self.new_tokens, self.context
        visible = n * (c - n) + n * (n + 1) // 2  # causal within the new tokens
        return 4 * self.batch * visible * self.heads * self.head_dim

    @property
    def kv_bytes(self) -> int:
        """K and V of every context token, read once."""
        return 2 * self.batch * self.context * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def query_output_bytes(self) -> int:
        return 2 * self.batch * self.new_tokens * self.heads * self.head_dim * self.dtype_bytes

    @property
    def blocks_per_sequence(self) -> int:
        return -(-self.context // self.block_size)

    @property
    def table_bytes(self) -> int:
        """The block tables, read by each KV head's program (the kernel's grid): the paged layout's only
        extra traffic over a contiguous cache."""
        return self.batch * self.kv_heads * self.blocks_per_sequence * TABLE_ENTRY_BYTES

    @property
    def wasted_slots(self) -> int:
        """Cache slots allocated but unused: the tail of each sequence's last block."""
        return self.batch * (self.blocks_per_sequence * self.block_size - self.context)

    def operation(self) -> Operation:
        kind = "decode" if self.new_tokens == 1 else "prefill" if self.new_tokens == self.context else "extend"
        return Operation(f"attention ({kind})", self.flops, self.kv_bytes + self.query_output_bytes + self.table_bytes)


def linear_layers(spec: ModelSpec, tokens: int, dtype_bytes: int = 2) -> Operation:
    """One layer's matmuls (q/k/v, o, gate/up, down) for ``tokens`` tokens: each weight read once,
    activations in and out."""
    d, h, m = spec.hidden_size, spec.head_dim, spec.intermediate_size
    qkv = (spec.num_heads + 2 * spec.num_kv_heads) * h
    weights = d * qkv + spec.num_heads * h * d + 3 * d * m
    activations = tokens * (d + qkv + spec.num_heads * h + d + d + 2 * m + m + d)
    return Operation("linear layers", 2 * tokens * weights, (weights + activations) * dtype_bytes)


def layer_operations(spec: ModelSpec, *, batch: int, context: int, prefill: bool, block_size: int = 16):
    """A decode step of ``batch`` sequences at ``context`` tokens, or the prefill of ``batch`` prompts of
    ``context`` tokens: (linear layers, attention) of one decoder layer."""
    new = context if prefill else 1
    attn = PagedAttentionCost(spec.num_heads, spec.num_kv_heads, spec.head_dim, block_size, batch, context, new)
    return linear_layers(spec, batch * new), attn.operation()


def roofline_figure(points: list[tuple[str, Operation]], gpu: Hardware, dtype: str = "bf16",
                    title: str | None = None) -> Figure:
    """The GPU's roofline (log-log) with each labelled operation at its intensity and attainable FLOP/s."""
    peak, bw = gpu.peak_flops(dtype), gpu.memory_bandwidth
    ridge = peak / bw
    fig = Figure(figsize=(8, 4.8))
    ax = fig.add_subplot()
    lo = min([0.5] + [op.intensity / 2 for _, op in points])
    hi = max([ridge * 20] + [op.intensity * 2 for _, op in points])
    ax.plot([lo, ridge, hi], [lo * bw / 1e12, peak / 1e12, peak / 1e12], color="black", linewidth=1.5)
    ax.axvline(ridge, color="grey", linestyle=":", linewidth=1)
    ax.text(ridge * 1.08, peak / 1e12 / 30, f"ridge {ridge:.0f} FLOP/B", color="grey", fontsize=8)
    colours = [f"C{i}" for i in range(10)]
    for i, (label, op) in enumerate(points):
        marker = "s" if op.name.startswith("attention") else "o"  # squares: attention; circles: matmuls
        ax.scatter(op.intensity, op.attainable(gpu, dtype) / 1e12, color=colours[i % 10], marker=marker,
                   zorder=3, label=label)
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP per byte of HBM traffic)",
           ylabel="attainable TFLOP/s", title=title or f"Roofline of one {gpu.name} ({dtype})")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, which="major", alpha=0.3)
    return fig


class AttentionRooflineLab(Lab):
    """Pick head size, block size, batch, context and phase: the attention call's bytes, FLOPs,
    intensity, and its point on the GPU's roofline (32 query heads, 8 KV heads, bf16, as Llama-3.1-8B)."""

    HEAD_SIZES = (64, 128, 256)
    BLOCK_SIZES = (1, 8, 16, 32, 64, 128)

    def __init__(self, *, gpu: str = "H100-SXM", heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                 block_size: int = 16, batch: int = 64, context: int = 4096, phase: str = "decode"):
        self.gpu = HARDWARE[gpu]
        self.cost = self._cost(heads, kv_heads, head_dim, block_size, batch, context, phase)
        self.head_dim = widgets.Dropdown(options=self.HEAD_SIZES, value=head_dim, description="head size")
        self.block_size = widgets.Dropdown(options=self.BLOCK_SIZES, value=block_size, description="block size")
        self.batch = widgets.IntText(value=batch, description="batch")
        self.context = widgets.IntText(value=context, description="context")
        self.phase = widgets.ToggleButtons(options=("decode", "prefill"), value=phase)
        super().__init__([self.on_change(w, lambda _v: self._update())
                          for w in (self.head_dim, self.block_size, self.batch, self.context, self.phase)],
                         figure=True)

    @staticmethod
    def _cost(heads, kv_heads, head_dim, block_size, batch, context, phase) -> PagedAttentionCost:
        return PagedAttentionCost(heads, kv_heads, head_dim, block_size, batch, context,
                                  context if phase == "prefill" else 1)

    def _update(self) -> None:
        c = self.cost  # replaced only if the new settings are valid
        self.cost = self._cost(c.heads, c.kv_heads, self.head_dim.value, self.block_size.value, self.batch.value,
                               self.context.value, self.phase.value)

    def render(self) -> str:
        c, op, gpu = self.cost, self.cost.operation(), self.gpu
        ridge = gpu.peak_flops("bf16") / gpu.memory_bandwidth
        bound = "memory-bound" if op.intensity < ridge else "compute-bound"
        rows = [("K/V read", f"{c.kv_bytes / 1e6:,.2f} MB"),
                ("queries + outputs", f"{c.query_output_bytes / 1e6:,.3f} MB"),
                ("block tables", f"{c.table_bytes / 1e3:,.1f} kB ({100 * c.table_bytes / c.kv_bytes:.3f} % of K/V)"),
                ("FLOPs", f"{op.flops / 1e9:,.2f} GFLOP"),
                ("arithmetic intensity", f"{op.intensity:,.1f} FLOP/B (ridge {ridge:.0f})"),
                ("time at the roofline", f"{op.time(gpu) * 1e6:,.1f} us, {bound}"),
                ("unused cache slots", f"{c.wasted_slots} (last blocks' tails)")]
        table = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
        return (f"<p><b>{op.name}</b>: batch {c.batch}, context {c.context}, {c.heads}/{c.kv_heads} heads of "
                f"{c.head_dim}, blocks of {c.block_size}, on one {gpu.name}</p><table>{table}</table>")

    def figure(self) -> Figure:
        return roofline_figure([(self.cost.operation().name, self.cost.operation())], self.gpu)
