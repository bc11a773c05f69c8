"""Chapter 01's lab: step a real `LLMEngine` one `step()` at a time and watch what it schedules.

The state is the engine itself: the table of the last step is read from its trace (`StepRecord`),
the block tables from its `BlockManager`. Nothing here re-derives what the engine did.
"""
from __future__ import annotations

import html

import ipywidgets as widgets

from minivllm.engine.llm_engine import LLMEngine
from minivllm.lab.base import Lab, LabError
from minivllm.sampling_params import SamplingParams


class EngineStepper:
    """A real engine, the requests a learner queued on it, and what came back."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.finished: dict[str, str] = {}  # request id -> finish reason and text
        self._next_id = 0

    def add(self, prompt: str, max_tokens: int) -> str:
        """Queue a greedy request; the engine's own validation decides what is acceptable."""
        if max_tokens < 1:
            raise LabError(f"max_tokens={max_tokens} must be at least 1")
        request_id = f"r{self._next_id}"
        self.engine.add_request(request_id, prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
        self._next_id += 1
        return request_id

    def step(self) -> None:
        if not self.engine.has_unfinished_requests():
            raise LabError("nothing to run: add a request first")
        for out in self.engine.step():
            comp = out.outputs[0]
            self.finished[out.request_id] = f"{comp.finish_reason}: {comp.text!r}"

    @property
    def last_step(self):
        return self.engine.trace[-1] if self.engine.trace else None


class EngineStepperLab(Lab):
    """Add requests, press *step*, and read the step the engine just ran and the blocks it holds."""

    def __init__(self, engine: LLMEngine, prompt: str = "def fibonacci(n):", max_tokens: int = 8):
        self.state = EngineStepper(engine)
        self.prompt = widgets.Text(value=prompt, description="prompt")
        self.max_tokens = widgets.IntSlider(value=max_tokens, min=0, max=64, description="max_tokens")
        self.add_button = widgets.Button(description="add request")
        self.step_button = widgets.Button(description="step")
        self._last_added = (prompt, max_tokens)
        super().__init__([self.prompt, self.max_tokens, self.on_click(self.add_button, self._add_from_controls),
                          self.on_click(self.step_button, self.state.step)])

    def _add_from_controls(self) -> None:
        """Add the request the controls describe; a refused one leaves them at the last request added
        (or the lab's first), never holding what the engine refused."""
        try:
            self.state.add(self.prompt.value, self.max_tokens.value)
        except ValueError:
            self.prompt.value, self.max_tokens.value = self._last_added
            raise
        self._last_added = (self.prompt.value, self.max_tokens.value)

    def add(self, prompt: str, max_tokens: int = 8) -> None:
        """What the *add request* button does, from code."""
        self.prompt.value, self.max_tokens.value = prompt, max_tokens
        self.add_button.click()

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self.step_button.click()

    def render(self) -> str:
        engine, rec = self.state.engine, self.state.last_step
        bm = engine.block_manager
        tok = engine.tokenizer
        head = (f"<p><b>step {rec.step if rec else '-'}</b> &middot; running {len(engine.scheduler.running)}, "
                f"waiting {len(engine.scheduler.waiting)} &middot; KV blocks used {bm.num_used_blocks} of "
                f"{bm.num_blocks} (block size {bm.block_size})</p>")
        rows = ""
        for c in rec.chunks if rec else ():
            sampled = "" if c.sampled_token is None else html.escape(repr(tok.decode([c.sampled_token])))
            rows += (f"<tr><td>{c.request_id}</td><td>{'prefill' if c.is_prefill else 'decode'}</td>"
                     f"<td>{c.start}&ndash;{c.start + c.num_tokens - 1}</td><td>{c.num_tokens}</td>"
                     f"<td>{sampled}</td></tr>")
        last = ("<table><tr><th>request</th><th>kind</th><th>positions</th><th>tokens</th><th>sampled</th></tr>"
                f"{rows}</table>") if rows else "<p>no step has run yet</p>"
        live = "".join(
            f"<tr><td>{s.request_id}</td><td>{s.status.value}</td><td>{s.num_computed_tokens} of {s.num_tokens}</td>"
            f"<td>{s.block_table}</td></tr>"
            for s in list(engine.scheduler.running) + list(engine.scheduler.waiting))
        tables = ("<table><tr><th>request</th><th>status</th><th>tokens in the KV cache</th>"
                  f"<th>block table (physical blocks)</th></tr>{live}</table>") if live else ""
        done = "".join(f"<li>{rid}: {html.escape(text)}</li>" for rid, text in self.state.finished.items())
        return head + last + tables + (f"<p>finished:</p><ul>{done}</ul>" if done else "")
