"""Chapter 08's planner lab: its numbers are the planner's for the chosen settings (checked by hand
for a layout small enough to count), a refused layout shows the planner's message and changes
nothing, and the L4 case names pipeline parallelism."""
from __future__ import annotations

import pytest

from minivllm.lab.parallel import LAB_GPUS, LAB_MODELS, ParallelLab, compare_figure, layout_figure, plan_for
from minivllm.sim import ParallelLayout, get_hardware, get_model, plan_layout


def test_the_lab_offers_the_chapters_models_and_gpus():
    lab = ParallelLab()
    assert list(lab.model.options) == ["Llama-3.1-8B", "Llama-3.1-70B", "Qwen3-30B-A3B", "Qwen3-235B-A22B",
                                       "DeepSeek-V3"] == list(LAB_MODELS)
    assert list(lab.gpu.options) == list(LAB_GPUS)
    assert {get_hardware(g).name for g in LAB_GPUS} == {"H100-SXM", "H200", "A100-80GB", "L4"}
    assert all(get_model(m).name == m for m in LAB_MODELS)


def test_controls_replan_with_the_planner():
    lab = ParallelLab(model="Llama-3.1-8B", gpu="H100-SXM", context_len=4096)
    lab.sizes["tp"].value = 2
    lab.gpu.value = "A100-80GB"
    want = plan_layout(get_model("Llama-3.1-8B"), get_hardware("A100-80GB"), ParallelLayout(tp=2), context_len=4096)
    assert lab.plan == want
    assert not lab.error.value
    assert want.verdict in lab.view.value
    assert f"{want.kv_tokens:,} tokens per replica" in lab.view.value


def test_the_table_shows_hand_counted_numbers():
    """Llama-3.1-8B, TP=2, bf16: two all-reduces per layer (32 layers) plus the embedding's, each of
    256 tokens x 4096 x 2 bytes = 2 MiB; the KV cache per token per GPU is 2 x 32 layers x 4 KV heads
    x 128 x 2 bytes = 64 KiB."""
    lab = ParallelLab(model="Llama-3.1-8B", gpu="H100-SXM", tp=2)
    html = lab.view.value
    assert "65 calls of 2048 KiB per step of 256 tokens" in html
    assert "<td>KV cache per token per GPU</td><td>64 KiB</td>" in html


def test_a_refused_layout_shows_the_planners_message_and_keeps_the_plan():
    lab = ParallelLab(model="Llama-3.1-70B", tp=4)
    before = lab.plan
    lab.sizes["tp"].value = 3
    assert "ParallelLayout.tp=3 must divide Llama-3.1-70B&#x27;s num_heads=64" in lab.error.value
    assert lab.plan is before
    assert not lab.choose(ep=2)  # a dense model has no experts
    assert "is dense, it has no experts to spread" in lab.error.value
    assert lab.plan is before
    with pytest.raises(ValueError, match="model='GPT-5' is unknown"):
        plan_for("GPT-5", "H100-SXM", 8192)


def test_choose_changes_several_settings_in_one_plan():
    """DeepSeek-V3 with EP=8 to a dense model with EP=1: one at a time, the model would be refused."""
    lab = ParallelLab(model="DeepSeek-V3", gpu="H200", tp=8, pp=2, ep=8)
    assert lab.choose(model="Llama-3.1-70B", ep=1, pp=1)
    assert lab.plan.layout == ParallelLayout(tp=8) and lab.plan.model.name == "Llama-3.1-70B"
    assert lab.model.value == "Llama-3.1-70B" and lab.sizes["ep"].value == 1
    assert not lab.error.value


def test_without_nvlink_the_verdict_advises_pipeline_parallel():
    lab = ParallelLab(model="Llama-3.1-70B", gpu="L4", context_len=2048, tp=8)
    assert lab.plan.communication_bound
    assert "vLLM advises PP over TP" in lab.view.value
    lab.choose(tp=1, pp=8)
    assert not lab.plan.communication_bound
    lab.choose(tp=8, pp=1, gpu="H100-SXM")
    assert not lab.plan.communication_bound


def test_figures_draw_every_gpu_and_every_plan():
    p = plan_for("Llama-3.1-70B", "H100-SXM", 8192, tp=4, pp=2, dp=2)
    fig = layout_figure(p)
    assert len(fig.axes[0].patches) - sum(1 for a in fig.axes[0].patches if type(a).__name__ == "FancyArrowPatch") == 16
    fig = compare_figure({"TP=8": plan_for("Llama-3.1-70B", "L4", 2048, tp=8),
                          "PP=8": plan_for("Llama-3.1-70B", "L4", 2048, pp=8)}, "L4")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["TP=8", "PP=8"]
    assert ParallelLab().figure() is not None
