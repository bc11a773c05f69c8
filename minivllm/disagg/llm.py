"""`DisaggregatedLLM`: `LLM.generate` over a prefill instance and a decode instance, each an
`LLMEngine` in its own process, joined by the KV connector.

Each request is prefilled on the prefill instance, which samples its first token there (it runs with
``max_tokens=1``) and saves the prompt's K/V; the decode instance then allocates its own blocks for
the request, receives that K/V into them and decodes the rest. The front end drives both in rounds:
each round it hands out new requests, tells both sides whether K/V is to move, and lets each run one
step; the two steps run at the same time, in their two processes.
"""
from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import time
import weakref
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from typing import Sequence as Seq

from tqdm.auto import tqdm

from minivllm.core.trace import StepRecord
from minivllm.disagg.config import (bytes_per_token, check_pair, instance_settings,
                                    resolve_kv_transfer_backend)
from minivllm.disagg.instance import DecodeArrival, PrefillResult, run_instance
from minivllm.disagg.records import KVTransfer
from minivllm.engine.llm_engine import final_only_requests
from minivllm.executor.multiproc import free_port, shutdown_workers
from minivllm.outputs import RequestMetrics, RequestOutput
from minivllm.sampling_params import SamplingParams

ROLES = ("prefill", "decode")


class InstanceError(RuntimeError):
    """An instance died, raised, or stopped answering; both are shut down."""


class DisaggregatedOutputs(list):
    """`generate`'s outputs, in prompt order, and ``transfers``: the `KVTransfer` of each request that
    went on to the decode instance, in the order they happened."""

    transfers: list[KVTransfer]


class DisaggregatedLLM:
    """Prefill on one engine, decode on another.

    >>> llm = DisaggregatedLLM("path/to/model", block_size=16, decode={"num_kv_blocks": 64})
    >>> outs = llm.generate(["def fib(n):"], SamplingParams(temperature=0, max_tokens=32))
    >>> outs[0].outputs[0].text, outs.transfers[0].num_bytes
    """

    def __init__(self, model: str, *, prefill: dict | None = None, decode: dict | None = None,
                 kv_transfer_backend: str = "auto", timeout_s: float = 120.0,
                 kv_receiver_class: type | None = None, **engine_args):
        """``engine_args`` are `LLM`'s, for both instances; ``prefill`` and ``decode`` override them for
        one (``model`` included). Both must serve the same model with the same block size, dtype, device
        type and ``max_model_len``, each in one process: anything else is a ValueError before any
        process starts. ``timeout_s``: how long the front end waits for an instance's answer, and an
        instance for the other's K/V, before calling it dead. ``kv_receiver_class``: a subclass of
        `minivllm.disagg.worker_side.KVReceiver` for the decode instance (exercise 10 plugs its
        receive side in here); the decode process imports it by module and name, so it must live in
        a module, not in ``__main__``."""
        receiver_class = check_receiver_class(kv_receiver_class)
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s!r} must be a number > 0")
        settings = [instance_settings(role, model, engine_args, side) for role, side in zip(ROLES, (prefill, decode))]
        check_pair(*settings)
        backend = resolve_kv_transfer_backend(kv_transfer_backend, *settings)
        self.timeout_s = timeout_s
        self.kv_bytes_per_token = bytes_per_token(settings[0])  # 2 x layers x KV heads x head size x dtype bytes
        self.transfers: list[KVTransfer] = []  # every transfer so far
        self.prefill_trace: list[StepRecord] = []  # each instance's step records
        self.decode_trace: list[StepRecord] = []
        self._request_counter = itertools.count()
        self._closed_because: str | None = None
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self.processes: dict[str, mp.process.BaseProcess] = {}
        self.conns: dict[str, Connection] = {}
        for role, s in zip(ROLES, settings):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=run_instance, daemon=True, name=f"minivllm-{role}",
                               args=(role, s.config, init_method, backend, timeout_s,
                                     logging.getLogger("minivllm").getEffectiveLevel(), child, receiver_class))
            proc.start()
            child.close()
            self.processes[role], self.conns[role] = proc, parent
        self._finalizer = weakref.finalize(self, shutdown_workers, list(self.processes.values()),
                                           list(self.conns.values()))
        ready = self._gather(ROLES)
        self.num_blocks = {role: ready[role][1] for role in ROLES}  # each instance's KV blocks
        self.max_model_len = ready["prefill"][2]

    def close(self) -> None:
        """Stop both instances' processes (also done on garbage collection, or leaving a ``with``)."""
        self._finalizer()

    def __enter__(self) -> "DisaggregatedLLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- generate ------------------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> DisaggregatedOutputs:
        """Like `LLM.generate`; the outputs also carry this call's ``transfers``. Every request is
        checked by both instances before any starts (ValueError). ``n`` must be 1; a seeded random
        sample draws its first token and the rest from two generators, so it differs from `LLM`'s."""
        requests = final_only_requests(prompts, sampling_params)
        for _, p in requests:
            if isinstance(p, SamplingParams) and p.n != 1:
                raise ValueError(f"n={p.n} is not supported in disaggregated serving: use n=1")
        for reply in self._exchange({role: ("check", requests) for role in ROLES}).values():
            if reply[0] == "invalid":
                raise ValueError(reply[1])
        ids = [str(next(self._request_counter)) for _ in requests]  # ints: the K/V header carries them
        return self._run(ids, requests, use_tqdm)

    def _run(self, ids: list[str], requests: list[tuple], use_tqdm: bool) -> DisaggregatedOutputs:
        to_prefill = [(rid, prompt, p) for rid, (prompt, p) in zip(ids, requests)]
        params = {rid: p for rid, (_, p) in zip(ids, requests)}
        to_decode: list[DecodeArrival] = []
        first_outputs: dict[str, RequestOutput] = {}  # the prefill instance's, of requests gone on to decode
        outputs: dict[str, RequestOutput] = {}
        transfers: list[KVTransfer] = []
        waiting_for_kv = 0  # requests handed to the decode instance whose K/V has not moved yet
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while len(outputs) < len(ids):
                waiting_for_kv += len(to_decode)
                transfer = waiting_for_kv > 0
                replies = self._exchange({"prefill": ("round", to_prefill, transfer),
                                          "decode": ("round", to_decode, transfer)})
                to_prefill, to_decode = [], []
                results: list[PrefillResult]
                results, _, records = replies["prefill"][1:]
                self.prefill_trace += records
                for r in results:
                    if r.continues:
                        first_outputs[r.output.request_id] = r.output
                        to_decode.append(arrival(r.output, params[r.output.request_id]))
                    else:
                        outputs[r.output.request_id] = r.output
                        bar.update(1)
                decoded, moved, records = replies["decode"][1:]
                self.decode_trace += records
                transfers += moved
                waiting_for_kv -= len(moved)
                for out in decoded:
                    outputs[out.request_id] = merge(first_outputs.pop(out.request_id), out)
                    bar.update(1)
        except InstanceError:
            raise
        except BaseException:  # an interrupt mid-round: the instances' state no longer matches ours
            if self._closed_because is None:
                self._closed_because = "generate was interrupted"
                self.close()
            raise
        finally:
            bar.close()
            self.transfers += transfers
        result = DisaggregatedOutputs(outputs[rid] for rid in ids)
        result.transfers = transfers
        return result

    # ---- talking to the instances --------------------------------------------------------------
    def _exchange(self, messages: dict[str, tuple]) -> dict[str, tuple]:
        if self._closed_because is not None:
            raise InstanceError(f"the disaggregated LLM is shut down: {self._closed_because}")
        for role, msg in messages.items():
            try:
                self.conns[role].send(msg)
            except (BrokenPipeError, ConnectionResetError, OSError):
                self._fail(role, None)
        return self._gather(list(messages))

    def _gather(self, roles: Seq[str]) -> dict[str, tuple]:
        """One reply from each of ``roles``. A dead instance is blamed before one that raised (its
        peer's error, a broken connection, is the consequence); no answer within ``timeout_s`` is
        an error too."""
        replies: dict[str, tuple] = {}
        pending = {self.conns[role]: role for role in roles}
        sentinels = {self.processes[role].sentinel: role for role in ROLES}
        deadline = time.monotonic() + self.timeout_s
        while pending:
            ready = wait(list(pending) + list(sentinels), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self._fail(next(iter(pending.values())), None, f"did not answer within timeout_s={self.timeout_s}")
            raised = []
            for obj in ready:
                if obj in pending:
                    role = pending.pop(obj)
                    try:
                        replies[role] = obj.recv()
                    except (EOFError, OSError):
                        continue  # its sentinel says it died
                    if replies[role][0] == "error":
                        raised.append(role)
            for role in ROLES:
                if not self.processes[role].is_alive():
                    self._fail(role, None)
            if raised:
                time.sleep(0.5)  # a peer that died a moment ago is the cause: let its death show
                for role in ROLES:
                    if not self.processes[role].is_alive() and role not in raised:
                        self._fail(role, None)
                self._fail(raised[0], replies[raised[0]][1])
        return replies

    def _fail(self, role: str, remote_traceback: str | None, why: str | None = None):
        proc = self.processes[role]
        proc.join(0.5)
        if remote_traceback is not None:
            what = f"the {role} instance (pid {proc.pid}) raised:\n{remote_traceback}"
        elif why is not None:
            what = f"the {role} instance (pid {proc.pid}) {why}"
        else:
            what = f"the {role} instance (pid {proc.pid}) died (exit code {proc.exitcode})"
        self._closed_because = what.splitlines()[0]
        self.close()
        raise InstanceError(f"{what}; both instances are shut down, make a new DisaggregatedLLM to continue")


def check_receiver_class(cls: type | None) -> type:
    """``cls`` (None: the stock `KVReceiver`), refused (ValueError) unless a `KVReceiver` subclass
    that a spawned process can import."""
    from minivllm.disagg.worker_side import KVReceiver

    if cls is None:
        return KVReceiver
    if not (isinstance(cls, type) and issubclass(cls, KVReceiver)):
        raise ValueError(f"kv_receiver_class={cls!r} must be a subclass of minivllm.disagg.worker_side.KVReceiver")
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise ValueError(f"kv_receiver_class={cls.__qualname__} is defined in {cls.__module__}"
                         f"{' inside a function' * ('<locals>' in cls.__qualname__)}: the decode process imports "
                         "it by module and name, so define it at the top level of a module")
    return cls


def arrival(first: RequestOutput, params: SamplingParams) -> DecodeArrival:
    """The decode instance's request, from the prefill instance's output (prompt and first token)."""
    completion = first.outputs[0]
    return DecodeArrival(first.request_id, first.prompt, list(first.prompt_token_ids), params,
                         completion.token_ids[0], completion.logprobs[0] if completion.logprobs else None)


def merge(first: RequestOutput, rest: RequestOutput) -> RequestOutput:
    """The decode instance's output (all tokens, the first included) with what only the prefill
    instance knows: the prompt's logprobs, arrival and first-token times, prefix-cache hits."""
    p, d = first.metrics, rest.metrics
    metrics = RequestMetrics(p.arrival_time, p.first_scheduled_time, p.first_token_time, d.finished_time,
                             p.num_cached_tokens, p.num_preemptions + d.num_preemptions)
    return replace(rest, prompt_logprobs=first.prompt_logprobs, metrics=metrics)
