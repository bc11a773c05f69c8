"""Workload presets for tuning (chapter 09): five kinds of traffic a deployment is tuned for, each a
seeded `Workload` with its lengths and its arrival process.

    from minivllm.sim.presets import tuning_workload
    requests = tuning_workload("chat", num_requests=1000).generate()

Where the shapes come from (lengths in tokens; a log-normal's median is ``mean * exp(-sigma^2 / 2)``):

* **chat**: ShareGPT conversations, the dataset `vllm bench serve` and the vLLM paper (Kwon et al.,
  SOSP 2023, Fig. 11: mean input 161, mean output 338) use; heavy-tailed both ways. Here: prompts with
  a median of about 250 (log-normal, mean 370, sigma 0.9), outputs a median of about 200 (mean 250, sigma 0.7).
* **rag**: long-document question answering: retrieved passages fill 4-8k-token prompts (uniform),
  the answers are short (median about 130).
* **code**: code completion in an editor: a repository context shared by the requests of one project
  (1,024 tokens, 8 projects: what `enable_prefix_caching` reuses), the file around the cursor after it
  (about 1,500 tokens in all), a short completion (median about 60).
* **batch**: an offline job: every request at time 0 (``request_rate=inf``), ShareGPT-like lengths
  with longer outputs; only throughput matters.
* **bursty**: chat lengths arriving in bursts: gamma gaps of shape 0.2 (`vllm bench serve
  --burstiness 0.2`), the same mean rate as Poisson but five times the variance of the gaps
  (BurstGPT, Wang et al. 2024, measured such bursts in Azure OpenAI traffic).

Each preset's default rate loads Llama-3.1-8B on one H100 to roughly two thirds of what it serves,
so a knob that costs capacity shows up in the latencies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from minivllm.sim.workload import Lengths, Workload


@dataclass(frozen=True)
class TuningPreset:
    name: str
    description: str
    prompt_len: Lengths
    output_len: Lengths
    request_rate: float  # requests per second; math.inf: all at time 0
    burstiness: float = 1.0
    shared_prefix_len: int = 0
    num_prefix_groups: int = 1

    def workload(self, num_requests: int = 1000, request_rate: float | None = None, seed: int = 0) -> Workload:
        """This preset as a seeded `Workload`; ``request_rate`` overrides the preset's own."""
        return Workload(num_requests, self.request_rate if request_rate is None else request_rate,
                        self.prompt_len, self.output_len, burstiness=self.burstiness,
                        shared_prefix_len=self.shared_prefix_len, num_prefix_groups=self.num_prefix_groups,
                        seed=seed)

    @property
    def max_total_len(self) -> int:
        """The longest request (prompt cap + output cap): ``max_model_len`` must hold it."""
        return max(self.prompt_len.maximum or self.prompt_len.mean, self.shared_prefix_len + 1) + \
            (self.output_len.maximum or self.output_len.mean)


CHAT_PROMPT = Lengths("lognormal", 370, 0.9, 4096)
CHAT_OUTPUT = Lengths("lognormal", 250, 0.7, 2048)

TUNING_PRESETS = {p.name: p for p in (
    TuningPreset("chat", "ShareGPT-like chat: prompts and answers of a few hundred tokens, Poisson arrivals",
                 CHAT_PROMPT, CHAT_OUTPUT, request_rate=35.0),
    TuningPreset("rag", "long-document RAG: 4-8k-token prompts, short answers, Poisson arrivals",
                 Lengths("uniform", 6000, 2000.0, 8000), Lengths("lognormal", 160, 0.6, 512), request_rate=6.0),
    TuningPreset("code", "code completion: a 1,024-token repository prefix shared by each of 8 projects, "
                 "short completions, Poisson arrivals",
                 Lengths("lognormal", 1500, 0.3, 4096), Lengths("lognormal", 64, 0.6, 256), request_rate=60.0,
                 shared_prefix_len=1024, num_prefix_groups=8),
    TuningPreset("batch", "offline batch: every request at time 0, ShareGPT-like prompts, longer outputs",
                 CHAT_PROMPT, Lengths("lognormal", 400, 0.7, 2048), request_rate=math.inf),
    TuningPreset("bursty", "chat lengths in bursts (gamma gaps of shape 0.2, the same mean rate)",
                 CHAT_PROMPT, CHAT_OUTPUT, request_rate=35.0, burstiness=0.2),
)}


def tuning_workload(name: str, num_requests: int = 1000, request_rate: float | None = None,
                    seed: int = 0) -> Workload:
    """The preset ``name`` (see `TUNING_PRESETS`) as a seeded workload."""
    if name not in TUNING_PRESETS:
        raise ValueError(f"preset={name!r} is unknown; known: {', '.join(TUNING_PRESETS)}")
    return TUNING_PRESETS[name].workload(num_requests, request_rate, seed)
