"""Data parallel: ``data_parallel_size`` independent engine replicas behind a request router.

Each replica is a whole `LLMEngine` (its own scheduler, block manager, KV cache and worker processes,
``tensor_parallel_size x pipeline_parallel_size`` of them); replicas never talk to each other. The
router sends each new request to the replica with the fewest outstanding tokens, and every step runs
all busy replicas at once (threads that wait on their workers, so the GIL is not in the way).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from minivllm.config.engine import EngineConfig
from minivllm.core.sequence import Sequence
from minivllm.engine.llm_engine import LLMEngine, PromptType
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import SamplingParams


class DataParallelEngine:
    """The `LLMEngine` interface `LLM` uses, over several replicas."""

    def __init__(self, config: EngineConfig):
        self._pool = ThreadPoolExecutor(config.parallel_config.data_parallel_size, thread_name_prefix="minivllm-dp")
        self.replicas: list[LLMEngine] = []
        try:
            for dp_rank in range(config.parallel_config.data_parallel_size):
                self.replicas.append(LLMEngine(config, dp_rank))
        except BaseException:
            self.close()
            raise
        first = self.replicas[0]
        self.config, self.model_config, self.tokenizer = config, first.model_config, first.tokenizer
        self.owner: dict[str, LLMEngine] = {}  # request id -> the replica serving it

    def make_request(self, request_id: str, prompt: PromptType, params: SamplingParams) -> list[Sequence]:
        if request_id in self.owner:
            raise ValueError(f"request_id={request_id!r} is already in use")
        return self.replicas[0].make_request(request_id, prompt, params)  # replicas are identical

    def add_request(self, request_id: str, prompt: PromptType, sampling_params: SamplingParams | None = None) -> None:
        self.add_sequences(self.make_request(str(request_id), prompt, sampling_params or SamplingParams()))

    def add_sequences(self, seqs: list[Sequence]) -> None:
        """A request's samples all go to one replica, where they share the prompt's blocks."""
        target = min(self.replicas, key=lambda r: sum(s.num_outstanding_tokens for s in r.requests.values()))
        self.owner[seqs[0].parent_id or seqs[0].request_id] = target
        target.add_sequences(seqs)

    def step(self) -> list[RequestOutput]:
        busy = [r for r in self.replicas if r.has_unfinished_requests()]
        outputs = [out for outs in self._pool.map(LLMEngine.step, busy) for out in outs]
        for out in outputs:
            if out.finished:
                self.owner.pop(out.request_id, None)
        return outputs

    def abort_request(self, request_id: str | list[str]) -> list[RequestOutput]:
        ids = [request_id] if isinstance(request_id, str) else request_id
        outputs = []
        for rid in ids:
            replica = self.owner.pop(rid, None)
            if replica is not None:
                outputs += replica.abort_request(rid)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return any(r.has_unfinished_requests() for r in self.replicas)

    def close(self) -> None:
        for replica in self.replicas:
            replica.close()
        self._pool.shutdown()
