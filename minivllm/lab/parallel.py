"""Chapter 08's lab: plan a multi-GPU deployment with the planner (`minivllm.sim.planner`).

Pick a model, a GPU, the sizes of each kind of parallelism (TP, PP, DP, EP, CP) and a context
length; the lab shows the memory per GPU, whether the layout fits, its KV capacity, the
communication per token next to the compute per token, the pipeline bubble, and the planner's
verdict. A layout the planner refuses (TP not dividing the heads, EP on a dense model, more stages
than layers) shows its ``ValueError`` as the widget's message.

`layout_figure` (the GPUs of a layout and what each holds) and `compare_figure` (several layouts
side by side) are the chapter's diagrams, drawn from the same plans.
"""
from __future__ import annotations

from dataclasses import fields

import ipywidgets as widgets
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Rectangle

from minivllm.lab.base import Lab
from minivllm.sim.hardware import HARDWARE
from minivllm.sim.model_specs import MODELS
from minivllm.sim.planner import GB, LayoutPlan, ParallelLayout, plan_layout

LAB_MODELS = ("Llama-3.1-8B", "Llama-3.1-70B", "Qwen3-30B-A3B", "Qwen3-235B-A22B", "DeepSeek-V3")
LAB_GPUS = ("H100-SXM", "H200", "A100-80GB", "L4")
SIZES = tuple(f.name for f in fields(ParallelLayout))  # tp, pp, dp, ep, cp
ROW_STEP = 1.6  # vertical distance between pipeline stages in `layout_figure`
KIND_COLOURS = {"tp": "#4c72b0", "pp": "#55a868", "ep": "#c44e52", "cp": "#8172b2"}


def plan_for(model: str, gpu: str, context_len: int, **sizes: int) -> LayoutPlan:
    """The planner's plan of ``model`` on ``gpu`` in bf16 with the given sizes (``tp=2``, ...)."""
    if model not in MODELS:
        raise ValueError(f"model={model!r} is unknown; known: {', '.join(MODELS)}")
    if gpu not in HARDWARE:
        raise ValueError(f"gpu={gpu!r} is unknown; known: {', '.join(HARDWARE)}")
    return plan_layout(MODELS[model], HARDWARE[gpu], ParallelLayout(**sizes), context_len=context_len)


def comm_rows(plan: LayoutPlan) -> list[tuple[str, str]]:
    """One row per collective of the most communicating GPU: calls and bytes per step, time per token."""
    rows = []
    for c in plan.communication:
        rows.append((f"{c.parallelism.upper()} {c.op}",
                     f"{c.calls_per_step} calls of {c.payload_bytes_per_call / 1024:.0f} KiB per step of "
                     f"{c.step_tokens} tokens; {c.wire_bytes_per_token / 1024:.1f} KiB on the link per token "
                     f"= {c.seconds_per_token * 1e6:.2f} &micro;s"))
    return rows or [("communication", "none (one GPU per replica)")]


class ParallelLab(Lab):
    """Plan a layout; every control re-plans (see the module)."""

    def __init__(self, *, model: str = "Llama-3.1-70B", gpu: str = "H100-SXM", context_len: int = 8192,
                 tp: int = 1, pp: int = 1, dp: int = 1, ep: int = 1, cp: int = 1):
        self.settings = dict(model=model, gpu=gpu, context_len=context_len, tp=tp, pp=pp, dp=dp, ep=ep, cp=cp)
        self.plan = plan_for(**self.settings)
        self.model = widgets.Dropdown(options=LAB_MODELS, value=model, description="model")
        self.gpu = widgets.Dropdown(options=LAB_GPUS, value=gpu, description="GPU")
        self.context_len = widgets.IntText(value=context_len, description="context")
        self.sizes = {name: widgets.BoundedIntText(value=self.settings[name], min=1, max=256,
                                                   description=name.upper(), layout=widgets.Layout(width="120px"))
                      for name in SIZES}
        controls = [self.on_change(self.model, lambda v: self.set(model=v)),
                    self.on_change(self.gpu, lambda v: self.set(gpu=v)),
                    self.on_change(self.context_len, lambda v: self.set(context_len=v))]
        controls += [self.on_change(w, lambda v, name=name: self.set(**{name: v})) for name, w in self.sizes.items()]
        super().__init__([controls[:3], controls[3:]], figure=True)

    def set(self, **change) -> None:
        """Re-plan with ``change`` applied; a layout the planner refuses raises its ``ValueError``
        and leaves the plan as it was."""
        settings = self.settings | change
        self.plan = plan_for(**settings)
        self.settings = settings

    def choose(self, **values) -> bool:
        """Change several settings at once from code (``lab.choose(gpu="L4", tp=2)``): one re-plan,
        so no setting is tried with the others half changed. A refused layout shows its message and
        changes nothing; otherwise the controls follow. Returns whether it was accepted."""
        if not self.apply(lambda: self.set(**values)):
            return False
        for name, value in values.items():  # each control's handler re-plans to the same settings
            (self.sizes.get(name) or getattr(self, name)).value = value
        return True

    def render(self) -> str:
        p = self.plan
        stages = ", ".join(str(n) for n in p.stage_layers)
        rows = [("GPUs", f"{p.layout.num_gpus} ({p.layout})"),
                ("layers per pipeline stage", stages),
                ("weights per GPU", f"{p.weight_bytes_per_gpu / GB:.1f} GB of {p.usable_bytes / GB:.1f} GB usable "
                                    f"({p.gpu_memory_utilization:.0%} of {p.hardware.memory_bytes / GB:.1f} GB)"),
                ("KV cache per token per GPU", f"{p.kv_bytes_per_token_per_gpu / 1024:.0f} KiB"),
                ("KV capacity", f"{p.kv_tokens:,} tokens per replica; {p.max_concurrency} requests of "
                                f"{p.context_len:,} tokens at once"),
                *comm_rows(p),
                ("communication vs compute per token",
                 f"{p.communication_seconds_per_token * 1e6:.2f} &micro;s vs {p.compute_seconds_per_token * 1e6:.2f} "
                 f"&micro;s at full load"),
                ("pipeline bubble", f"{p.bubble_fraction:.0%} of each stage's time idle "
                                    f"({p.micro_batches} micro-batch{'es' * (p.micro_batches != 1)} in flight)")]
        table = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
        ok = p.fits and not p.communication_bound
        colour = "#1a7f37" if ok else ("#9a6700" if p.fits else "#a40000")
        return f"<table>{table}</table><p style='color:{colour}'><b>{p.verdict}</b></p>"

    def figure(self) -> Figure:
        return compare_figure({str(self.plan.layout): self.plan},
                              title=f"{self.plan.model.name} on {self.plan.hardware.name}, context {self.plan.context_len:,}")


def compare_figure(plans: dict[str, LayoutPlan], title: str) -> Figure:
    """Memory per GPU (weights, and the KV cache that fills the rest) and time per token
    (communication by kind against compute) of each labelled plan."""
    fig = Figure(figsize=(10, 0.6 + 0.55 * len(plans) + 1.2), layout="constrained")
    mem, time = fig.subplots(1, 2)
    labels = list(plans)
    for i, p in enumerate(plans.values()):
        w = p.weight_bytes_per_gpu / GB
        kv = max(0.0, p.usable_bytes / GB - w)
        mem.barh(i, w, color="#937860", label="weights" if i == 0 else None)
        mem.barh(i, kv, left=w, color="#dd8452", label="KV cache" if i == 0 else None)
        mem.axvline(p.usable_bytes / GB, color="black", linestyle="--", linewidth=0.8)
        left = 0.0
        for c in p.communication:
            us = c.seconds_per_token * 1e6
            time.barh(i - 0.2, us, left=left, height=0.4, color=KIND_COLOURS[c.parallelism],
                      label=f"{c.parallelism.upper()} communication")
            left += us
        time.barh(i + 0.2, p.compute_seconds_per_token * 1e6, height=0.4, color="#999999", label="compute")
    for ax in (mem, time):
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
    handles = {}
    for ax in (mem, time):
        handles |= dict(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(handles.values(), handles.keys(), fontsize=8, loc="outside lower center", ncols=len(handles),
               frameon=False)
    mem.set(title="memory per GPU (dashed: usable)", xlabel="GB")
    time.set(title="per token at full load", xlabel="microseconds")
    fig.suptitle(title)
    return fig


def layout_figure(plan: LayoutPlan) -> Figure:
    """The GPUs of one layout: a column per data-parallel replica (and context-parallel shard), a
    row per pipeline stage, a box per tensor-parallel rank, each labelled with its layers and memory;
    arrows show what travels between them."""
    lay = plan.layout
    groups = lay.dp * lay.cp
    fig = Figure(figsize=(min(12, 1.9 * groups * lay.tp + 1), 1.3 * lay.pp + 1.0))
    ax = fig.add_subplot()
    first = 0
    for s, n in enumerate(plan.stage_layers):
        y = -s * ROW_STEP
        for g in range(groups):
            x0 = g * (lay.tp + 0.6)
            for r in range(lay.tp):
                ax.add_patch(Rectangle((x0 + r, y), 0.9, 0.9, facecolor="#e8eef7", edgecolor="#4c72b0"))
                ax.text(x0 + r + 0.45, y + 0.45, f"layers {first}-{first + n - 1}\n"
                        f"{plan.stage_weight_bytes[s] / GB:.1f} GB weights", ha="center", va="center", fontsize=7)
            if lay.tp > 1:  # the stage's TP group, joined by all-reduces
                ax.add_patch(FancyArrowPatch((x0 + 0.1, y - 0.1), (x0 + lay.tp - 0.2, y - 0.1), arrowstyle="<->",
                                             color=KIND_COLOURS["tp"], mutation_scale=10))
            if s < lay.pp - 1:
                xc = x0 + lay.tp / 2 - 0.05
                ax.add_patch(FancyArrowPatch((xc, y - 0.2), (xc, y - ROW_STEP + 0.95), arrowstyle="->",
                                             color=KIND_COLOURS["pp"], mutation_scale=12))
        first += n
    for g in range(groups):
        dp, cp = divmod(g, lay.cp)
        label = f"replica {dp}" + (f", tokens part {cp}" if lay.cp > 1 else "")
        ax.text(g * (lay.tp + 0.6) + lay.tp / 2 - 0.05, 1.05, label, ha="center", fontsize=8)
    ax.set_xlim(-0.2, groups * (lay.tp + 0.6) - 0.4)
    ax.set_ylim(-(lay.pp - 1) * ROW_STEP - 0.3, 1.3)
    ax.set_axis_off()
    ax.set_title(f"{plan.model.name} on {lay.num_gpus} x {plan.hardware.name} ({lay}): blue: all-reduce "
                 "within a stage (TP), green arrows send to the next stage (PP)", fontsize=9)
    return fig
