"""Chapter 06's roofline lab, against costs worked out by hand."""
from __future__ import annotations

import pytest

from minivllm.lab.base import LabError
from minivllm.lab.roofline import AttentionRooflineLab, PagedAttentionCost, layer_operations, linear_layers
from minivllm.sim.hardware import HARDWARE
from minivllm.sim.model_specs import MODELS

LLAMA = MODELS["Llama-3.1-8B"]
H100 = HARDWARE["H100-SXM"]


def test_decode_attention_of_llama_8b_by_hand():
    c = PagedAttentionCost(heads=32, kv_heads=8, head_dim=128, block_size=16, batch=1, context=4096)
    assert c.kv_bytes == 2 * 4096 * 8 * 128 * 2  # K and V, every token, 8 KV heads, bf16
    assert c.query_output_bytes == 2 * 32 * 128 * 2
    assert c.table_bytes == 8 * 256 * 4  # 256 blocks, read by each KV head's program
    assert c.flops == 4 * 4096 * 32 * 128
    # each key and value serves the 4 query heads of its group: 4 FLOPs per byte, at any batch
    assert 3.99 < c.operation().intensity < 4
    assert PagedAttentionCost(32, 8, 128, 16, 256, 4096).operation().intensity == pytest.approx(
        c.operation().intensity)


def test_prefill_counts_only_the_causal_pairs_and_blocks_waste_their_tails():
    c = PagedAttentionCost(heads=2, kv_heads=1, head_dim=8, block_size=16, batch=3, context=4, new_tokens=4)
    assert c.flops == 4 * 3 * (1 + 2 + 3 + 4) * 2 * 8
    assert c.wasted_slots == 3 * 12
    extend = PagedAttentionCost(heads=2, kv_heads=1, head_dim=8, block_size=16, batch=1, context=10, new_tokens=2)
    assert extend.flops == 4 * (9 + 10) * 2 * 8


def test_linear_layers_read_each_weight_once():
    op = linear_layers(LLAMA, tokens=1)
    weights = LLAMA.layer_params - 2 * LLAMA.hidden_size  # the spec's count, less the two norms
    assert op.flops == 2 * weights
    assert 0.99 < op.intensity < 1  # a one-token decode: one multiply-add per 2-byte weight


def test_decode_is_memory_bound_and_prefill_compute_bound_on_an_h100():
    ridge = H100.peak_flops("bf16") / H100.memory_bandwidth
    for op in layer_operations(LLAMA, batch=64, context=4096, prefill=False):
        assert op.intensity < ridge, op.name
    for op in layer_operations(LLAMA, batch=1, context=4096, prefill=True):
        assert op.intensity > ridge, op.name
        assert op.time(H100) == pytest.approx(op.flops / H100.peak_flops("bf16"))


def test_impossible_costs_are_refused():
    with pytest.raises(LabError, match="kv_heads=3"):
        PagedAttentionCost(32, 3, 128, 16, 1, 10)
    with pytest.raises(LabError, match="new_tokens=11"):
        PagedAttentionCost(32, 8, 128, 16, 1, 10, new_tokens=11)


def test_widget_updates_and_keeps_the_last_valid_cost():
    lab = AttentionRooflineLab(batch=8, context=1024)
    assert "memory-bound" in lab.view.value and lab.image.value
    lab.phase.value = "prefill"
    assert lab.cost.new_tokens == 1024 and "compute-bound" in lab.view.value
    lab.block_size.value = 1
    assert lab.cost.table_bytes == 8 * 8 * 1024 * 4
    lab.batch.value = 0
    assert "batch=0" in lab.error_message and lab.cost.batch == 8
    assert lab.batch.value == 8, "the refused control shows the value in effect again"
    lab.context.value = 2048  # so the other controls are not blocked by the refused one
    assert lab.error_message == "" and lab.cost.context == 2048 and lab.cost.batch == 8
