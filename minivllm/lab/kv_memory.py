"""Chapter 00's lab: how much GPU memory the KV cache of real models takes, and how many requests fit.

The arithmetic is the simulator's (`minivllm.sim`): model shapes from `sim.model_specs`, GPUs from
`sim.hardware`. Weights and KV cache are counted in the same dtype; activations, the CUDA context and
fragmentation are left out, so real engines fit somewhat fewer requests (vLLM reserves them through
``gpu_memory_utilization``).
"""
from __future__ import annotations

from dataclasses import dataclass

import ipywidgets as widgets
from matplotlib.figure import Figure

from minivllm.lab.base import Lab, LabError
from minivllm.sim.hardware import DTYPE_BYTES, HARDWARE, Hardware
from minivllm.sim.model_specs import MODELS, ModelSpec

GB = 1e9


@dataclass(frozen=True)
class KVMemoryPlan:
    """Memory of ``batch`` requests of ``context`` tokens each, for one model on one GPU."""

    model: ModelSpec
    gpu: Hardware
    dtype: str
    context: int
    batch: int

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise LabError(f"dtype={self.dtype!r} must be one of {', '.join(DTYPE_BYTES)}")
        if isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 1:
            raise LabError(f"context={self.context!r} must be at least 1 token")
        if self.context > self.model.max_model_len:
            raise LabError(f"context={self.context} is longer than {self.model.name} allows "
                           f"(max_model_len={self.model.max_model_len})")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise LabError(f"batch={self.batch!r} must be at least 1 request")

    @property
    def weight_bytes(self) -> int:
        return self.model.num_params * DTYPE_BYTES[self.dtype]

    @property
    def kv_bytes_per_token(self) -> int:
        return self.model.kv_bytes_per_token(DTYPE_BYTES[self.dtype])

    @property
    def kv_bytes_per_request(self) -> int:
        return self.kv_bytes_per_token * self.context

    @property
    def kv_bytes(self) -> int:
        return self.kv_bytes_per_request * self.batch

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.gpu.memory_bytes

    @property
    def max_batch(self) -> int:
        """Requests of this context that fit beside the weights (0 if the weights alone do not)."""
        return max(0, int((self.gpu.memory_bytes - self.weight_bytes) // self.kv_bytes_per_request))

    def verdict(self) -> str:
        if self.weight_bytes > self.gpu.memory_bytes:
            return (f"does not fit: the weights alone ({self.weight_bytes / GB:.1f} GB) exceed the "
                    f"{self.gpu.name}'s {self.gpu.memory_bytes / GB:.1f} GB; split the model over several "
                    "GPUs (chapter 08) or quantize it")
        if not self.fits:
            return (f"does not fit: {self.batch} requests need {self.kv_bytes / GB:.1f} GB of KV cache, "
                    f"only {(self.gpu.memory_bytes - self.weight_bytes) / GB:.1f} GB are left after the "
                    f"weights; at most {self.max_batch} requests of {self.context} tokens fit")
        return (f"fits: {self.total_bytes / GB:.1f} of {self.gpu.memory_bytes / GB:.1f} GB; up to "
                f"{self.max_batch} requests of {self.context} tokens would fit")


class KVMemoryLab(Lab):
    """Pick a model, dtype, context length, batch size and GPU; see what the KV cache costs."""

    def __init__(self, models: dict[str, ModelSpec] | None = None, *, model: str = "Llama-3.1-8B",
                 gpu: str = "H100-SXM", dtype: str = "bf16", context: int = 8192, batch: int = 16):
        self.models = dict(models or MODELS)
        self.plan = KVMemoryPlan(self.models[model], HARDWARE[gpu], dtype, context, batch)
        self.model = widgets.Dropdown(options=list(self.models), value=model, description="model")
        self.gpu = widgets.Dropdown(options=list(HARDWARE), value=gpu, description="GPU")
        self.dtype = widgets.Dropdown(options=list(DTYPE_BYTES), value=dtype, description="dtype")
        self.context = widgets.IntText(value=context, description="context")
        self.batch = widgets.IntText(value=batch, description="batch")
        super().__init__([[self.on_change(self.model, lambda v: self._replan(model=self.models[v])),
                           self.on_change(self.gpu, lambda v: self._replan(gpu=HARDWARE[v])),
                           self.on_change(self.dtype, lambda v: self._replan(dtype=v))],
                          [self.on_change(self.context, lambda v: self._replan(context=v)),
                           self.on_change(self.batch, lambda v: self._replan(batch=v))]], figure=True)

    def _replan(self, **change) -> None:
        current = {k: getattr(self.plan, k) for k in ("model", "gpu", "dtype", "context", "batch")}
        self.plan = KVMemoryPlan(**(current | change))  # raises LabError, leaving the plan as it was

    def render(self) -> str:
        p = self.plan
        rows = [("weights", f"{p.model.num_params / 1e9:.2f} B parameters &times; {DTYPE_BYTES[p.dtype]} B "
                            f"= {p.weight_bytes / GB:.2f} GB"),
                ("KV cache per token", f"2 &times; {p.model.num_layers} layers &times; {p.model.num_kv_heads} KV heads "
                                       f"&times; {p.model.head_dim} &times; {DTYPE_BYTES[p.dtype]} B "
                                       f"= {p.kv_bytes_per_token / 1024:.0f} KiB"),
                ("KV cache per request", f"&times; {p.context} tokens = {p.kv_bytes_per_request / GB:.3f} GB"),
                ("KV cache of the batch", f"&times; {p.batch} requests = {p.kv_bytes / GB:.2f} GB"),
                ("total", f"{p.total_bytes / GB:.2f} GB of {p.gpu.memory_bytes / GB:.1f} GB ({p.gpu.name})")]
        table = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
        colour = "#1a7f37" if p.fits else "#a40000"
        return (f"<table>{table}</table><p style='color:{colour}'><b>{p.model.name}, {p.dtype}: "
                f"{p.verdict()}</b></p>")

    def figure(self) -> Figure:
        p = self.plan
        fig = Figure(figsize=(10, 1.8))
        ax = fig.add_subplot()
        ax.barh([0], [p.weight_bytes / GB], color="#4c72b0", label="weights")
        ax.barh([0], [p.kv_bytes / GB], left=[p.weight_bytes / GB], color="#dd8452",
                label=f"KV cache ({p.batch} x {p.context} tokens)")
        ax.axvline(p.gpu.memory_bytes / GB, color="black", linestyle="--", label=f"{p.gpu.name} memory")
        ax.set(title=f"{p.model.name} in {p.dtype} on one {p.gpu.name}", xlabel="GB", yticks=[])
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
        return fig
