"""The check of exercise 12: the radix tree's match and insert.

The learner subclasses the engine's `RadixBlockManager` and writes its two tree operations:

* **match**, ``find_cached_prefix(seq)``: walk the tree from the root, token by token, and return the
  blocks of the longest cached prefix (its last block possibly matched only in part: the manager
  copies that part);
* **insert**, ``insert(seq, start, stop)`` with ``add_node(block_id, parent_id, first_token)``:
  put a request's newly computed tokens in the tree, a node per block, each under the block before it.

Everything else (allocation, the copies, readiness, eviction, hashes) stays the stock manager's. The
check runs the learner's class inside the real engine (``LLM(..., block_manager_class=cls)``) on
seeded random workloads made to part prompts inside blocks (copies), repeat and extend earlier
prompts and outputs (multi-turn), admit equal prompts together (equal siblings), split prompts into
chunks (a copy may only read K/V an earlier step computed) and overflow a small cache (eviction). The
reference is the stock `RadixBlockManager` on the same requests. After every step:

1. finished and waiting requests hold no blocks, and `RadixBlockManager.check_invariants` holds
   (called on the stock class, so a subclass cannot replace it);
2. the scheduler made the reference's decisions (which request ran which tokens, preemptions), with
   as many prefix-cache block hits and the same K/V copies (which request, how many tokens);
3. the tree holds the same prefixes as the reference's (compared by tokens, not block ids);

and at the end every request generated the reference's greedy tokens.
"""
from __future__ import annotations

import functools
import inspect
import random
import traceback
from collections import Counter
from dataclasses import dataclass, field

from minivllm.course.checks.base import (CheckFailed, CheckResult, check_model_folder, quiet_engine_logs, run_stages,
                                         token_mismatch, torch_threads)
from minivllm.sampling_params import SamplingParams

RT_ENGINE_SETTINGS = dict(block_size=4, num_kv_blocks=32, max_model_len=128, max_num_seqs=6,
                          max_num_batched_tokens=24, seed=0)
RT_SEEDS = (0, 1, 2, 3, 4)  # one random workload per seed
# two workloads also speculate (n-gram drafts): a chunk's known tokens are inserted first, its accepted
# drafts a step later, into the same block
RT_NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
RT_SPECULATIVE = {2: RT_NGRAM, 4: RT_NGRAM}
RT_ARRIVAL_STEPS = 24  # requests arrive during the first steps of each workload
RT_MAX_TOKENS = (4, 24)  # each request generates so many tokens (inclusive)


@dataclass(frozen=True)
class Arrival:
    step: int
    request_id: str
    prompt: tuple[int, ...]
    max_tokens: int


@dataclass
class RadixRun:
    """One workload through the engine, step by step, as the check compares it."""

    arrivals: list[Arrival]
    chunks: list[dict] = field(default_factory=list)  # per step: request id -> (start, num_tokens)
    preempted: list[tuple[str, ...]] = field(default_factory=list)
    hits: list[int] = field(default_factory=list)  # per step: prefix-cache blocks shared
    evicted: list[int] = field(default_factory=list)  # per step: cached blocks evicted
    copies: list[list[tuple[str, int]]] = field(default_factory=list)  # per step: (request id, tokens copied)
    trees: list[Counter] = field(default_factory=list)  # per step: the tree's prefixes
    output_tokens: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_copies(self) -> int:
        return sum(len(c) for c in self.copies)

    @property
    def num_hits(self) -> int:
        return sum(self.hits)

    @property
    def num_evictions(self) -> int:
        return sum(self.evicted)

    @property
    def num_preemptions(self) -> int:
        return sum(len(p) for p in self.preempted)


def tree_prefixes(bm) -> Counter:
    """The tree as a multiset of the prefixes its nodes end: each node's tokens after its ancestors'.
    Block ids do not enter, so two trees that hold the same K/V compare equal."""
    prefixes: Counter = Counter()
    stack = [(bm.root, ())]
    while stack:
        node, above = stack.pop()
        for group in node.children.values():
            for child in group:
                tokens = above + tuple(bm.blocks[child.block_id].token_ids)
                prefixes[tokens] += 1
                stack.append((child, tokens))
    return prefixes


def tree_lines(bm, decode=None) -> list[str]:
    """The tree drawn as text, one node a line: ``block 3 [5 6 99 98]`` under its parent, indented.
    ``decode`` (token ids -> str) shows each block's text instead of its ids."""
    lines: list[str] = []

    def walk(node, indent: str) -> None:
        children = [c for group in node.children.values() for c in group]
        for k, child in enumerate(children):
            last = k == len(children) - 1
            tokens = bm.blocks[child.block_id].token_ids
            shown = repr(decode(list(tokens))) if decode else "[" + " ".join(map(str, tokens)) + "]"
            full = "" if len(tokens) == bm.block_size else f"  ({len(tokens)} of {bm.block_size})"
            lines.append(f"{indent}{'└─ ' if last else '├─ '}block {child.block_id} {shown}{full}")
            walk(child, indent + ("   " if last else "│  "))

    lines.append("root")
    walk(bm.root, "")
    return lines


def _learner_method(cls: type, exc: BaseException) -> str:
    """The innermost method of ``cls`` that is not the stock `RadixBlockManager`'s that ``exc`` passed
    through."""
    from minivllm.core.radix_block_manager import RadixBlockManager

    own = {f.__code__: name for c in cls.__mro__ if c not in RadixBlockManager.__mro__
           for name, f in vars(c).items() if inspect.isfunction(f)}
    names = [own[frame.f_code] for frame, _ in traceback.walk_tb(exc.__traceback__) if frame.f_code in own]
    return f"{names[-1]}()" if names else "the engine"


def _make_prompt(rng: random.Random, vocab: int, history: list[tuple[int, ...]], outputs: list[list[int]]) -> tuple:
    """A prompt that shares a prefix with earlier ones in one of the ways chats and agents do."""
    fresh = lambda n: tuple(rng.randrange(1, vocab) for _ in range(n))  # noqa: E731
    kind = rng.random()
    if not history or kind < 0.15:  # a new conversation
        return fresh(rng.randint(6, 22))
    base = rng.choice(history)
    if kind < 0.35:  # the same prompt again (an equal sibling when admitted with the first)
        return base
    if kind < 0.6 and outputs:  # a follow-up: an earlier prompt, its answer, a new message
        i = rng.randrange(len(outputs))
        return history[i] + tuple(outputs[i]) + fresh(rng.randint(1, 9))
    cut = rng.randint(1, len(base))  # the two part anywhere, often inside a block
    return base[:cut] + fresh(rng.randint(1, 12))


def _run(cls: type, seed: int, reference: RadixRun | None = None) -> RadixRun:
    """Run workload ``seed`` with ``cls`` as the engine's block manager. Without a ``reference`` the
    arrivals are drawn as the run goes (follow-ups extend finished requests' outputs); with one, its
    arrivals are replayed and every step is compared with it. Raises `CheckFailed` at the first
    difference."""
    from minivllm import LLM
    from minivllm.core.radix_block_manager import RadixBlockManager

    try:
        with check_model_folder() as folder, quiet_engine_logs():
            llm = LLM(folder, block_manager_class=cls, speculative_config=RT_SPECULATIVE.get(seed),
                      **RT_ENGINE_SETTINGS)
    except ValueError as e:  # not a BlockManagerBase subclass: the message names the field
        raise CheckFailed(str(e)) from None
    except Exception as e:
        raise CheckFailed(f"the engine could not build your block manager: {type(e).__name__}: {e}") from None
    engine = llm.llm_engine
    bm = engine.block_manager
    if not isinstance(bm, RadixBlockManager):
        raise CheckFailed(f"{cls.__name__} does not subclass RadixBlockManager: the check needs the stock "
                          "manager around your match and insert")
    copies: list = []
    schedule = engine.scheduler.schedule

    def recording_schedule(*args, **kwargs):
        out = schedule(*args, **kwargs)
        owner = {b: c.seq.request_id for c in out.chunks for b in c.seq.block_table}
        copies.append(sorted((owner.get(c.dst_block, "?"), c.num_tokens) for c in out.kv_copies))
        return out

    engine.scheduler.schedule = recording_schedule
    rng = random.Random(f"radix-check-{seed}")
    vocab = engine.model_config.vocab_size
    run = RadixRun(list(reference.arrivals) if reference else [])
    history: list[tuple[int, ...]] = []
    finished: list[tuple[tuple[int, ...], list[int]]] = []
    params = {}
    step = 0
    where = f"workload {seed}"
    while step < RT_ARRIVAL_STEPS or engine.has_unfinished_requests():
        if reference is None and step < RT_ARRIVAL_STEPS and rng.random() < 0.45:
            for k in range(rng.choice((1, 1, 2, 3))):
                if k and rng.random() < 0.6:  # from the prompt just before, admitted in the same step
                    prompt = _make_prompt(rng, vocab, [history[-1]], [])
                else:
                    prompt = _make_prompt(rng, vocab, history + [p for p, _ in finished],
                                          [o for _, o in finished])
                prompt = prompt[:RT_ENGINE_SETTINGS["max_model_len"] - 12]
                run.arrivals.append(Arrival(step, f"s{seed}-{len(run.arrivals)}", prompt, rng.randint(*RT_MAX_TOKENS)))
                history.append(prompt)
        for a in run.arrivals:
            if a.step == step:
                params[a.request_id] = a
                engine.add_request(a.request_id, {"prompt_token_ids": list(a.prompt)},
                                   SamplingParams(temperature=0, max_tokens=a.max_tokens, ignore_eos=True))
        if reference is not None and step >= len(reference.chunks):
            raise CheckFailed(f"{where}, after step {step - 1}: the reference had finished every request; "
                              f"with your tree some are still unfinished")
        try:
            for out in engine.step():
                if out.finished:
                    run.output_tokens[out.request_id] = list(out.outputs[0].token_ids)
                    finished.append((params[out.request_id].prompt, list(out.outputs[0].token_ids)))
        except NotImplementedError as e:
            raise CheckFailed(f"{where}, step {step}: {_learner_method(cls, e)} raised NotImplementedError: "
                              "replace `# YOUR CODE HERE` and `raise NotImplementedError` with your code") from None
        except Exception as e:  # the learner's bug is the finding, not a crash of the check
            why = (": your match served every token of a request, but its last token must run through the "
                   "model (it gives the next token's logits)") if "num_new_tokens=0" in str(e) else ""
            raise CheckFailed(f"{where}, step {step}: {_learner_method(cls, e)} raised {type(e).__name__}: "
                              f"{e}{why}") from None
        record = engine.trace[-1]
        run.chunks.append({c.request_id: (c.start, c.num_tokens) for c in record.chunks})
        run.preempted.append(record.preempted)
        run.hits.append(len(record.blocks_cache_hit))
        run.evicted.append(len(record.blocks_evicted))
        run.copies.append(copies[-1])
        _check_state(bm, engine, where, step)
        run.trees.append(tree_prefixes(bm))
        if reference is not None:
            _compare_step(run, reference, step, where)
        step += 1
    return run


def _check_state(bm, engine, where: str, step: int) -> None:
    from minivllm.core.radix_block_manager import RadixBlockManager
    from minivllm.core.sequence import SequenceStatus

    for rid, seq in engine.requests.items():
        if seq.status is not SequenceStatus.RUNNING and seq.block_table:
            raise CheckFailed(f"{where}, after step {step}: request {rid} is {seq.status.value} but holds "
                              f"blocks {seq.block_table}")
    running = list(engine.scheduler.running)
    try:
        RadixBlockManager.check_invariants(bm, running)
    except AssertionError as e:
        raise CheckFailed(f"{where}, after step {step}: the invariant check failed: {e}") from None
    except Exception as e:
        raise CheckFailed(f"{where}, after step {step}: the tree is malformed ({type(e).__name__}: {e})") from None


def _span(chunk: tuple[int, int] | None) -> str:
    if chunk is None:
        return "not at all"
    start, n = chunk
    return f"on token {start}" if n == 1 else f"on tokens {start}-{start + n - 1}"


def _prefix_words(prefix: tuple[int, ...], bs: int) -> str:
    full, rest = divmod(len(prefix), bs)
    ends = list(prefix[len(prefix) - (rest or bs):])
    return f"the node {ends} at depth {len(prefix) - len(ends)} ({full} full block{'s' if full != 1 else ''} before it)" \
        if rest == 0 else f"the node {ends} ({rest} of {bs} tokens) after {full} full block{'s' if full != 1 else ''}"


def _compare_step(mine: RadixRun, ref: RadixRun, step: int, where: str) -> None:
    ca, cb = mine.chunks[step], ref.chunks[step]
    at = f"{where}, step {step}"
    if mine.preempted[step] != ref.preempted[step]:
        raise CheckFailed(f"{at}: the scheduler preempted {list(mine.preempted[step])} with your tree, "
                          f"{list(ref.preempted[step])} with the reference")
    for rid in list(cb) + [r for r in ca if r not in cb]:
        if ca.get(rid) != cb.get(rid):
            hint = ""
            if ca.get(rid) and cb.get(rid) and ca[rid][0] != cb[rid][0]:
                hint = (f": the prefix cache served it {ca[rid][0]} tokens with your tree, {cb[rid][0]} with the "
                        "reference")
            raise CheckFailed(f"{at}: the scheduler ran request {rid} {_span(ca.get(rid))} with your tree, "
                              f"{_span(cb.get(rid))} with the reference{hint}")
    if mine.copies[step] != ref.copies[step]:
        words = lambda cs: ", ".join(f"{n} tokens for {r}" for r, n in cs) or "none"  # noqa: E731
        raise CheckFailed(f"{at}: K/V copies of a partly matched block: {words(mine.copies[step])} with your tree, "
                          f"{words(ref.copies[step])} with the reference")
    if mine.hits[step] != ref.hits[step]:
        raise CheckFailed(f"{at}: {mine.hits[step]} blocks shared from the cache with your tree, {ref.hits[step]} "
                          "with the reference")
    if mine.trees[step] != ref.trees[step]:
        bs = RT_ENGINE_SETTINGS["block_size"]
        extra, missing = mine.trees[step] - ref.trees[step], ref.trees[step] - mine.trees[step]
        if missing:
            raise CheckFailed(f"{at}: the reference tree has {_prefix_words(min(missing, key=len), bs)}, "
                              "your tree does not")
        raise CheckFailed(f"{at}: your tree has {_prefix_words(min(extra, key=len), bs)}, the reference tree "
                          "does not")


@functools.lru_cache(maxsize=None)
def reference_run(seed: int) -> RadixRun:
    """Workload ``seed`` through the stock `RadixBlockManager`: the reference, once per process."""
    from minivllm.core.radix_block_manager import RadixBlockManager

    with torch_threads(1):  # the course model is small: one thread runs it fastest on a shared machine
        return _run(RadixBlockManager, seed)


def _stage_steps(cls: type, runs: dict) -> str:
    refs = [reference_run(s) for s in RT_SEEDS]
    with torch_threads(1):
        for seed, ref in zip(RT_SEEDS, refs):
            runs[seed] = _run(cls, seed, ref)
    n = lambda attr: sum(getattr(r, attr) for r in refs)  # noqa: E731
    return (f"{len(refs)} random workloads, {sum(len(r.arrivals) for r in refs)} requests, "
            f"{sum(len(r.chunks) for r in refs)} engine steps with your tree: after every step the invariants "
            f"held and the tree, the scheduler's decisions, the cache hits and the copies were the reference's "
            f"({n('num_hits')} blocks shared, {n('num_copies')} partly matched blocks copied, "
            f"{n('num_evictions')} evicted, {n('num_preemptions')} preemptions)")


def _stage_tokens(runs: dict) -> str:
    count = 0
    for seed in RT_SEEDS:
        ref = reference_run(seed)
        for a in ref.arrivals:
            diff = token_mismatch(runs[seed].output_tokens.get(a.request_id, []), ref.output_tokens[a.request_id],
                                  "with your tree", "with the reference")
            if diff:
                raise CheckFailed(f"workload {seed}, request {a.request_id}: {diff}, so the model read K/V that "
                                  "does not hold this request's tokens")
            count += 1
    return f"all {count} requests generated the reference's greedy tokens"


def check_radix_tree(cls: type, *, verbose: bool = True) -> CheckResult:
    """Exercise 12: ``cls`` subclasses `RadixBlockManager` with the learner's match
    (``find_cached_prefix``) and insert (``insert``, ``add_node``); see the module's docstring."""
    runs: dict[int, RadixRun] = {}
    return run_stages("check_radix_tree", [lambda: _stage_steps(cls, runs), lambda: _stage_tokens(runs)], verbose)
