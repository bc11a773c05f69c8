"""Per-request sampling settings, named and validated as in vLLM."""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # vLLM's default max_logprobs: the most top-k entries a request may ask for


class RequestOutputKind(enum.Enum):
    """What `LLMEngine.step` hands back for a request (vLLM's names). minivllm's default is
    FINAL_ONLY, one output when the request has finished, which is what `LLM.generate` asks for
    (vLLM's engine defaults to CUMULATIVE); a streaming server asks for DELTA."""

    CUMULATIVE = 0  # after every step that gave it a token: all of its output so far
    DELTA = 1  # after every step that gave it a token: only what is new since the last output
    FINAL_ONLY = 2  # once, when it has finished


@dataclass
class StructuredOutputsParams:
    """Constrain a request's output to a language; set exactly one of the four (vLLM's names).

    ``json``: a JSON schema (a dict or its JSON text); ``regex``: a regular expression;
    ``choice``: the output is one of these strings; ``grammar``: an EBNF grammar (GBNF, ``root ::= ...``).
    The engine compiles it with xgrammar and masks, every step, the tokens that would leave the language.
    JSON may hold any whitespace between its tokens unless ``disable_any_whitespace`` (then it is compact:
    a small model that likes spaces cannot pad it forever).
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"StructuredOutputsParams sets {given or 'nothing'}: set exactly one of json, regex, "
                             "choice, grammar")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError(f"StructuredOutputsParams.disable_any_whitespace={self.disable_any_whitespace!r} "
                             "must be a bool")
        if isinstance(self.json, str):
            try:
                json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"StructuredOutputsParams.json={self.json!r} is not valid JSON: {e}") from None
        elif self.json is not None and not isinstance(self.json, dict):
            raise ValueError(f"StructuredOutputsParams.json={self.json!r} must be a JSON schema (dict or str)")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"StructuredOutputsParams.{name}={value!r} must be a non-empty str")
        if self.choice is not None:
            if isinstance(self.choice, str) or not self.choice or not all(
                    isinstance(c, str) and c for c in self.choice):
                raise ValueError(f"StructuredOutputsParams.choice={self.choice!r} must be a non-empty list of "
                                 "non-empty strings")
            self.choice = list(self.choice)

    @property
    def kind(self) -> str:
        return next(name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None)


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops.

    ``temperature=0`` is greedy. ``top_k=-1``, ``top_p=1`` and ``min_p=0`` turn those filters off.
    A request with a ``seed`` draws from its own generator, so its tokens do not depend on what
    else shares the batch; with ``n`` > 1, sample ``i`` uses ``seed + i``.

    The logits pass through, in order: the structured-output mask, ``logit_bias``, the bans
    (``bad_words``; EOS and ``stop_token_ids`` before ``min_tokens``), the penalties
    (``repetition_penalty`` over prompt and output, ``frequency_penalty`` and ``presence_penalty``
    over the output), ``temperature``, then top-k, top-p and min-p. ``logprobs`` and
    ``prompt_logprobs`` report the model's own log-probabilities, before any of these (vLLM's
    default, ``raw_logprobs``).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputsParams | None = field(default=None)
    output_kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.bad_words = list(self.bad_words or [])
        _check(_is_int(self.n) and self.n >= 1, "n", self.n, "must be an int >= 1")
        _check(_is_number(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
               "must be >= 0")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        _check(_is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1),
               "top_k", self.top_k, "must be -1 (off) or an int >= 1")
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -2 <= value <= 2, name, value, "must be in [-2, 2]")
        _check(_is_number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
               self.repetition_penalty, "must be > 0 (1 is off)")
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1,
               "max_tokens", self.max_tokens, "must be an int >= 1")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
               self.min_tokens, f"must be an int in [0, max_tokens={self.max_tokens}]")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "must hold non-empty strings")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", self.stop_token_ids, "must hold token ids >= 0")
        _check(self.seed is None or _is_int(self.seed), "seed", self.seed, "must be an int or None")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS), name, value,
                   f"must be None or an int in [0, {MAX_LOGPROBS}] (the top-k to report)")
        if self.logit_bias is not None:
            _check(isinstance(self.logit_bias, dict) and all(
                _is_int(t) and t >= 0 and _is_number(b) and -100 <= b <= 100 for t, b in self.logit_bias.items()),
                "logit_bias", self.logit_bias, "must map token ids >= 0 to biases in [-100, 100]")
            self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()}
        _check(all(isinstance(w, str) and w.strip() for w in self.bad_words), "bad_words", self.bad_words,
               "must hold non-blank strings")
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs", self.structured_outputs, "must be a StructuredOutputsParams or None")
        _check(isinstance(self.output_kind, RequestOutputKind), "output_kind", self.output_kind,
               "must be a RequestOutputKind")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "must be a bool")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def _check(ok: bool, field: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{field}={value!r} {rule}")
