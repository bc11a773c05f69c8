"""The driver's side of the worker processes: one `MultiprocExecutor` per engine replica.

The scheduler and block manager stay in the driver. Each step the driver flattens the scheduled
chunks into `StepBatch` es (one, or with pipeline stages up to one micro-batch per stage), sends them
to every rank, and waits for all of them: the sampling rank's tokens, every rank's collective counts. A rank that dies or raises ends the engine with an error
naming it, instead of leaving the driver waiting on a collective that will never finish.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import pickle
import socket
import time
import types
import weakref
from multiprocessing.connection import Connection, wait

from minivllm.config.engine import EngineConfig
from minivllm.config.model import ModelConfig
from minivllm.core.block_manager import KVCopy
from minivllm.core.records import RankComm, StepLogprobs
from minivllm.core.scheduler import SchedulerOutput
from minivllm.core.sequence import Sequence
from minivllm.distributed.layout import replica_layouts
from minivllm.distributed.pipeline import split_micro_batches
from minivllm.executor.worker_proc import run_worker
from minivllm.worker.step_batch import flatten_chunks

SHUTDOWN_GRACE_S = 5.0  # how long closing waits for workers to leave on their own


class WorkerError(RuntimeError):
    """A worker process died or raised; the engine that owned it is closed."""


def check_sendable(cfg: EngineConfig) -> None:
    """Refuse, before any process starts, a plugged-in piece the workers could not import: spawned
    processes start empty, and pickle sends a function or class by its module and name, so one
    defined in a notebook or a script's ``__main__`` is nowhere for them to find."""
    for name in ("sampler", "row_parallel_linear_class"):
        piece = getattr(cfg, name)
        if piece is None:
            continue
        try:
            _MainRefusingPickler(io.BytesIO()).dump(piece)
        except Exception as e:
            raise ValueError(f"{name}={piece!r} cannot be sent to the worker processes ({e}): define it in a "
                             "module they can import, not in a notebook") from None


class _MainRefusingPickler(pickle.Pickler):
    def persistent_id(self, obj):  # called for every object pickled, classes and functions included
        if isinstance(obj, (type, types.FunctionType)) and obj.__module__ == "__main__":
            raise pickle.PicklingError(f"{obj.__qualname__} is defined in __main__")
        return None


class MultiprocExecutor:
    """Runs one replica's ranks (tensor x pipeline) in spawned processes: an `Executor`
    (`minivllm.executor.base`), like `ModelRunner` in one process."""

    def __init__(self, cfg: EngineConfig, mc: ModelConfig, folder: str, max_model_len: int, dp_rank: int = 0):
        par = cfg.parallel_config
        self.block_size, self.pp_size = cfg.cache_config.block_size, par.pipeline_parallel_size
        self.layouts = replica_layouts(par.tensor_parallel_size, par.pipeline_parallel_size, par.enable_expert_parallel)
        self.sampling_rank = next(lay.rank for lay in self.layouts if lay.samples)
        self.last_comm: tuple[RankComm, ...] = ()
        self.last_logprobs: dict[str, StepLogprobs] = {}
        self._released: list[str] = []
        self._copies: list[KVCopy] = []
        self._closed_because: str | None = None
        worker_cfg = cfg.for_workers()
        check_sendable(worker_cfg)
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        first_device = dp_rank * len(self.layouts)
        self.processes: list[mp.process.BaseProcess] = []
        self.conns: list[Connection] = []
        for lay in self.layouts:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=run_worker, daemon=True, name=f"minivllm-dp{dp_rank}-rank{lay.rank}",
                               args=(lay, worker_cfg, mc, folder, max_model_len, init_method,
                                     first_device + lay.rank, child))
            proc.start()
            child.close()
            self.processes.append(proc)
            self.conns.append(parent)
        self._finalizer = weakref.finalize(self, shutdown_workers, self.processes, self.conns)
        self._starting = True
        self.num_blocks = min(reply[1] for reply in self._gather())
        self._starting = False

    def execute(self, out: SchedulerOutput) -> dict[Sequence, int]:
        parts = split_micro_batches(out.chunks, self.pp_size)
        released, self._released = self._released, []
        copies, self._copies = self._copies, []
        self._send_all(("step", [flatten_chunks(p, self.block_size, out.token_masks) for p in parts], released,
                        copies))
        replies = self._gather()
        self.last_comm = tuple(RankComm(lay.rank, lay.tp_rank, lay.pp_rank, reply[2])
                               for lay, reply in zip(self.layouts, replies))
        sampled = replies[self.sampling_rank][1]
        self.last_logprobs = sampled.logprobs
        return dict(zip([c.seq for p in parts for c in p if c.samples], sampled.token_ids))

    def release(self, request_id: str) -> None:
        self._released.append(request_id)  # travels with the next step

    def copy_kv(self, copies: list[KVCopy]) -> None:
        self._copies += copies  # travel with the next step; every rank copies its own layers and heads

    def close(self) -> None:
        self._finalizer()

    # ---- talking to the workers --------------------------------------------------------------
    def _send_all(self, msg: tuple) -> None:
        if self._closed_because is not None:
            raise WorkerError(f"the engine's workers are shut down: {self._closed_because}")
        for rank, conn in enumerate(self.conns):
            try:
                conn.send(msg)
            except (BrokenPipeError, ConnectionResetError):
                self._fail(rank, None)

    def _gather(self) -> list[tuple]:
        """One reply from every rank, in rank order; a dead or failed rank raises `WorkerError`.
        A rank that died without a word is blamed before ranks that raised: its peers' errors (a
        collective whose connection was reset) are the consequence, not the cause."""
        replies: list[tuple | None] = [None] * len(self.conns)
        pending = dict(zip(self.conns, range(len(self.conns))))
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.processes)}
        while pending:
            ready = wait(list(pending) + list(sentinels))
            died, raised = [], []
            for obj in ready:  # replies first: a worker that raised sends its traceback, then exits
                if obj in pending:
                    rank = pending.pop(obj)
                    try:
                        replies[rank] = obj.recv()
                    except (EOFError, OSError):
                        died.append(rank)
                        continue
                    if replies[rank][0] == "error":
                        raised.append(rank)
            died += [sentinels[obj] for obj in ready if obj in sentinels and sentinels[obj] in pending.values()]
            if died:
                self._fail(min(died), None)
            if raised:
                self._fail(min(raised), replies[min(raised)][1])
        return replies

    def _fail(self, rank: int, remote_traceback: str | None):
        proc = self.processes[rank]
        proc.join(0.5)
        if remote_traceback is not None:
            what = f"worker rank {rank} (pid {proc.pid}) raised:\n{remote_traceback}"
        else:
            what = f"worker rank {rank} (pid {proc.pid}) died (exit code {proc.exitcode})"
            if self._starting:  # the usual cause: spawn re-imports the main script, which makes an LLM again
                what += (" while starting (its error is on stderr); a script that makes an LLM with worker "
                         "processes must do so under `if __name__ == '__main__':`")
        self._closed_because = what.splitlines()[0]
        self.close()
        raise WorkerError(f"{what}; the engine has shut its other workers down, make a new LLM to continue")


def shutdown_workers(processes: list, conns: list[Connection]) -> None:
    """Ask every worker to leave, then end those that do not (one stuck in a collective with a dead
    peer never reads the request)."""
    for conn in conns:
        try:
            conn.send(("close",))
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
        proc.join()
    for conn in conns:
        conn.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago: the rendezvous of a process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
