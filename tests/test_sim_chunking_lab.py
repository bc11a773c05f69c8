"""Chapter 05's lab (token budget and KV memory over the simulator), driven without a browser."""
from __future__ import annotations

import pytest

from minivllm.lab.chunking import ChunkingLab, ChunkingSettings

SMALL = ChunkingSettings(num_requests=24, request_rate=1.0)


@pytest.fixture(scope="module")
def lab():
    return ChunkingLab(SMALL)


def test_budget_caps_every_step(lab):
    lab.budget.value = 256
    assert lab.error_message == ""
    assert max(r.num_batched_tokens for r in lab.state.run.result.trace) <= 256
    assert "token budget 256" in lab.view.value


def test_less_memory_means_fewer_blocks_and_preemptions_are_counted(lab):
    lab.memory.value = 0.9
    roomy = lab.state.run
    lab.memory.value = 0.75
    tight = lab.state.run
    # 22.06 GiB exposed, less the weights, the profiled pass of a 256-token budget (and fp32 logits and
    # probabilities of 64 rows) and CUDA's 0.05 GiB, over 128 KiB of KV per token
    activations = 256 * (3 * 14336 + (32 + 16) * 128 + 2 * 4096) * 2 + 64 * 2 * 4 * 128256
    free = 22.06 * 2 ** 30 * 0.9 - 2 * 8_030_261_248 - activations - 0.05 * 2 ** 30
    assert roomy.result.num_blocks == int(free // 131072) // 16
    assert tight.result.num_blocks < roomy.result.num_blocks
    assert tight.metrics.num_preemptions == sum(len(r.preempted) for r in tight.result.trace) > 0
    assert tight.recomputed_tokens >= 0 and roomy.recomputed_tokens == 0


def test_refused_settings_show_an_error_and_keep_the_state(lab):
    lab.budget.value = 1024
    before = lab.state.run
    lab.chunked.value = False  # a 1024-token step cannot hold an 8192-token prompt
    assert "max_num_batched_tokens=1024" in lab.error_message and lab.state.run is before
    lab.memory.value = 0.6  # 14.2 GB: not even the weights fit
    assert "does not fit" in lab.error_message
