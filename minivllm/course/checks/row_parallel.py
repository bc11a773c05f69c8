"""The check of exercise 08: the row-parallel linear layer."""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from minivllm.course.checks.base import (ENGINE_PROMPTS, CheckFailed, CheckResult, check_model_folder,
                                         is_not_implemented, learner_module, learner_module_folder, learner_source,
                                         quiet_engine_logs, run_stages, token_mismatch)
from minivllm.sampling_params import SamplingParams

# The learner writes two functions: ``input_shard(x, rank, world_size)``, the slice of the layer's
# input that a rank multiplies, and ``row_parallel_forward(self, x)``, the forward of
# `minivllm.layers.linear.RowParallelLinear` on that slice. The forward becomes a subclass of the
# stock layer, plugged in as every learner's piece is, as an engine argument
# (``row_parallel_linear_class=``): the check runs it in two gloo processes, each rank loading its
# shard of the full weight with the stock ``weight_loader``, then in the engine with
# ``tensor_parallel_size=2``.
#
# Spawned processes cannot import a function defined in a notebook cell (``__main__``), so the check
# writes the forward's *source* into a module of its own (`base.learner_module`), after what the
# layer's own module imports (`ROW_PARALLEL_NAMESPACE`): the learner's function must use only those
# names. ``input_shard`` runs in this process, so it needs no such care.

ROW_PARALLEL_WORLD = 2
# (what the case is, input shape, output features, bias); none is the exercise notebook's own example.
ROW_PARALLEL_CASES = [
    ("1 token, 8 -> 4 features, no bias", (1, 8), 4, False),
    ("5 tokens, 16 -> 12 features, with bias", (5, 16), 12, True),
    ("2 x 3 tokens (a 3-D input), 32 -> 8 features, with bias", (2, 3, 32), 8, True),
    ("7 tokens, 64 -> 48 features, no bias", (7, 64), 48, False),
]
ROW_PARALLEL_NAMESPACE = "import torch\nimport torch.distributed as dist\nimport torch.nn.functional as F\n" \
                         "from torch import nn\nfrom minivllm.distributed.parallel_state import tensor_parallel_group\n"
ROW_PARALLEL_TIMEOUT_S = 60.0  # the whole run: two fresh processes import torch, then a few tiny matmuls
ROW_PARALLEL_STRAGGLER_S = 10.0  # once one rank has answered, how long the other may take
ROW_PARALLEL_RAISE_GRACE_S = 2.0  # once one rank has raised, how long the others may take to report theirs
ENGINE_SETTINGS = dict(max_model_len=256, max_num_seqs=8, seed=0, tensor_parallel_size=ROW_PARALLEL_WORLD)
ENGINE_MAX_TOKENS = 12


def _row_parallel_rank(rank: int, init_method: str, layer_class: type, cases: list, conn) -> None:
    """One rank of the check (runs in a spawned process): the learner's layer. Sends ``("done",
    [(output, all_reduce calls)] per case)`` or ``("raised", case, what, whether it is the skeleton's
    NotImplementedError)``."""
    import torch.distributed as dist

    from minivllm.distributed.comm import count_collectives

    torch.set_num_threads(1)
    case = None
    try:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=ROW_PARALLEL_WORLD)
        outputs = []
        for case, (x, weight, bias) in enumerate(cases):
            layer = layer_class(weight.shape[1], weight.shape[0], bias is not None, rank, ROW_PARALLEL_WORLD)
            layer.weight_loader(layer.weight, weight)
            if bias is not None:
                layer.weight_loader(layer.bias, bias)
            with count_collectives() as counts, torch.no_grad():
                y = layer(x)
            # numpy arrays travel by value; a tensor would travel as shared memory this process frees on exit
            outputs.append((y.numpy() if isinstance(y, torch.Tensor) else y, counts.get("all_reduce", [0, 0])[0]))
        conn.send(("done", outputs))
    except BaseException as e:  # the learner's bug is the finding: report it, never a bare traceback
        conn.send(("raised", case, f"{type(e).__name__}: {e}", is_not_implemented(e)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _row_parallel_data(case: tuple, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    _, shape, out_features, bias = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    weight = torch.randn(out_features, shape[-1], generator=g)
    return x, weight, torch.randn(out_features, generator=g) if bias else None


def _stage_input_shard(input_shard: Callable, cases: list) -> str:
    """Each rank's input slice must be the input features its weight shard multiplies: the stock
    ``weight_loader`` gives rank r the weight's columns r*k .. (r+1)*k - 1."""
    for (what, *_), (x, _, _) in zip(ROW_PARALLEL_CASES, cases):
        k = x.shape[-1] // ROW_PARALLEL_WORLD
        for rank in range(ROW_PARALLEL_WORLD):
            want = x[..., rank * k:(rank + 1) * k]
            try:
                got = input_shard(x.clone(), rank, ROW_PARALLEL_WORLD)
            except Exception as e:  # the learner's bug is the finding, not a crash of the check
                if is_not_implemented(e):
                    raise CheckFailed("input_shard() raised NotImplementedError: replace `# YOUR CODE HERE` and "
                                      "`raise NotImplementedError` with your code") from None
                raise CheckFailed(f"{what}: input_shard(x, rank={rank}, world_size={ROW_PARALLEL_WORLD}) raised "
                                  f"{type(e).__name__}: {e}") from None
            if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                shape = list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise CheckFailed(f"{what}: input_shard(x, rank={rank}, world_size={ROW_PARALLEL_WORLD}) is {shape} "
                                  f"for x of shape {list(x.shape)}; expected {list(want.shape)}: the last "
                                  f"dimension (input features) split in {ROW_PARALLEL_WORLD}")
            if not torch.equal(got, want):
                raise CheckFailed(
                    f"wrong shard slicing: {what}: input_shard(x, rank={rank}, world_size={ROW_PARALLEL_WORLD}) "
                    f"is not input features {rank * k}-{(rank + 1) * k - 1}, the weight columns rank {rank} holds "
                    f"(the stock weight_loader gives rank r the contiguous columns r*k .. (r+1)*k - 1)")
    return (f"input_shard gives each of {ROW_PARALLEL_WORLD} ranks the input features its weight shard "
            f"multiplies, in {len(cases)} shapes")


def learner_layer_class(forward: Callable, folder: str) -> type:
    """A `RowParallelLinear` subclass whose forward is ``forward``, rebuilt from its source as a module
    in ``folder`` (see `learner_module`), so that worker processes can import it by name."""
    source = learner_source(forward, "row_parallel_forward")
    return learner_module(folder, "minivllm_learner_row_parallel",
                          ROW_PARALLEL_NAMESPACE + "from minivllm.layers.linear import RowParallelLinear\n\n\n" +
                          source + f"\n\nclass LearnerRowParallelLinear(RowParallelLinear):\n"
                          f"    forward = {forward.__name__}\n",
                          "your row_parallel_forward").LearnerRowParallelLinear


def _run_ranks(layer_class: type, per_rank: list[list]) -> list[list]:
    """Run `_row_parallel_rank` in one spawned process per rank; each rank's [(output, calls)]."""
    import multiprocessing as mp
    import time
    from multiprocessing.connection import wait

    from minivllm.executor.multiproc import free_port, shutdown_workers

    ctx = mp.get_context("spawn")
    init_method = f"tcp://127.0.0.1:{free_port()}"
    conns, procs = [], []
    for rank in range(ROW_PARALLEL_WORLD):
        parent, child = ctx.Pipe()
        procs.append(ctx.Process(target=_row_parallel_rank, daemon=True,
                                 args=(rank, init_method, layer_class, per_rank[rank], child)))
        procs[-1].start()
        child.close()
        conns.append(parent)
    replies: dict[int, tuple] = {}
    deadline = time.monotonic() + ROW_PARALLEL_TIMEOUT_S
    first_raise = None  # when the first rank reported an exception
    try:
        while len(replies) < ROW_PARALLEL_WORLD:
            wait_until = deadline if first_raise is None else min(deadline, first_raise + ROW_PARALLEL_RAISE_GRACE_S)
            ready = wait([c for r, c in enumerate(conns) if r not in replies], max(0.0, wait_until - time.monotonic()))
            if not ready and first_raise is not None:
                break  # the others are still busy (or stuck): report what was raised
            if not ready:
                waiting = [r for r in range(ROW_PARALLEL_WORLD) if r not in replies]
                answered = f" after rank {next(iter(replies))} had finished" if replies else ""
                raise CheckFailed(
                    f"rank {waiting[0]} did not finish{answered}: it is waiting in a collective that the other rank "
                    f"never called (every rank must call dist.all_reduce the same number of times)")
            for conn in ready:
                rank = conns.index(conn)
                try:
                    replies[rank] = conn.recv()
                except EOFError:
                    raise CheckFailed(f"rank {rank}'s process died (exit code {procs[rank].exitcode}) while "
                                      "running your forward") from None
                if replies[rank][0] == "raised" and first_raise is None:
                    first_raise = time.monotonic()
            deadline = min(deadline, time.monotonic() + ROW_PARALLEL_STRAGGLER_S)
    finally:
        shutdown_workers(procs, conns)
    raised = sorted(r for r, reply in replies.items() if reply[0] == "raised")
    if raised:  # the lowest rank, so that ranks failing alike give the same message every run
        raise CheckFailed(_raised_words(raised[0], replies))
    return [replies[r][1] for r in range(ROW_PARALLEL_WORLD)]


def _raised_words(rank: int, replies: dict[int, tuple]) -> str:
    """What to tell the learner about the exception ``rank`` reported."""
    _, case, what, not_implemented = replies[rank]
    if not_implemented:
        return ("row_parallel_forward() raised NotImplementedError: replace `# YOUR CODE HERE` and "
                "`raise NotImplementedError` with your code")
    where = f"{ROW_PARALLEL_CASES[case][0]}: " if case is not None else ""
    done = [r for r, reply in replies.items() if reply[0] == "done"]
    if done:  # its peer had left: it was waiting in a collective the peer never called
        return (f"{where}rank {rank} was still waiting in a collective when rank {done[0]} had finished (every "
                "rank must call dist.all_reduce the same number of times)")
    hint = (" (the check runs your function from its source alone in fresh processes: it may use torch, dist, F, "
            "nn and tensor_parallel_group, and no other name of your notebook)" if what.startswith("NameError") else "")
    return f"{where}rank {rank}: your forward raised {what}{hint}"


def _stage_row_parallel_forward(layer_class: type, input_shard: Callable, cases: list) -> str:
    import numpy as np

    world = ROW_PARALLEL_WORLD
    per_rank = [[(input_shard(x.clone(), r, world), w, b) for x, w, b in cases] for r in range(world)]
    results = _run_ranks(layer_class, per_rank)
    for i, ((what, *_), (x, weight, bias)) in enumerate(zip(ROW_PARALLEL_CASES, cases)):
        want = F.linear(x, weight, bias)  # the unsplit layer
        for rank in range(world):
            got, calls = results[rank][i]
            got = torch.from_numpy(got) if isinstance(got, np.ndarray) else got
            if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                shape = list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise CheckFailed(f"{what}: rank {rank}'s output is {shape}, expected {list(want.shape)}")
            if torch.allclose(got, want, atol=1e-4, rtol=1e-4):
                continue
            if calls == 0:
                raise CheckFailed(f"missing all-reduce: {what}: rank {rank} never called dist.all_reduce, so its "
                                  "output is only its own partial sum; sum the ranks' partial outputs")
            if bias is not None and torch.allclose(got, want + (world - 1) * bias, atol=1e-4, rtol=1e-4):
                raise CheckFailed(f"bias added on every rank: {what}: the output holds the bias {world} times, "
                                  f"once per rank, as the all-reduce sums it too; add it on rank 0 only")
            d = int((got - want).abs().flatten().argmax())
            raise CheckFailed(f"{what}: rank {rank}'s output[{d}] (flattened) is {got.flatten()[d]:.5f}, the unsplit "
                              f"layer gives {want.flatten()[d]:.5f} (your forward called dist.all_reduce {calls} "
                              f"time{'s' * (calls != 1)})")
    return (f"in {world} gloo processes, the stock RowParallelLinear with your forward equals the unsplit "
            f"layer (F.linear on the full weight) on every rank, in {len(cases)} shapes with and without bias")


@functools.lru_cache(maxsize=1)
def stock_tensor_parallel_tokens() -> list[list[int]]:
    """Greedy tokens of `ENGINE_PROMPTS` from the engine with the stock layer at the same
    tensor-parallel size, computed once per process."""
    return _engine_greedy_tokens(None)


def _engine_greedy_tokens(layer_class: type | None) -> list[list[int]]:
    from minivllm import LLM

    greedy = SamplingParams(temperature=0, max_tokens=ENGINE_MAX_TOKENS, ignore_eos=True)
    with check_model_folder() as folder, quiet_engine_logs(), \
            LLM(folder, **ENGINE_SETTINGS, row_parallel_linear_class=layer_class) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(ENGINE_PROMPTS, greedy, use_tqdm=False)]


def _stage_engine(layer_class: type) -> str:
    want = stock_tensor_parallel_tokens()
    try:
        got = _engine_greedy_tokens(layer_class)
    except Exception as e:  # a worker's exception arrives as a WorkerError naming the rank
        raise CheckFailed(f"inside the engine (tensor_parallel_size={ROW_PARALLEL_WORLD}): {type(e).__name__}: "
                          f"{e}") from None
    for prompt, mine, stock in zip(ENGINE_PROMPTS, got, want):
        diff = token_mismatch(mine, stock, "with your layer", "with the stock layer")
        if diff:
            raise CheckFailed(f"inside the engine (tensor_parallel_size={ROW_PARALLEL_WORLD}): prompt {prompt!r}: "
                              f"{diff}")
    return (f"plugged into the engine (row_parallel_linear_class=, tensor_parallel_size={ROW_PARALLEL_WORLD}): "
            f"greedy tokens of {len(ENGINE_PROMPTS)} prompts equal the stock layer's")


def check_row_parallel_linear(row_parallel_forward: Callable, input_shard: Callable, *,
                              verbose: bool = True) -> CheckResult:
    """Exercise 08: ``input_shard(x, rank, world_size)`` is the slice of the input ``x`` that rank
    ``rank`` multiplies, and ``row_parallel_forward(self, x)`` the forward of a
    `RowParallelLinear` (``self.weight``: this rank's columns of the weight, ``self.bias``: the whole
    bias or None, ``self.tp_rank``, ``self.tp_size``) on that slice.

    1. ``input_shard`` matches the columns the stock weight loader gives each rank;
    2. in two gloo processes (spawned, 127.0.0.1), the stock layer with ``row_parallel_forward`` as
       its forward gives every rank the unsplit layer's output (F.linear on the full weight), for
       several shapes with and without bias. The forward is sent by its source (see above);
    3. the engine with that layer (``row_parallel_linear_class=``, ``tensor_parallel_size=2``) gives the
       stock layer's greedy tokens."""
    cases = [_row_parallel_data(c, seed=800 + i) for i, c in enumerate(ROW_PARALLEL_CASES)]
    layer: dict[str, type] = {}

    def stage_forward() -> str:
        layer["class"] = learner_layer_class(row_parallel_forward, folder)
        return _stage_row_parallel_forward(layer["class"], input_shard, cases)

    with learner_module_folder() as folder:
        return run_stages("check_row_parallel_linear",
                          [lambda: _stage_input_shard(input_shard, cases), stage_forward,
                           lambda: _stage_engine(layer["class"])], verbose)
