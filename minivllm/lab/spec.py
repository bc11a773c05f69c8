"""Chapter 07's lab: one request generated with speculative decoding on the real engine, step by step.

Each verifying step of the request is read from the engine's trace (`ChunkRecord.draft_token_ids`,
``num_accepted``, ``sampled_token``): the drafts the target kept, the first one it rejected (and
the drafts after it, never checked), and the token the target added itself: the *bonus* when every
draft was kept, else the *correction* drawn from the residual distribution.
"""
from __future__ import annotations

import html
from dataclasses import dataclass

import ipywidgets as widgets
from matplotlib.figure import Figure

from minivllm.config.speculative import METHODS
from minivllm.core.records import SpecDecodeMetrics, expected_tokens_per_step
from minivllm.lab.base import WIDE, Lab, LabError
from minivllm.llm import LLM
from minivllm.sampling_params import SamplingParams

COLORS = {"accepted": "#2e7d32", "rejected": "#c62828", "unchecked": "#9e9e9e", "bonus": "#1565c0",
          "correction": "#ef6c00", "plain": "#444444"}


@dataclass(frozen=True)
class SpecStep:
    """What one engine step did for the request: the drafts, how many the target kept, and the
    token it added (None for a prefill chunk that did not reach the prompt's end)."""

    is_prefill: bool
    draft_token_ids: tuple[int, ...]
    num_accepted: int
    sampled_token: int | None

    @property
    def num_emitted(self) -> int:
        return self.num_accepted + (self.sampled_token is not None)

    @property
    def added_kind(self) -> str:
        """How the target's own token came about: after a prefill or without drafts it is a plain
        sample; with every draft kept it is the bonus; else it corrects the first rejected draft."""
        if not self.draft_token_ids:
            return "plain"
        return "bonus" if self.num_accepted == len(self.draft_token_ids) else "correction"


class SpecRun:
    """Runs one request at a time on a real `LLM` per (method, k), built on first use and kept."""

    def __init__(self, target: str, draft: str, *, max_model_len: int = 512, num_kv_blocks: int = 256):
        self.target, self.draft = target, draft
        self.engine_args = dict(max_model_len=max_model_len, num_kv_blocks=num_kv_blocks, seed=0)
        self._llms: dict[tuple[str, int], LLM] = {}
        self.steps: list[SpecStep] = []
        self.output_token_ids: list[int] = []
        self.metrics = SpecDecodeMetrics()  # the engine's own counts for the request
        self.settings: tuple[str, int, float] | None = None
        self.tokenizer = None

    def llm(self, method: str, k: int) -> LLM:
        if method not in METHODS:
            raise LabError(f"method={method!r} must be one of {METHODS}")
        if (method, k) not in self._llms:
            spec = {"method": method, "num_speculative_tokens": k}
            if method == "draft_model":
                spec["model"] = self.draft
            self._llms[method, k] = LLM(self.target, speculative_config=spec, **self.engine_args)
        return self._llms[method, k]

    def run(self, prompt: str, method: str, k: int, temperature: float, max_tokens: int, seed: int = 0) -> None:
        """Generate for ``prompt`` and keep the request's steps from the engine's trace."""
        if not prompt:
            raise LabError("prompt is empty: type some text to continue")
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed)
        llm = self.llm(method, k)
        engine = llm.llm_engine
        first = len(engine.trace)
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        self.steps = [SpecStep(c.is_prefill, c.draft_token_ids, c.num_accepted, c.sampled_token)
                      for rec in engine.trace[first:] for c in rec.chunks if c.request_id == out.request_id]
        self.settings, self.tokenizer = (method, k, temperature), engine.tokenizer
        self.output_token_ids = list(out.outputs[0].token_ids)
        self.metrics = out.metrics.spec_decode

    @property
    def decode_steps(self) -> list[SpecStep]:
        return [s for s in self.steps if not s.is_prefill]

    def summary(self) -> dict[str, float]:
        """The engine's draft counts for the request (`RequestOutput.metrics.spec_decode`), the tokens
        each decode step emitted, and what the i.i.d. model predicts from the measured rate."""
        m, steps = self.metrics, self.decode_steps
        emitted = sum(s.num_emitted for s in steps)
        k = self.settings[1] if self.settings else 0
        return {"decode steps": len(steps), "tokens": emitted, "proposed": m.num_proposed, "accepted": m.num_accepted,
                "acceptance rate": m.acceptance_rate, "tokens per step": emitted / len(steps) if steps else 0.0,
                "i.i.d. theory": expected_tokens_per_step(m.conditional_acceptance_rate, k) if m.num_steps else 1.0}


def _token_span(text: str, kind: str) -> str:
    shown = html.escape(text.replace("\n", "⏎").replace(" ", "·")) or "∅"
    style = f"background:{COLORS[kind]};color:white;padding:1px 3px;margin:1px;border-radius:3px;font-family:monospace"
    if kind in ("rejected", "unchecked"):
        style += ";text-decoration:line-through"
    return f'<span title="{kind}" style="{style}">{shown}</span>'


class SpecDecodeLab(Lab):
    """Method, ``k`` and temperature over a real run: each step's drafts coloured accepted,
    rejected (then unchecked), and the target's bonus or correction token."""

    def __init__(self, target: str, draft: str, prompt: str, *, max_tokens: int = 48, max_rows: int = 12):
        self.state = SpecRun(target, draft)
        self.max_tokens, self.max_rows = max_tokens, max_rows
        self.prompt = widgets.Textarea(value=prompt, description="prompt", continuous_update=False)
        self.method = widgets.Dropdown(options=list(METHODS), value="ngram", description="method", **WIDE)
        self.k = widgets.IntSlider(value=3, min=1, max=8, description="k", **WIDE)
        self.temperature = widgets.FloatSlider(value=0.0, min=0.0, max=1.5, step=0.1, description="temperature",
                                               **WIDE)
        controls = [self.prompt, self.method, self.k, self.temperature]
        for control in controls:
            self.on_change(control, lambda _value: self._rerun())
        self._rerun()
        super().__init__([controls[:2], controls[2:]], figure=True)

    def _rerun(self) -> None:
        self.state.run(self.prompt.value, self.method.value, self.k.value, self.temperature.value, self.max_tokens)

    def render(self) -> str:
        s, tok = self.state, self.state.tokenizer
        method, k, temperature = s.settings
        rows = ""
        for i, step in enumerate(s.decode_steps[:self.max_rows], 1):
            drafts = step.draft_token_ids
            spans = [_token_span(tok.decode([t]), "accepted") for t in drafts[:step.num_accepted]]
            spans += [_token_span(tok.decode([t]), "rejected" if j == step.num_accepted else "unchecked")
                      for j, t in enumerate(drafts) if j >= step.num_accepted]
            if step.sampled_token is not None:
                spans.append(_token_span(tok.decode([step.sampled_token]), step.added_kind))
            rows += (f"<tr><td>{i}</td><td>{len(drafts)}</td><td>{step.num_accepted}</td>"
                     f"<td>{step.num_emitted}</td><td>{''.join(spans)}</td></tr>")
        more = len(s.decode_steps) - self.max_rows
        legend = " ".join(_token_span(kind, kind) for kind in COLORS)
        m = s.summary()
        stats = (f"{m['decode steps']} decode steps emitted {m['tokens']} tokens ({m['tokens per step']:.2f} per "
                 f"step; the i.i.d. model predicts {m['i.i.d. theory']:.2f} from the measured rate); "
                 f"{m['accepted']} of {m['proposed']} drafts accepted ({m['acceptance rate']:.0%})")
        return (f"<p><b>{method}</b>, k={k}, temperature={temperature:g}: {stats}</p><p>{legend}</p>"
                "<table><tr><th>step</th><th>drafts</th><th>accepted</th><th>emitted</th><th>tokens</th></tr>"
                f"{rows}</table>" + (f"<p>... and {more} more steps</p>" if more > 0 else ""))

    def figure(self):
        steps = self.state.decode_steps
        fig = Figure(figsize=(8, 2.6))
        ax = fig.add_subplot()
        x = range(1, len(steps) + 1)  # numbered like the table
        accepted = [s.num_accepted for s in steps]
        rejected = [len(s.draft_token_ids) - s.num_accepted for s in steps]
        added = [int(s.sampled_token is not None) for s in steps]
        ax.bar(x, accepted, color=COLORS["accepted"], label="drafts accepted")
        ax.bar(x, added, bottom=accepted, color=COLORS["bonus"], label="token added by the target")
        ax.bar(x, rejected, bottom=[a + b for a, b in zip(accepted, added)], color=COLORS["rejected"],
               alpha=0.35, label="drafts rejected or unchecked")
        method, k, temperature = self.state.settings
        ax.set(xlabel="decode step of the request", ylabel="tokens",
               title=f"Each verifying step: {method}, k={k}, temperature={temperature:g}")
        ax.legend(loc="upper right", fontsize=7)
        fig.tight_layout()
        return fig
