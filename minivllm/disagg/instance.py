"""The loop each instance's process runs: one `LLMEngine` (prefill or decode) and its side of the KV
connector, stepping when the front end (`minivllm.disagg.llm`) says so.

Messages from the front end:
  ``("check", [(prompt, params)])``: would the engine take these requests? ``("ok",)`` or ``("invalid", message)``;
  ``("round", new requests, transfer)``: take the new requests; if ``transfer``, move K/V first
  (the decode side admits what fits and receives it, the prefill side sends it); then one engine step
  if anything is unfinished. Reply ``("round", outputs, transfers, step records)``;
  ``("close",)``.
A new prefill request is ``(request id, prompt, params)``, run with ``max_tokens=1``; a new decode
request is a `DecodeArrival`. An exception is answered with ``("error", traceback)`` before the
process exits.
"""
from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass, replace
from datetime import timedelta
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from minivllm.config.engine import EngineConfig
from minivllm.core.records import PositionLogprobs
from minivllm.core.scheduler import SchedulerOutput
from minivllm.disagg.scheduler_side import DecodeAdmission, continues_on_decode, saves_after_step
from minivllm.disagg.worker_side import DECODE_RANK, PREFILL_RANK, KVReceiver, KVSender
from minivllm.engine.llm_engine import LLMEngine
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import SamplingParams
from minivllm.worker.model_runner import ModelRunner


@dataclass(frozen=True)
class DecodeArrival:
    """A request the prefill instance finished with its first token, for the decode instance."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams  # the request's own
    first_token: int
    first_logprobs: PositionLogprobs | None  # the first token's report, if the request asked for logprobs


@dataclass(frozen=True)
class PrefillResult:
    output: RequestOutput
    continues: bool  # the decode instance takes it on (its K/V is saved on the prefill side until sent)


class SavingExecutor:
    """The prefill instance's executor: the model runner, and after each forward pass the K/V of the
    prompts it completed saved for the decode instance (vLLM's ``save_kv_layer``/``wait_for_save``)."""

    def __init__(self, runner: ModelRunner, sender: KVSender):
        self.runner, self.sender = runner, sender

    num_blocks = property(lambda self: self.runner.num_blocks)
    last_comm = property(lambda self: self.runner.last_comm)
    last_logprobs = property(lambda self: self.runner.last_logprobs)

    def execute(self, out: SchedulerOutput):
        sampled = self.runner.execute(out)
        self.sender.save(saves_after_step(out, self.runner.block_size))
        return sampled

    def copy_kv(self, copies) -> None:
        self.runner.copy_kv(copies)

    def release(self, request_id: str) -> None:
        self.runner.release(request_id)

    def close(self) -> None:
        self.runner.close()


def link_device(runner: ModelRunner, backend: str) -> torch.device:
    return runner.device if backend == "nccl" else torch.device("cpu")


def run_instance(role: str, cfg: EngineConfig, init_method: str, backend: str, timeout_s: float,
                 log_level: int, conn: Connection, receiver_class: type[KVReceiver] = KVReceiver) -> None:
    """``role``: "prefill" or "decode"; ``log_level``: the front end's, for the engine's logger here;
    ``receiver_class``: the decode side's `KVReceiver` (a subclass: exercise 10's door)."""
    logging.getLogger("minivllm").setLevel(log_level)
    if cfg.torch_device.type == "cpu":  # the two instances share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    try:
        engine = LLMEngine(cfg)
        runner = engine.executor  # one process per instance: the model runner itself
        if runner.device.type == "cuda":
            torch.cuda.set_device(runner.device)
        # joined after the engine is built: a world of two in the default group would otherwise make the
        # model runner agree on one cache size for both instances (smallest_across_ranks)
        dist.init_process_group(backend, init_method=init_method, rank=PREFILL_RANK if role == "prefill" else DECODE_RANK,
                                world_size=2, timeout=timedelta(seconds=timeout_s))
        if role == "prefill":
            sender = KVSender(runner.kv_cache, link_device(runner, backend))
            engine.executor = SavingExecutor(runner, sender)
            serve = PrefillLoop(engine, sender)
        else:
            serve = DecodeLoop(engine, receiver_class(runner.kv_cache, link_device(runner, backend)))
        conn.send(("ready", engine.block_manager.num_blocks, engine.max_model_len))
        while True:
            msg = conn.recv()
            if msg[0] == "close":
                break
            if msg[0] == "check":
                conn.send(check_requests(engine, msg[1]))
                continue
            _, new, transfer = msg
            conn.send(("round",) + serve.round(new, transfer))
    except EOFError:  # the front end is gone
        pass
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def check_requests(engine: LLMEngine, requests: list) -> tuple:
    try:
        for i, (prompt, params) in enumerate(requests):
            engine.make_request(f"check-{i}", prompt, params)  # validates, changes nothing
    except ValueError as e:
        return ("invalid", str(e))
    return ("ok",)


class PrefillLoop:
    def __init__(self, engine: LLMEngine, sender: KVSender):
        self.engine, self.sender = engine, sender
        self.max_tokens: dict[str, int] = {}  # each running request's own max_tokens
        self.num_records = 0

    def round(self, new: list[tuple], transfer: bool) -> tuple:
        engine = self.engine
        for request_id, prompt, params in new:
            self.max_tokens[request_id] = params.max_tokens
            first_only = replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1))
            engine.add_sequences(engine.make_request(request_id, prompt, first_only))
        if transfer:
            self.sender.serve()
        results = []
        if engine.has_unfinished_requests():
            for out in engine.step():
                completion = out.outputs[0]
                goes_on = continues_on_decode(completion.finish_reason, len(out.prompt_token_ids) + 1,
                                              self.max_tokens.pop(out.request_id), engine.max_model_len)
                if not goes_on:
                    self.sender.drop(out.request_id)
                results.append(PrefillResult(out, goes_on))
        records, self.num_records = engine.trace[self.num_records:], len(engine.trace)
        return results, [], records


class DecodeLoop:
    def __init__(self, engine: LLMEngine, receiver: KVReceiver):
        self.engine, self.receiver = engine, receiver
        self.admission = DecodeAdmission(engine.scheduler)
        self.num_records = 0

    def round(self, new: list[DecodeArrival], transfer: bool) -> tuple:
        engine = self.engine
        for a in new:
            params = replace(a.params, prompt_logprobs=None)  # the prefill side reported them
            seq, = engine.make_request(a.request_id, {"prompt": a.prompt, "prompt_token_ids": a.prompt_token_ids},
                                       params)
            seq.token_ids.append(a.first_token)
            if seq.logprobs is not None:
                seq.logprobs.append(a.first_logprobs)
            self.admission.add(seq)
        transfers = []
        if transfer:
            transfers = self.receiver.receive(self.admission.admit(engine.add_prefilled_request, self.receiver.plan_load))
        outputs = engine.step() if engine.has_unfinished_requests() else []
        records, self.num_records = engine.trace[self.num_records:], len(engine.trace)
        return outputs, transfers, records
