"""Chapter 01's lab: step a real `LLMEngine` one `step()` at a time and watch what it schedules.

The state is the engine itself: the table of the last step is read from its trace (`StepRecord`),
the block tables from its `BlockManager`. Nothing here re-derives what the engine did.
"""
from __future__ import annotations

import html
from dataclasses import replace

import ipywidgets as widgets

from minivllm.engine.llm_engine import LLMEngine
from minivllm.lab.base import WHOLE_DESCRIPTION, Lab, LabError, html_table
from minivllm.sampling_params import SamplingParams


class EngineStepper:
    """A real engine, the requests a learner queued on it, and what came back. `rebuild` replaces the
    engine by a new one (the same settings, or another cache size) with no requests."""

    def __init__(self, engine: LLMEngine, max_kv_blocks: int | None = None):
        self.engine = engine
        # a bigger cache is refused: its memory is allocated up front (the first engine's size by default)
        self.max_kv_blocks = max_kv_blocks or engine.block_manager.num_blocks
        self.finished: dict[str, str] = {}  # request id -> finish reason and text
        self._next_id = 0

    def rebuild(self, num_kv_blocks: int | None = None) -> None:
        """A new engine with this engine's settings and ``num_kv_blocks`` KV blocks (None: as many as
        now), and no requests; a refused size changes nothing."""
        n = self.engine.block_manager.num_blocks if num_kv_blocks is None else num_kv_blocks
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.max_kv_blocks:
            raise LabError(f"num_kv_blocks={n!r} must be an int in 1..{self.max_kv_blocks}")
        config = self.engine.config
        engine = LLMEngine(replace(config, cache_config=replace(config.cache_config, num_kv_blocks=n)))
        self.engine.close()
        self.engine, self.finished, self._next_id = engine, {}, 0

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

    def __init__(self, engine: LLMEngine, prompt: str = "def fibonacci(n):", max_tokens: int = 8,
                 max_kv_blocks: int | None = None):
        self.state = EngineStepper(engine, max_kv_blocks)
        self.prompt = widgets.Text(value=prompt, description="prompt")
        self.max_tokens = widgets.IntSlider(value=max_tokens, min=0, max=64, description="max_tokens")
        self.add_button = widgets.Button(description="add request")
        self.step_button = widgets.Button(description="step")
        self.num_kv_blocks = widgets.IntText(value=engine.block_manager.num_blocks, description="num_kv_blocks",
                                             style=WHOLE_DESCRIPTION,
                                             layout=widgets.Layout(width="200px"))
        self.reset_button = widgets.Button(description="reset (new engine)")
        self._last_added = (prompt, max_tokens)
        super().__init__([[self.prompt, self.max_tokens, self.on_click(self.add_button, self._add_from_controls),
                           self.on_click(self.step_button, self.state.step)],
                          [self.on_change(self.num_kv_blocks, self.state.rebuild),
                           self.on_click(self.reset_button, self.state.rebuild)]])

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

    def reset(self) -> None:
        """What the *reset* button does: a new engine, the same cache size, no requests."""
        self.reset_button.click()

    def render(self) -> str:
        engine, rec = self.state.engine, self.state.last_step
        bm = engine.block_manager
        tok = engine.tokenizer
        preempted = f" &middot; preempted: {', '.join(rec.preempted)}" if rec and rec.preempted else ""
        head = (f"<p><b>step {rec.step if rec else '-'}</b> &middot; running {len(engine.scheduler.running)}, "
                f"waiting {len(engine.scheduler.waiting)} &middot; KV blocks used {bm.num_used_blocks} of "
                f"{bm.num_blocks} (block size {bm.block_size}){preempted}</p>")
        rows = [[c.request_id, "prefill" if c.is_prefill else "decode", f"{c.start}&ndash;{c.start + c.num_tokens - 1}",
                 c.num_tokens, "" if c.sampled_token is None else html.escape(repr(tok.decode([c.sampled_token])))]
                for c in (rec.chunks if rec else ())]
        last = (html_table(["request", "kind", "positions", "tokens", "sampled"], rows) if rows
                else "<p>no step has run yet</p>")
        live = [[s.request_id, s.status.value, f"{s.num_computed_tokens} of {s.num_tokens}", s.block_table]
                for s in list(engine.scheduler.running) + list(engine.scheduler.waiting)]
        tables = html_table(["request", "status", "tokens in the KV cache", "block table (physical blocks)"],
                            live) if live else ""
        done = "".join(f"<li>{rid}: {html.escape(text)}</li>" for rid, text in self.state.finished.items())
        return head + last + tables + (f"<p>finished:</p><ul>{done}</ul>" if done else "")
