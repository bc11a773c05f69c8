"""Chapter 00's KV memory calculator, against numbers worked out by hand."""
from __future__ import annotations

import pytest

from minivllm.lab import KVMemoryLab, KVMemoryPlan, LabError
from minivllm.sim.hardware import HARDWARE
from minivllm.sim.model_specs import MODELS, ModelSpec

GB = 1e9


def test_llama_8b_kv_bytes_per_token_is_128_kib_in_bf16():
    # 2 (K, V) x 32 layers x 8 KV heads x 128 dims x 2 bytes
    plan = KVMemoryPlan(MODELS["Llama-3.1-8B"], HARDWARE["H100-SXM"], "bf16", context=8192, batch=1)
    assert plan.kv_bytes_per_token == 128 * 1024
    assert plan.kv_bytes_per_request == 8192 * 128 * 1024


def test_max_batch_and_verdict_on_a_hand_sized_model():
    # 1 layer, 1 KV head of size 1: 2 x 1 x 1 x 1 x 4 = 8 bytes per token in fp32
    spec = ModelSpec("toy", vocab_size=10, hidden_size=2, intermediate_size=2, num_layers=1, num_heads=1,
                     num_kv_heads=1, head_dim=1, tie_word_embeddings=True, max_model_len=100)
    gpu = HARDWARE["L4"]
    plan = KVMemoryPlan(spec, gpu, "fp32", context=100, batch=3)
    assert plan.kv_bytes == 3 * 100 * 8
    assert plan.weight_bytes == spec.num_params * 4
    assert plan.max_batch == int((gpu.memory_bytes - plan.weight_bytes) // 800)
    assert plan.fits and plan.verdict().startswith("fits")


def test_weights_that_do_not_fit_say_so():
    plan = KVMemoryPlan(MODELS["Llama-3.1-70B"], HARDWARE["H100-SXM"], "bf16", context=1024, batch=1)
    assert plan.weight_bytes > 80 * GB and not plan.fits and plan.max_batch == 0
    assert "weights alone" in plan.verdict()


@pytest.mark.parametrize("field, value, words", [("context", 0, "context=0"), ("batch", 0, "batch=0"),
                                                  ("context", 131073, "longer than Llama-3.1-8B allows"),
                                                  ("dtype", "int3", "dtype='int3'")])
def test_impossible_settings_are_refused(field, value, words):
    settings = dict(model=MODELS["Llama-3.1-8B"], gpu=HARDWARE["H100-SXM"], dtype="bf16", context=8192, batch=1)
    with pytest.raises(LabError, match=words):
        KVMemoryPlan(**(settings | {field: value}))


def test_widget_shows_refusals_and_keeps_the_last_valid_plan():
    lab = KVMemoryLab(model="Qwen3-0.6B", gpu="L4", context=4096, batch=2)
    lab.batch.value = 0
    assert "batch=0" in lab.error_message and lab.plan.batch == 2
    lab.context.value = 50_000  # Qwen3-0.6B has 40960 positions
    assert "max_model_len=40960" in lab.error_message and lab.plan.context == 4096
    lab.batch.value = 5
    assert lab.error_message == "" and lab.plan.batch == 5
    assert "&times; 5 requests" in lab.view.value and lab.image.value


def test_widget_switches_model_and_gpu():
    lab = KVMemoryLab(model="Llama-3.1-8B", gpu="H100-SXM", context=8192, batch=100)
    assert "does not fit" in lab.view.value  # 100 GB of KV beside 16 GB of weights
    lab.gpu.value = "H200"
    assert lab.plan.gpu.name == "H200" and "fits" in lab.view.value and "does not" not in lab.view.value
