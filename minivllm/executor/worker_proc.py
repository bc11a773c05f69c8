"""The loop every rank's process runs: join the process group, load this rank's shard, then run
whatever batch the driver sends until it says close (or goes away).

Messages from the driver: ``("step", [StepBatch per micro-batch], released request ids, KV copies)`` and
``("close",)``. Without pipeline parallel a step is one micro-batch.
Replies: ``("ready", num_blocks)`` once, then ``("step", SamplerOutput, collective counts)`` per step
(tokens and logprobs only from the sampling rank, an empty output from the others),
or ``("error", traceback)`` before the process exits on an exception.
"""
from __future__ import annotations

import traceback
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from minivllm.config.engine import EngineConfig
from minivllm.config.model import ModelConfig
from minivllm.distributed.comm import as_records, count_collectives
from minivllm.distributed.layout import RankLayout
from minivllm.distributed.parallel_state import init_tensor_parallel_groups
from minivllm.distributed.pipeline import StageLink
from minivllm.worker.step_batch import SamplerOutput, StepBatch

if TYPE_CHECKING:
    from minivllm.worker.model_runner import ModelRunner


def run_worker(layout: RankLayout, cfg: EngineConfig, mc: ModelConfig, folder: str, max_model_len: int,
               init_method: str, device_index: int, conn: Connection) -> None:
    from minivllm.worker.model_runner import ModelRunner  # the heavy imports only in worker processes

    torch.set_num_threads(1)  # ranks share the machine's cores; one thread each avoids oversubscription
    try:
        device = None  # the CPU: every rank shares it
        if cfg.torch_device.type == "cuda":  # this process's share is one device; its place in the grid is `layout`
            device = torch.device("cuda", device_index)
            torch.cuda.set_device(device)
        dist.init_process_group(cfg.resolved_distributed_backend, init_method=init_method,
                                rank=layout.rank, world_size=layout.world_size)
        init_tensor_parallel_groups(layout.tp_size, layout.pp_size, layout.pp_rank)
        runner = ModelRunner(cfg, mc, folder, max_model_len, layout, device)
        link = StageLink(layout)
        conn.send(("ready", runner.num_blocks))
        while True:
            msg = conn.recv()
            if msg[0] == "close":
                break
            _, micro_batches, released, copies = msg
            for request_id in released:
                runner.release(request_id)
            runner.copy_kv(copies)  # before the step's forward pass writes anything
            with count_collectives() as counts:
                sampled = run_stage(runner, link, micro_batches)
            conn.send(("step", sampled, as_records(counts)))
    except EOFError:  # the driver is gone: nothing left to serve
        pass
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_stage(runner: ModelRunner, link: StageLink, micro_batches: list[StepBatch]) -> SamplerOutput:
    """This rank's part of one step: each micro-batch in turn, taking its input from the previous
    stage and handing its output to the next. The sampling rank returns the tokens (and logprobs) of
    all of them; every other rank an empty output (a tensor-parallel peer still joins the LM head's
    gather)."""
    layout = runner.layout
    sampled = SamplerOutput()
    for batch in micro_batches:
        intermediate = None
        if not layout.is_first_stage:
            intermediate = link.receive(batch.num_tokens, runner.mc.hidden_size, runner.dtype, runner.device)
        if layout.is_last_stage:
            sampled.extend(runner.execute_batch(batch, intermediate))
        else:
            link.send(runner.compute_hidden(batch, intermediate))
    link.flush()
    return sampled
