"""Property tests for the block manager and the scheduler, driven together without a model.

A fake model stands in for the model runner: every scheduled chunk that reaches its sequence's
last known token (``chunk.samples``) gets a token that is a fixed function of the context, as a
greedy model's would be, so requests with equal prompts continue equally and their output blocks
can be shared through the prefix cache too. The harness copies what ``LLMEngine.step`` does between
``schedule`` and ``finish`` and checks, after every step, invariants it computes on its own:

* the block manager's bookkeeping (its own ``check_invariants`` plus an independent recount of the
  block tables: ref counts, the free queue, no leaks, sharing only of full, hashed blocks of
  identical prefixes at the same logical position);
* a shadow KV cache: for every cache slot, which token (named by its whole prefix) the fake model
  last wrote there. Every token a live request counts as computed must sit in its slot, so a cache
  hit that hands out the wrong block, or a write into a block someone else still reads, fails;
* the scheduler's promises: token and sequence budgets, oldest running request first and never
  preempted, preemption from the newest end, FCFS admission, no prompt/decode mix without chunked
  prefill, no admission into a static batch that has produced output, no lost or duplicated
  request, and no livelock (a drain bounded by a worst-case step count derived from the policy);
* at the end every request that was not aborted holds exactly ``max_tokens`` outputs, equal to
  both what the fake model produced for it and a reference run of the fake model, and every block
  is free again.

The tests run over both prefix caches (``prefix_caching``): the hash cache shares whole blocks; the
radix cache (`minivllm.core.radix_block_manager`) also serves a partly matched block by a K/V copy,
which the shadow cache replays before the step's writes, as the model runner does.
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from minivllm.config.cache import CacheConfig
from minivllm.core.block_manager import BlockManager
from minivllm.core.scheduler import Scheduler
from minivllm.core.sequence import Sequence, SequenceStatus
from minivllm.sampling_params import SamplingParams

ALPHABET = 3  # a tiny vocabulary: prompts and outputs often share prefixes
MAX_PROMPT = 80
MAX_NEW = 24
MAX_LEN = MAX_PROMPT + MAX_NEW
BLOCK_SIZES = (1, 2, 4, 16)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def fake_next_token(tokens: list[int]) -> int:
    """The fake model's greedy choice: a fixed function of the context (last two tokens, length)."""
    n = len(tokens)
    prev = tokens[-2] if n > 1 else 0
    return (5 * tokens[-1] + 3 * prev + n) % ALPHABET


def reference_output(prompt: tuple[int, ...], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(fake_next_token(tokens))
    return tokens[len(prompt):]


@dataclass(frozen=True)
class Config:
    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool
    enable_prefix_caching: bool
    batching_policy: str
    prefix_caching: str = "hash"  # or "radix"


class Harness:
    """The real BlockManager and Scheduler, a fake model, and an independent record of both."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.bs = cfg.block_size
        self.bm = CacheConfig(block_size=cfg.block_size, enable_prefix_caching=cfg.enable_prefix_caching,
                              prefix_caching=cfg.prefix_caching).make_block_manager(cfg.num_blocks)
        self.radix = cfg.prefix_caching == "radix"
        self.sched = Scheduler(self.bm, max_num_seqs=cfg.max_num_seqs,
                               max_num_batched_tokens=cfg.max_num_batched_tokens,
                               enable_chunked_prefill=cfg.enable_chunked_prefill,
                               batching_policy=cfg.batching_policy)
        self.seqs: dict[str, Sequence] = {}  # every request ever added, in arrival order
        self.prompts: dict[str, tuple[int, ...]] = {}
        self.max_tokens: dict[str, int] = {}
        self.produced: dict[str, list[int]] = {}  # the tokens the fake model produced, per request
        self.finished: dict[str, str] = {}  # request id -> finish reason, as the harness decided
        self.cached_credit: dict[str, int] = {}  # num_cached_tokens seen at the first admission
        self.total_len = 0
        self.busy_steps = 0  # steps taken while some request was unfinished
        # shadow KV cache: slot -> id of the token prefix whose last token's K/V the slot holds
        self.shadow: dict[int, int] = {}
        self._trie: dict[tuple[int, int], int] = {}
        self._prefix_ids: dict[str, list[int]] = {}

    # ---- the independent record ---------------------------------------------------------------
    def prefix_id(self, seq: Sequence, pos: int) -> int:
        """An id for ``seq.token_ids[:pos + 1]``: equal ids mean equal prefixes (token ids only grow)."""
        ids = self._prefix_ids.setdefault(seq.request_id, [])
        while len(ids) <= pos:
            key = (ids[-1] if ids else -1, seq.token_ids[len(ids)])
            ids.append(self._trie.setdefault(key, len(self._trie)))
        return ids[pos]

    def slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.bs] * self.bs + pos % self.bs

    def live(self) -> list[Sequence]:
        return [s for rid, s in self.seqs.items() if rid not in self.finished]

    # ---- operations ---------------------------------------------------------------------------
    def add(self, prompt: list[int], max_tokens: int) -> bool:
        if self.bm.blocks_needed(len(prompt) + max_tokens) > self.cfg.num_blocks:
            return False  # the engine rejects a request that cannot fit even alone
        rid = f"r{len(self.seqs)}"
        seq = Sequence(rid, list(prompt), SamplingParams(max_tokens=max_tokens))
        self.seqs[rid], self.prompts[rid], self.max_tokens[rid] = seq, tuple(prompt), max_tokens
        self.produced[rid] = []
        self.total_len += len(prompt) + max_tokens
        self.sched.add(seq)
        self.check_state()
        return True

    def abort(self, k: int) -> None:
        live = self.live()
        if not live:
            return
        seq = live[k % len(live)]
        self.sched.finish(seq, "abort")
        self.finished[seq.request_id] = "abort"
        self.check_state()

    def step(self) -> None:
        cfg, bm, sched, bs = self.cfg, self.bm, self.sched, self.bs
        running_before = list(sched.running)
        waiting_before = list(sched.waiting)
        status_before = {s.request_id: s.status for s in running_before + waiting_before}
        computed_before = {s.request_id: s.num_computed_tokens for s in running_before}
        tables_before = {s.request_id: list(s.block_table) for s in running_before}
        live_owners_before = {b for b in bm.cached.values() if bm.blocks[b].ref_count > 0}

        out = sched.schedule()
        chunks, preempted = out.chunks, out.preempted
        if status_before:
            self.busy_steps += 1
            assert chunks, "nothing was scheduled although requests are unfinished"
        else:
            assert not chunks and not preempted

        # -- budgets and chunk sanity
        assert len(chunks) <= cfg.max_num_seqs
        assert len(sched.running) <= cfg.max_num_seqs
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens, (
            f"{out.num_batched_tokens} tokens scheduled, budget {cfg.max_num_batched_tokens}")
        scheduled_ids = [c.seq.request_id for c in chunks]
        assert len(set(scheduled_ids)) == len(scheduled_ids), f"a request scheduled twice: {scheduled_ids}"
        for c in chunks:
            s = c.seq
            assert c.num_new_tokens >= 1
            assert s.status is SequenceStatus.RUNNING and s.request_id not in self.finished
            assert c.start == s.num_computed_tokens
            assert c.start + c.num_new_tokens <= s.num_tokens
            assert len(s.block_table) == ceil_div(c.start + c.num_new_tokens, bs), (
                f"{s.request_id} holds {len(s.block_table)} blocks for {c.start + c.num_new_tokens} tokens")
            assert c.samples == (c.start + c.num_new_tokens == s.num_tokens)

        # -- preemption: from the newest end of the running list, never the oldest
        preempted_ids = [s.request_id for s in preempted]
        assert len(set(preempted_ids)) == len(preempted_ids)
        if preempted:
            tail = running_before[len(running_before) - len(preempted):]
            assert [s.request_id for s in reversed(tail)] == preempted_ids, (
                f"preempted {preempted_ids}, running was {[s.request_id for s in running_before]}")
            assert len(preempted) < len(running_before), "the oldest running request was preempted"
        pre_set = set(preempted_ids)

        admitted = [c for c in chunks
                    if status_before[c.seq.request_id] is SequenceStatus.WAITING or c.seq.request_id in pre_set]
        continued = [c for c in chunks if c not in admitted]
        survivors = [s for s in running_before if s.request_id not in pre_set]

        # -- running requests go first, oldest first; the oldest always runs (no livelock)
        assert chunks[:len(continued)] == continued, "an admission ran before a running request"
        assert [c.seq.request_id for c in continued] == [s.request_id for s in survivors[:len(continued)]]
        if running_before and (cfg.enable_chunked_prefill or not admitted):
            assert continued and continued[0].seq is running_before[0], "the oldest running request did not run"

        # -- admission: FCFS from the waiting queue, preempted requests (oldest first) at its front
        queue = [s.request_id for s in reversed(preempted)] + [s.request_id for s in waiting_before]
        admitted_ids = [c.seq.request_id for c in admitted]
        assert admitted_ids == queue[:len(admitted)], f"admitted {admitted_ids} out of order from {queue}"
        assert [s.request_id for s in sched.waiting] == queue[len(admitted):]
        assert [s.request_id for s in sched.running] == [s.request_id for s in survivors] + admitted_ids
        for s in preempted:
            if s.request_id not in admitted_ids:
                assert s.status is SequenceStatus.WAITING and not s.block_table and s.num_computed_tokens == 0

        # -- no prompt/decode mix without chunked prefill: whole prompts, or decodes only
        if not cfg.enable_chunked_prefill:
            if admitted:
                assert not continued, "a step without chunked prefill mixed prompts and decodes"
                assert not preempted
            for c in admitted:
                assert c.start + c.num_new_tokens == c.seq.num_tokens, "a prompt was cut into chunks"
            for c in continued:
                assert c.num_new_tokens == 1 and c.start >= c.seq.num_prompt_tokens and not c.is_prefill

        # -- static batching: nobody joins a batch in which a running request has produced output
        if cfg.batching_policy == "static":
            producing = [s.request_id for s in survivors if s.num_output_tokens > 0]
            assert not (producing and admitted), (
                f"static batching admitted {admitted_ids} while {producing} had produced tokens")

        # -- prefix-cache hits handed out at admission
        copies = list(out.kv_copies)
        for c in admitted:
            s, k = c.seq, c.start
            if self.radix:  # any number of tokens; a partly matched block is a fresh copy
                assert k <= s.num_tokens - 1, f"{s.request_id}: {k} cached tokens"
                if k % bs:
                    dst = s.block_table[k // bs]
                    assert not any(dst in t for t in tables_before.values()), (  # fresh (a later admission
                        f"{s.request_id}'s copy went to block {dst}, which another request held")  # may share it, full)
                    match = [cp for cp in copies if cp.dst_block == dst]
                    assert len(match) == 1 and match[0].num_tokens == k % bs, f"{s.request_id}: copies {copies}"
                    copies.remove(match[0])
            else:
                assert k % bs == 0 and k <= (s.num_tokens - 1) // bs * bs, f"{s.request_id}: {k} cached tokens"
            if not cfg.enable_prefix_caching:
                assert k == 0
            for i in range(k // bs):
                blk = bm.blocks[s.block_table[i]]
                assert blk.block_hash is not None
                assert blk.token_ids == tuple(s.token_ids[i * bs:(i + 1) * bs]), (
                    f"{s.request_id} was handed block {blk.block_id} holding {blk.token_ids} for "
                    f"{s.token_ids[i * bs:(i + 1) * bs]}")
            if s.request_id not in self.cached_credit:  # first admission: credited with its hit
                assert s.num_cached_tokens == k
                self.cached_credit[s.request_id] = k
            else:
                assert s.num_cached_tokens == self.cached_credit[s.request_id]
            if cfg.enable_prefix_caching and self.radix:  # ... to the token, if computed before this step
                must_hit = max([min(common_prefix_len(y.token_ids[:computed_before[y.request_id]], s.token_ids),
                                    s.num_tokens - 1) for y in survivors if y is not s], default=0)
                assert k >= must_hit, f"{s.request_id} hit {k} tokens, but a running request holds {must_hit}"
            elif cfg.enable_prefix_caching:  # a prefix some other running request holds must hit
                must_hit = 0
                for i in range((s.num_tokens - 1) // bs):
                    if not any(
                            y is not s and computed_before[y.request_id] >= (i + 1) * bs
                            and tables_before[y.request_id][i] in live_owners_before
                            and y.token_ids[:(i + 1) * bs] == s.token_ids[:(i + 1) * bs]
                            for y in survivors):
                        break
                    must_hit = i + 1
                assert k >= must_hit * bs, (
                    f"{s.request_id} hit {k} tokens, but a running request holds {must_hit * bs} of its prefix")

        assert not copies, f"copies {copies} for no admitted request"

        # -- the fake model runs: copy-on-write first (gather, then scatter), then write the shadow KV, sample
        moved = [(cp.dst_block * bs + j, self.shadow.get(cp.src_block * bs + j))
                 for cp in out.kv_copies for j in range(cp.num_tokens)]
        for slot, value in moved:
            self.shadow[slot] = value
        written: set[int] = set()
        for c in chunks:
            for p in range(c.start, c.start + c.num_new_tokens):
                slot = self.slot(c.seq, p)
                assert slot not in written, f"slot {slot} written twice in one step"
                written.add(slot)
                self.shadow[slot] = self.prefix_id(c.seq, p)
        sampled: dict[Sequence, int] = {}
        for c in chunks:
            if c.samples:
                rid = c.seq.request_id
                assert c.seq.num_output_tokens < self.max_tokens[rid], f"{rid} sampled past max_tokens"
                sampled[c.seq] = token = fake_next_token(c.seq.token_ids)
                self.produced[rid].append(token)

        sched.update(out, sampled)
        for s in sampled:  # as LLMEngine.step: stop at the length limit
            if s.num_output_tokens >= s.sampling_params.max_tokens:
                sched.finish(s, "length")
                self.finished[s.request_id] = "length"
        self.check_state()

    # ---- invariants between steps -------------------------------------------------------------
    def check_state(self) -> None:
        cfg, bm, sched, bs = self.cfg, self.bm, self.sched, self.bs
        live = self.live()
        live_ids = {s.request_id for s in live}

        # no request lost or duplicated: each live one is waiting xor running, exactly once
        w_ids = [s.request_id for s in sched.waiting]
        r_ids = [s.request_id for s in sched.running]
        assert len(set(w_ids)) == len(w_ids), f"waiting lists a request twice: {w_ids}"
        assert len(set(r_ids)) == len(r_ids), f"running lists a request twice: {r_ids}"
        assert not set(w_ids) & set(r_ids), f"{set(w_ids) & set(r_ids)} both waiting and running"
        assert set(w_ids) | set(r_ids) == live_ids, (
            f"lost {live_ids - set(w_ids) - set(r_ids)}, stray {(set(w_ids) | set(r_ids)) - live_ids}")
        assert sched.has_unfinished() == bool(live)
        assert len(sched.running) <= cfg.max_num_seqs
        for s in sched.waiting:
            assert s.status is SequenceStatus.WAITING and not s.block_table and s.num_computed_tokens == 0
        for s in sched.running:
            assert s.status is SequenceStatus.RUNNING and 1 <= s.num_computed_tokens < s.num_tokens, (
                f"{s.request_id}: {s.num_computed_tokens} of {s.num_tokens} tokens computed")
        for rid, reason in self.finished.items():
            s = self.seqs[rid]
            assert s.status is SequenceStatus.FINISHED and s.finish_reason == reason and not s.block_table

        bm.check_invariants(live)

        # independent recount of the block tables
        refs: dict[int, list[tuple[Sequence, int]]] = defaultdict(list)
        for s in self.seqs.values():
            assert len(set(s.block_table)) == len(s.block_table), f"{s.request_id} owns a block twice"
            assert len(s.block_table) == ceil_div(s.num_computed_tokens, bs)
            for i, b in enumerate(s.block_table):
                refs[b].append((s, i))
        for blk in bm.blocks:
            assert blk.ref_count == len(refs.get(blk.block_id, ())), (
                f"block {blk.block_id}: ref_count {blk.ref_count}, {len(refs.get(blk.block_id, ()))} references")
        free = {blk.block_id for blk in bm.blocks if not refs.get(blk.block_id)}
        assert set(bm.free_queue) == free and bm.num_free_blocks == len(free)
        assert bm.num_free_blocks + len(refs) == cfg.num_blocks == bm.num_free_blocks + bm.num_used_blocks
        for b, holders in refs.items():
            blk = bm.blocks[b]
            if len(holders) > 1:  # sharing: only a full, hashed block of one identical prefix
                positions = {i for _, i in holders}
                assert blk.block_hash is not None and len(blk.token_ids) == bs, f"unhashed block {b} is shared"
                assert len(positions) == 1, f"block {b} shared at logical positions {positions}"
                (i,) = positions
                prefixes = {tuple(s.token_ids[:(i + 1) * bs]) for s, _ in holders}
                assert len(prefixes) == 1, f"block {b} shared by requests with different prefixes"
            for s, i in holders:
                if blk.block_hash is not None:  # the radix cache also caches a block it is filling
                    n = len(blk.token_ids) if self.radix else bs
                    assert i * bs + n <= s.num_computed_tokens, f"block {b} cached before {n} tokens were computed"
                    assert blk.token_ids == tuple(s.token_ids[i * bs:i * bs + n])
        if cfg.enable_prefix_caching:
            for s in live:  # every block whose tokens are all computed is in the cache (radix: any computed token)
                for i in range(ceil_div(s.num_computed_tokens, bs) if self.radix else s.num_computed_tokens // bs):
                    assert bm.blocks[s.block_table[i]].block_hash is not None
        else:
            assert not bm.cached and all(blk.block_hash is None for blk in bm.blocks)

        # the shadow KV cache holds every token a live request counts as computed
        for s in live:
            for p in range(s.num_computed_tokens):
                assert self.shadow.get(self.slot(s, p)) == self.prefix_id(s, p), (
                    f"{s.request_id}: the K/V at position {p} (block {s.block_table[p // bs]}) "
                    "belongs to another prefix")

        # outputs are exactly what the fake model produced
        for rid, s in self.seqs.items():
            assert tuple(s.prompt_token_ids) == self.prompts[rid] == tuple(s.token_ids[:len(self.prompts[rid])])
            assert s.output_token_ids == self.produced[rid]
            assert s.num_output_tokens <= self.max_tokens[rid]
            if rid not in self.finished:
                assert s.num_output_tokens < self.max_tokens[rid]

    def drain(self) -> None:
        """Step until nothing is unfinished; fail past a worst-case step count (a livelock).

        The oldest running request runs every step (in every step without admissions, without
        chunked prefill), is never preempted, and advances at least one token; admission steps
        without chunked prefill are bounded by arrivals plus preemptions."""
        bound = (self.cfg.max_num_seqs + 1) * self.total_len + len(self.seqs) + 10
        while self.sched.has_unfinished():
            assert self.busy_steps <= bound, f"no drain after {self.busy_steps} busy steps: livelock"
            self.step()
        assert self.busy_steps <= bound
        assert self.bm.num_free_blocks == self.cfg.num_blocks
        assert all(blk.ref_count == 0 for blk in self.bm.blocks)
        assert not self.sched.running and not self.sched.waiting
        for rid, s in self.seqs.items():
            expected = reference_output(self.prompts[rid], self.max_tokens[rid])
            if self.finished[rid] == "length":
                assert s.num_output_tokens == self.max_tokens[rid]
                assert s.output_token_ids == expected == self.produced[rid]
            else:
                assert self.finished[rid] == "abort"
                assert s.output_token_ids == expected[:s.num_output_tokens]


# ---- strategies ---------------------------------------------------------------------------------
@st.composite
def configs(draw) -> Config:
    bs = draw(st.sampled_from(BLOCK_SIZES))
    chunked = draw(st.booleans())
    # the cache holds one request of `fits` tokens and a little more: preemption is frequent
    fits = draw(st.integers(8, MAX_LEN))
    num_blocks = ceil_div(fits, bs) + draw(st.integers(0, ceil_div(MAX_LEN // 2, bs)))
    if chunked:
        budget = draw(st.one_of(st.integers(1, 8), st.integers(9, 2 * MAX_LEN)))
    else:  # the engine requires a whole prompt (plus the outputs it may recompute) to fit a step
        budget = MAX_LEN + draw(st.integers(0, 64))
    return Config(bs, num_blocks, draw(st.integers(1, 6)), budget, chunked, draw(st.booleans()),
                  draw(st.sampled_from(("continuous", "static"))))


add_ops = st.tuples(st.just("add"), st.integers(0, 2), st.integers(0, MAX_PROMPT),
                    st.lists(st.integers(0, ALPHABET - 1), max_size=12), st.integers(1, MAX_NEW))
step_ops = st.tuples(st.just("step"), st.integers(1, 4))
burst_ops = st.tuples(st.just("burst"), st.lists(add_ops, min_size=2, max_size=8))
abort_ops = st.tuples(st.just("abort"), st.integers(0, 1000))
operations = st.tuples(  # an opening burst of arrivals, then a random mix
    st.lists(add_ops, min_size=1, max_size=8),
    st.lists(st.one_of(add_ops, add_ops, burst_ops, step_ops, step_ops, step_ops, abort_ops), max_size=30),
).map(lambda t: [("burst", t[0])] + t[1])


def make_request(bases: list[list[int]], op, capacity: int) -> tuple[list[int], int]:
    """A prefix of one of a few shared documents, then a short private tail; cut down to fit a
    cache of ``capacity`` tokens (the engine would reject a request that cannot fit alone)."""
    _, base, cut, tail, max_tokens = op
    prompt = (bases[base][:cut] + tail)[:MAX_PROMPT] or [0]
    max_tokens = min(max_tokens, capacity - 1)
    return prompt[:capacity - max_tokens], max_tokens


# ---- the tests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix_caching", ["hash", "radix"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), seed=st.integers(0, 2**16), ops=operations)
def test_random_workloads_keep_every_invariant(prefix_caching: str, cfg: Config, seed: int, ops) -> None:
    cfg = replace(cfg, prefix_caching=prefix_caching)
    note(repr(cfg))
    rng = random.Random(seed)
    bases = [[rng.randrange(ALPHABET) for _ in range(MAX_PROMPT)] for _ in range(3)]
    h = Harness(cfg)
    h.check_state()
    capacity = cfg.num_blocks * cfg.block_size
    for op in ops:
        if op[0] in ("add", "burst"):
            for add in (op[1] if op[0] == "burst" else [op]):
                assert h.add(*make_request(bases, add, capacity))
        elif op[0] == "step":
            for _ in range(op[1]):
                h.step()
        else:
            h.abort(op[1])
    h.drain()


@pytest.mark.parametrize("prefix_caching", ["hash", "radix"])
@settings(max_examples=100, deadline=None)
@given(bs=st.sampled_from(BLOCK_SIZES), chunked=st.booleans(), caching=st.booleans(),
       policy=st.sampled_from(("continuous", "static")), seed=st.integers(0, 2**16),
       len_a=st.integers(1, MAX_PROMPT), len_b=st.integers(1, MAX_PROMPT), shared=st.integers(0, MAX_LEN),
       new_a=st.integers(1, MAX_NEW), new_b=st.integers(1, MAX_NEW))
def test_prefix_hit_after_a_finished_request_is_exact(prefix_caching, bs, chunked, caching, policy, seed,
                                                      len_a, len_b, shared, new_a, new_b) -> None:
    """With room to spare (nothing evicted), a request that shares a prefix with a finished one
    is credited with exactly the full blocks of that prefix whose K/V was computed (the radix
    cache: exactly the tokens)."""
    rng = random.Random(seed)
    prompt_a = [rng.randrange(ALPHABET) for _ in range(len_a)]
    full_a = prompt_a + reference_output(tuple(prompt_a), new_a)
    # B follows A's prompt and outputs for `shared` tokens, then goes its own way
    prompt_b = (full_a[:shared] + [rng.randrange(ALPHABET) for _ in range(len_b)])[:len_b]
    num_blocks = ceil_div(len_a + new_a, bs) + ceil_div(len_b + new_b, bs) + 1
    budget = 4 if chunked else MAX_LEN
    h = Harness(Config(bs, num_blocks, 4, budget, chunked, caching, policy, prefix_caching))
    assert h.add(prompt_a, new_a)
    h.drain()
    a = h.seqs["r0"]
    assert a.output_token_ids == full_a[len_a:]
    assert h.add(prompt_b, new_b)
    h.step()
    b = h.seqs["r1"]
    common = 0
    while common < min(len(full_a), len(prompt_b)) and full_a[common] == prompt_b[common]:
        common += 1
    # A's last token was sampled but never run, so its K/V was never computed; B's last token must run
    hit = min(common, len(full_a) - 1, len(prompt_b) - 1) if caching else 0
    assert b.num_cached_tokens == (hit if prefix_caching == "radix" else hit // bs * bs)
    h.drain()
    assert h.seqs["r1"].output_token_ids == reference_output(tuple(prompt_b), new_b)


def test_pop_free_blocks_takes_the_least_recently_freed_and_evicts_what_they_cached():
    """Hand-checked: a request's blocks go back tail first, behind the never-used ones; taking five
    blocks takes the never-used ones, then the tail, evicting only what was cached."""
    bm = BlockManager(6, 2, enable_prefix_caching=True)
    a = Sequence("a", [1, 2, 3, 4, 5], SamplingParams())
    bm.allocate(a, [])
    bm.append_slots(a, 5)  # blocks 0, 1 (full, cached) and 2 (one token)
    bm.free(a)  # free queue: 3, 4, 5, then the tail first: 2, 1, 0
    bm.drain_events()
    assert bm.pop_free_blocks(5) == [3, 4, 5, 2, 1]
    events = bm.drain_events()
    assert events.allocated == [3, 4, 5, 2, 1] and events.evicted == [1]
    assert [bm.blocks[b].block_hash for b in (2, 1)] == [None, None]
    assert bm.find_cached_prefix(Sequence("b", [1, 2, 9], SamplingParams())) == [0]  # block 0 still cached
    assert bm.num_cached_free_blocks == 1
    with pytest.raises(RuntimeError, match="2 blocks asked, 1 free"):
        bm.pop_free_blocks(2)


def test_release_blocks_frees_only_the_blocks_no_one_holds_any_more():
    """Hand-checked: two requests share a cached prefix block; releasing one request's table keeps
    the shared block, queues the others in the order given, and counts the cached one."""
    bm = BlockManager(4, 2, enable_prefix_caching=True)
    a = Sequence("a", [1, 2, 3], SamplingParams())
    bm.allocate(a, [])
    bm.append_slots(a, 3)  # blocks 0 (full, cached) and 1 (one token)
    b = Sequence("b", [1, 2, 7], SamplingParams())
    hits = bm.find_cached_prefix(b)
    assert hits == [0]
    bm.allocate(b, hits)
    bm.append_slots(b, 1)  # block 2
    bm.drain_events()
    bm.release_blocks(a.block_table[::-1])
    assert [bm.blocks[i].ref_count for i in range(4)] == [1, 0, 1, 0]
    assert list(bm.free_queue) == [3, 1] and bm.drain_events().freed == [1]
    assert bm.num_cached_free_blocks == 0  # block 1 was never full, so never cached
    bm.release_blocks(b.block_table[::-1])
    assert list(bm.free_queue) == [3, 1, 2, 0] and bm.num_cached_free_blocks == 1
    with pytest.raises(ValueError, match="block_id=0 has no reference to drop"):
        bm.release_blocks([0])
