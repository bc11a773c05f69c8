"""Exercise 06's check tells a right paged decode from wrong ones, naming the first failing case.
(That it passes on the solved notebook and fails on its skeleton is tests/test_exercises.py's job.)"""
from __future__ import annotations

import pytest
import torch

from minivllm.course import checks


def blockwise_decode(use_table=True, rescale=True, subtract_max=True, transpose_output=False):
    """The online softmax in torch, one cache block at a time, with switches that each break one rule."""
    def decode(q, k_cache, v_cache, block_tables, context_lens, scale, block_size):
        seqs, heads, head_dim = q.shape
        group = heads // k_cache.shape[1]
        out = torch.empty(seqs, heads, head_dim)
        for s, ctx in enumerate(context_lens.tolist()):
            m = torch.full((heads,), float("-inf"))
            l, acc = torch.zeros(heads), torch.zeros(heads, head_dim)
            for b in range(-(-ctx // block_size)):
                physical = int(block_tables[s, b]) if use_table else b
                n = min(block_size, ctx - b * block_size)
                slots = physical * block_size + torch.arange(n)
                k = k_cache[slots].repeat_interleave(group, dim=1)  # [n, heads, head_dim]
                v = v_cache[slots].repeat_interleave(group, dim=1)
                scores = torch.einsum("hd,nhd->hn", q[s], k) * scale
                m_new = torch.maximum(m, scores.max(dim=1).values) if subtract_max else torch.zeros(heads)
                p = torch.exp(scores - m_new[:, None])
                alpha = torch.exp(m - m_new) if rescale and subtract_max else torch.ones(heads)
                acc = acc * alpha[:, None] + torch.einsum("hn,nhd->hd", p, v)
                l, m = l * alpha + p.sum(dim=1), m_new
            out[s] = acc / l[:, None]
        return out.transpose(0, 1) if transpose_output else out

    return decode


def test_a_second_correct_implementation_passes(capsys):
    result = checks.check_paged_decode(blockwise_decode())
    assert result, str(result)
    assert capsys.readouterr().out.splitlines()[-1] == "PASS  check_paged_decode"


@pytest.mark.parametrize("flaw,words", [
    (dict(use_table=False), "one sequence of 11 tokens in blocks of 16"),  # its one block is not block 0
    (dict(rescale=False), "over 4 blocks of 16 in shuffled order"),
    (dict(subtract_max=False), "(not a number: exp() of a large score overflowed; subtract the running maximum)"),
    (dict(transpose_output=True), "the output is [2, 1, 16], expected [1, 2, 16]"),
])
def test_flawed_decodes_fail_with_the_case_in_words(flaw, words):
    result = checks.check_paged_decode(blockwise_decode(**flaw), verbose=False)
    assert not result and words in result.failure, result.failure


def test_a_crash_is_reported_not_raised():
    def crash(*args):
        raise IndexError("index 99 is out of bounds")

    result = checks.check_paged_decode(crash, verbose=False)
    assert not result and "raised IndexError: index 99 is out of bounds" in result.failure
