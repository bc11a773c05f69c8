"""The check of exercise 10: the KV connector's receive side, run between two real engine processes."""
from __future__ import annotations

import functools
from typing import Callable

import torch

from minivllm.course.checks.base import (CheckFailed, CheckResult, check_model_folder, is_not_implemented,
                                         learner_module, learner_module_folder, learner_source, quiet_engine_logs,
                                         run_stages, token_mismatch)
from minivllm.sampling_params import SamplingParams

# The learner writes the two per-request parts of the decode instance's `KVReceiver`
# (`minivllm.disagg.worker_side`): ``plan_load(self, request_id, num_prompt_tokens, num_cached_tokens,
# block_table, block_size)``, the `KVLoad` of a request just admitted (the positions the local prefix
# cache lacks and the slots they go into), and ``load_layers(self, load)``, receiving one tensor
# ``[2, positions, kv_heads, head_dim]`` per layer (``self.recv_layer(buf)``) into those slots.
#
# 1. ``plan_load`` on hand-made block tables against the positions and slots worked out by hand;
# 2. ``load_layers`` in this process against a fake link that hands it known tensors: the cache must
#    change in the load's slots only, each layer and each of K and V in its place;
# 3. both, as a `KVReceiver` subclass (``DisaggregatedLLM(kv_receiver_class=...)``), in the decode
#    instance of a real prefill/decode pair on the course model: greedy tokens equal to one `LLM`,
#    each transfer's positions (decode-side prefix-cache hits skipped) and bytes equal to the formula.
#    As in exercise 08, the decode process is spawned and cannot import ``__main__``: the check writes
#    the functions' *source* into a module of its own after `KV_RECEIVER_NAMESPACE` (`base.learner_module`).

KV_RECEIVER_NAMESPACE = ("import torch\nfrom minivllm.disagg.scheduler_side import KVLoad\n"
                         "from minivllm.disagg.worker_side import KVReceiver\n")
# (what the case is, prompt tokens, cached tokens, block table, block size); none is the notebook's example
PLAN_CASES = [
    ("a 19-token prompt in blocks [5, 2, 9] of 8, nothing cached", 19, 0, [5, 2, 9], 8),
    ("a 16-token prompt filling blocks [3, 1] of 8, a third block [4] allocated for the next token", 16, 0,
     [3, 1, 4], 8),
    ("a 19-token prompt in blocks [5, 2, 9] of 8, the first 8 tokens cached on the decode side", 19, 8,
     [5, 2, 9], 8),
    ("a 26-token prompt in blocks [0, 7, 3, 6] of 8, the first 16 cached", 26, 16, [0, 7, 3, 6], 8),
    ("a 1-token prompt in block [6] of 4", 1, 0, [6], 4),
    ("a 10-token prompt in blocks [2, 8, 1] of 4, the first 8 cached", 10, 8, [2, 8, 1], 4),
]
# the fake link: a cache of 12 blocks of 4 slots, 3 layers, 2 KV heads of size 4
FAKE_LAYERS, FAKE_BLOCKS, FAKE_BLOCK_SIZE, FAKE_HEADS, FAKE_DIM = 3, 12, 4, 2, 4
LOAD_CASES = [  # (what, first position, prompt tokens, block table)
    ("a 10-token prompt in blocks [7, 2, 10], nothing cached", 0, 10, [7, 2, 10]),
    ("a 13-token prompt in blocks [1, 9, 4, 5], the first 8 cached", 8, 13, [1, 9, 4, 5]),
]
ENGINE_BLOCK_SIZE = 8
ENGINE_ARGS = dict(block_size=ENGINE_BLOCK_SIZE, kv_cache_memory=16 << 20, seed=0)
ENGINE_MAX_TOKENS = [10, 8, 12, 1, 9]  # the 1: a request that ends with its first token, on the prefill side
ENGINE_PROMPTS = [
    "def fibonacci(n):",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)",
    "The engine schedules every request in small steps while the cache keeps the keys and values of every "
    "token it has seen so far, block by block, until the request finishes.",
    "import os\nimport sys\n\n\ndef main():",
    "for i in range(10):\n    print(i)",
]
LONG = 2  # the prompt the second batch shares prefixes with
SHARED = (21, 40)  # tokens of it that the second batch's two prompts start with: 16 and 40 cached (blocks of 8)
ENGINE_TIMEOUT_S = 30.0


def _skeleton(fn_name: str) -> str:
    return f"{fn_name}() raised NotImplementedError: replace `# YOUR CODE HERE` and `raise NotImplementedError` with your code"


NAME_HINT = (" (the check runs your functions from their source, alone in a module, as the decode process "
             "does: they may use torch, KVLoad, KVReceiver and self, and no other name of your notebook)")


def _name_hint(e: BaseException) -> str:
    return NAME_HINT if isinstance(e, NameError) else ""


def reference_slots(block_table: list[int], first: int, end: int, block_size: int) -> list[int]:
    return [block_table[p // block_size] * block_size + p % block_size for p in range(first, end)]


def _stage_plan(cls: type) -> str:
    from minivllm.disagg.scheduler_side import KVLoad

    receiver = cls(torch.zeros(2, 1, 1, 1, 1), torch.device("cpu"))
    for what, n, cached, table, bs in PLAN_CASES:
        try:
            got = receiver.plan_load("3", n, cached, list(table), bs)
        except Exception as e:  # the learner's bug is the finding
            if is_not_implemented(e):
                raise CheckFailed(_skeleton("plan_load")) from None
            raise CheckFailed(f"{what}: plan_load raised {type(e).__name__}: {e}{_name_hint(e)}") from None
        if not isinstance(got, KVLoad):
            raise CheckFailed(f"{what}: plan_load returned {type(got).__name__}; it must return a KVLoad")
        call = f"{what}: plan_load('3', {n}, {cached}, {table}, {bs})"
        if got.request_id != "3" or got.num_prompt_tokens != n:
            raise CheckFailed(f"{call} has request_id={got.request_id!r}, num_prompt_tokens={got.num_prompt_tokens}; "
                              f"expected '3' and {n}")
        if got.first_position != cached:
            if cached and got.first_position == 0:
                raise CheckFailed(f"prefix-cache hits asked for again: {call} asks for positions from 0, but the decode "
                                  f"instance's own prefix cache holds the first {cached}: ask only for positions "
                                  f"{cached}-{n - 1} (first_position = num_cached_tokens)")
            raise CheckFailed(f"{call} has first_position={got.first_position}; the positions the decode side lacks "
                              f"start at {cached}")
        want = reference_slots(table, cached, n, bs)
        slots = list(got.slots)
        if slots != want:
            if len(slots) != len(want):
                raise CheckFailed(f"{call} has {len(slots)} slots for the {n - cached} positions {cached}-{n - 1}; "
                                  "one slot per position sent")
            if slots == list(range(cached, n)):
                raise CheckFailed(f"positions used as slots: {call} gives position p slot p; position p lives in block "
                                  f"block_table[p // block_size], at offset p % block_size: slot {want[0]} for "
                                  f"position {cached}")
            start = table[cached // bs] * bs + cached % bs
            if slots == list(range(start, start + n - cached)):
                raise CheckFailed(f"contiguous blocks assumed: {call} counts on from slot {start}, but the next "
                                  f"block is {table[cached // bs + 1]}, not {table[cached // bs] + 1}: look each "
                                  "position's block up in the block table")
            i = next(k for k, (a, b) in enumerate(zip(slots, want)) if a != b)
            p = cached + i
            raise CheckFailed(f"{call}: position {p} goes to slot {want[i]} (block {table[p // bs]}, offset "
                              f"{p % bs}); yours is {slots[i]}")
        want_blocks = tuple(table[cached // bs:-(-n // bs)])
        if tuple(got.block_ids) != want_blocks:
            extra = set(got.block_ids) - set(want_blocks)
            if extra and set(table[-(-n // bs):]) & extra:
                raise CheckFailed(f"{call} has block_ids {tuple(got.block_ids)}: block {sorted(extra)[0]} was allocated "
                                  f"for the next token, not for the prompt; the prompt's blocks are {want_blocks}")
            if extra and set(table[:cached // bs]) & extra:
                raise CheckFailed(f"{call} has block_ids {tuple(got.block_ids)}: the cached blocks receive nothing; "
                                  f"the blocks the sent positions go into are {want_blocks}")
            raise CheckFailed(f"{call} has block_ids {tuple(got.block_ids)}; the blocks of positions {cached}-{n - 1} "
                              f"are {want_blocks}")
    return (f"plan_load asks only for the positions the decode side's prefix cache lacks, with their slots and "
            f"blocks, in {len(PLAN_CASES)} block tables (prompts that cut blocks, cached prefixes)")


class _LinkMisuse(Exception):
    pass


def _stage_load(cls: type) -> str:
    from minivllm.disagg.scheduler_side import kv_load

    shape = (2, FAKE_LAYERS, FAKE_BLOCKS * FAKE_BLOCK_SIZE, FAKE_HEADS, FAKE_DIM)
    g = torch.Generator().manual_seed(1010)
    for what, first, n, table in LOAD_CASES:
        load = kv_load("4", n, first, table, FAKE_BLOCK_SIZE)
        count = len(load.slots)
        sent = [torch.randn(2, count, FAKE_HEADS, FAKE_DIM, generator=g) for _ in range(FAKE_LAYERS)]
        before = torch.randn(*shape, generator=g)
        calls: list[tuple] = []

        def recv_layer(self, buf):
            calls.append(tuple(buf.shape))
            want = (2, count, FAKE_HEADS, FAKE_DIM)
            if tuple(buf.shape) != want:
                hint = (" K and V of a layer travel together, K first: [2, positions, kv_heads, head_dim]"
                        if tuple(buf.shape) == want[1:] else "")
                raise _LinkMisuse(f"{what}: recv_layer got a buffer of shape {list(buf.shape)}; the prefill instance "
                                  f"sends one tensor of shape {list(want)} per layer.{hint}")
            if buf.dtype != self.kv_cache.dtype:
                raise _LinkMisuse(f"{what}: recv_layer got a {buf.dtype} buffer; the K/V travels as the cache's dtype, "
                                  f"{self.kv_cache.dtype}")
            if len(calls) > FAKE_LAYERS:
                raise _LinkMisuse(f"{what}: recv_layer called more than {FAKE_LAYERS} times; the prefill instance "
                                  f"sends one tensor per layer ({FAKE_LAYERS} layers)")
            buf.copy_(sent[len(calls) - 1])

        fake = type("FakeLinkReceiver", (cls,), {"recv_layer": recv_layer})
        receiver = fake(before.clone(), torch.device("cpu"))
        try:
            num_bytes = receiver.load_layers(load)
        except _LinkMisuse as e:
            raise CheckFailed(str(e)) from None
        except Exception as e:
            if is_not_implemented(e):
                raise CheckFailed(_skeleton("load_layers")) from None
            raise CheckFailed(f"{what}: load_layers raised {type(e).__name__}: {e}{_name_hint(e)}") from None
        if len(calls) != FAKE_LAYERS:
            raise CheckFailed(f"{what}: load_layers called recv_layer {len(calls)} times; the prefill instance sends "
                              f"one tensor per layer, {FAKE_LAYERS} here, and waits until each is received")
        cache = receiver.kv_cache
        want = before.clone()
        index = torch.tensor(load.slots)
        for layer in range(FAKE_LAYERS):
            want[:, layer, index] = sent[layer]
        if not torch.equal(cache, want):
            if torch.equal(cache, before):
                raise CheckFailed(f"{what}: the cache is unchanged after load_layers: indexing with a list or tensor "
                                  "of slots makes a copy, so kv_cache[:, layer, index].copy_(buf) writes into the "
                                  "copy; assign instead: kv_cache[:, layer, index] = buf")
            others = torch.ones(shape[2], dtype=torch.bool)
            others[index] = False
            if not torch.equal(cache[:, :, others], before[:, :, others]):
                changed = [s for s in range(shape[2]) if others[s] and not torch.equal(cache[:, :, s], before[:, :, s])]
                raise CheckFailed(f"{what}: load_layers wrote into slot {changed[0]}, which is not one of the load's "
                                  f"slots {load.slots}: that slot holds another request's (or a cached block's) K/V")
            if torch.equal(cache[:, 0, index], sent[-1]) and all(
                    torch.equal(cache[:, layer, index], before[:, layer, index]) for layer in range(1, FAKE_LAYERS)):
                raise CheckFailed(f"{what}: every layer's K/V landed in layer 0: tensor number l that arrives is "
                                  "layer l's, and goes into kv_cache[:, l, slots]")
            if all(torch.equal(cache[0, layer, index], sent[layer][1]) for layer in range(FAKE_LAYERS)):
                raise CheckFailed(f"{what}: K and V swapped: the received tensor holds K at [0] and V at [1], as the "
                                  "cache does (kv_cache[0] is K)")
            for layer in range(FAKE_LAYERS):
                for kv in range(2):
                    for i, s in enumerate(load.slots):
                        if not torch.equal(cache[kv, layer, s], sent[layer][kv, i]):
                            raise CheckFailed(
                                f"{what}: layer {layer}'s {'KV'[kv]} of position {first + i} should be in slot {s} "
                                f"(the {i}th of the load's slots) but is not")
        per_token = 2 * FAKE_LAYERS * FAKE_HEADS * FAKE_DIM * before.element_size()
        if not isinstance(num_bytes, int) or num_bytes != count * per_token:
            raise CheckFailed(f"{what}: load_layers returned {num_bytes!r}; it received {FAKE_LAYERS} layers x 2 (K, V) "
                              f"x {count} positions x {FAKE_HEADS} KV heads x {FAKE_DIM} x {before.element_size()} "
                              f"bytes = {count * per_token} bytes")
    return (f"load_layers, on a fake link, writes each of {FAKE_LAYERS} layers' K and V into the load's slots and "
            f"nowhere else, and returns the bytes received, in {len(LOAD_CASES)} loads")


def learner_receiver_class(plan_load: Callable, load_layers: Callable, folder: str) -> type:
    """A `KVReceiver` subclass with the learner's two methods, rebuilt from their source as a module in
    ``folder`` (see `learner_module`), so that the decode process can import it by name."""
    sources = [learner_source(plan_load, "plan_load"), learner_source(load_layers, "load_layers")]
    return learner_module(folder, "minivllm_learner_kv_receiver",
                          KV_RECEIVER_NAMESPACE + "\n\n" + "\n\n".join(sources) +
                          f"\n\nclass LearnerKVReceiver(KVReceiver):\n    plan_load = {plan_load.__name__}\n"
                          f"    load_layers = {load_layers.__name__}\n", "your functions").LearnerKVReceiver


def _batches(first_ids: list[list[int]]):
    """The second batch: two prompts that start with SHARED tokens of the long prompt (cached on both
    sides by then), then another prompt's tokens."""
    head = first_ids[LONG]
    prompts = [{"prompt_token_ids": head[:SHARED[0]] + first_ids[0]},
               {"prompt_token_ids": head[:SHARED[1]] + first_ids[3]}]
    return prompts, [SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)] * 2


def _stage_engine(cls: type) -> str:
    from minivllm import LLM
    from minivllm.disagg import DisaggregatedLLM, InstanceError

    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in ENGINE_MAX_TOKENS]
    with check_model_folder() as folder, quiet_engine_logs():
        with LLM(folder, **ENGINE_ARGS) as llm:
            want = llm.generate(ENGINE_PROMPTS, params, use_tqdm=False)
            more, more_params = _batches([o.prompt_token_ids for o in want])
            want_more = llm.generate(more, more_params, use_tqdm=False)
        try:
            with DisaggregatedLLM(folder, **ENGINE_ARGS, timeout_s=ENGINE_TIMEOUT_S, kv_receiver_class=cls) as dllm:
                got = dllm.generate(ENGINE_PROMPTS, params, use_tqdm=False)
                got_more = dllm.generate(more, more_params, use_tqdm=False)
                per_token = dllm.kv_bytes_per_token
        except InstanceError as e:
            last = [line for line in str(e).splitlines() if line.strip()]
            why = last[-2] if len(last) > 1 and last[-1].startswith(";") else last[-1]
            hint = NAME_HINT if "NameError" in str(e) else ""
            raise CheckFailed(f"between the two engine processes: {str(e).splitlines()[0]} ... {why.strip()}{hint}") from None
    for batch, (mine, stock) in enumerate(((got, want), (got_more, want_more)), 1):
        for k, (a, b) in enumerate(zip(mine, stock)):
            diff = token_mismatch(a.outputs[0].token_ids, b.outputs[0].token_ids, "disaggregated with your receiver",
                                  "from one LLM")
            if diff:
                raise CheckFailed(f"between the two engine processes, batch {batch}, prompt {k} "
                                  f"({len(b.prompt_token_ids)} tokens): {diff}: the decode instance attends over "
                                  "K/V your receiver put in its cache")
    hits = {0: [0] * 4, 1: [s // ENGINE_BLOCK_SIZE * ENGINE_BLOCK_SIZE for s in SHARED]}
    for batch, outs in enumerate((got, got_more)):
        went_on = [o for o in outs if len(o.outputs[0].token_ids) > 1]
        by_id = {t.request_id: t for t in outs.transfers}
        for k, (o, cached) in enumerate(zip(went_on, hits[batch])):
            t = by_id.get(o.request_id)
            n = len(o.prompt_token_ids)
            where = f"batch {batch + 1}, request {o.request_id} ({n} prompt tokens)"
            if t is None:
                raise CheckFailed(f"{where}: no transfer recorded")
            if t.first_position != cached:
                raise CheckFailed(f"{where}: the decode side asked for positions from {t.first_position}; its prefix "
                                  f"cache held the first {cached}, so it should ask from {cached}")
            if t.num_tokens != n - cached or t.num_bytes != (n - cached) * per_token:
                raise CheckFailed(f"{where}: {t.num_tokens} positions and {t.num_bytes} bytes recorded; the formula: "
                                  f"{n - cached} positions x {per_token} bytes per token (2 x layers x KV heads x "
                                  f"head size x 4) = {(n - cached) * per_token}")
            if t.num_blocks != -(-n // ENGINE_BLOCK_SIZE) - cached // ENGINE_BLOCK_SIZE:
                raise CheckFailed(f"{where}: the K/V went into {t.num_blocks} decode blocks {t.decode_block_ids}; "
                                  f"positions {cached}-{n - 1} span {-(-n // ENGINE_BLOCK_SIZE) - cached // ENGINE_BLOCK_SIZE}")
    num = len(got.transfers) + len(got_more.transfers)
    return (f"plugged into a real prefill/decode pair (kv_receiver_class=, two processes over gloo) on the course "
            f"model: greedy tokens of {len(ENGINE_PROMPTS) + len(more)} prompts equal one LLM's, and {num} transfers "
            f"move the formula's bytes, skipping decode-side prefix-cache hits of {SHARED[0] // 8 * 8} and "
            f"{SHARED[1] // 8 * 8} tokens")


def check_kv_receiver(plan_load: Callable, load_layers: Callable, *, verbose: bool = True) -> CheckResult:
    """Exercise 10: ``plan_load(self, request_id, num_prompt_tokens, num_cached_tokens, block_table,
    block_size)`` returns the `KVLoad` of a request the decode instance just admitted, and
    ``load_layers(self, load)`` receives its K/V (``self.recv_layer(buf)``, one tensor per layer) into
    ``self.kv_cache`` and returns the bytes received. Three stages (see the module)."""
    with learner_module_folder() as folder:
        build = functools.cache(lambda: learner_receiver_class(plan_load, load_layers, folder))
        return run_stages("check_kv_receiver", [lambda: _stage_plan(build()), lambda: _stage_load(build()),
                                                lambda: _stage_engine(build())], verbose)
