"""The OpenAI API's request bodies (and vLLM's extra sampling fields), as pydantic models, and how
each becomes a `SamplingParams`. Unknown fields are ignored, as OpenAI's and vLLM's servers do."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from minivllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The fields both endpoints share: OpenAI's, then vLLM's extras."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None  # token id (as a string, JSON keys are) -> bias
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extra parameters
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    bad_words: list[str] | None = None
    structured_outputs: dict[str, Any] | None = None  # StructuredOutputsParams' fields

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """ValueError naming the field for a value `SamplingParams` refuses."""
        bias = None
        if self.logit_bias is not None:
            try:
                bias = {int(token): value for token, value in self.logit_bias.items()}
            except ValueError:
                raise ValueError(f"logit_bias={self.logit_bias!r} must map token ids to biases") from None
        structured = self.structured_outputs_params()
        optional = {name: value for name, value in (
            ("temperature", self.temperature), ("top_p", self.top_p), ("top_k", self.top_k), ("min_p", self.min_p),
            ("repetition_penalty", self.repetition_penalty)) if value is not None}
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, stop=self.stop, seed=self.seed, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, logit_bias=bias, min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos, stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output, skip_special_tokens=self.skip_special_tokens,
            bad_words=self.bad_words, structured_outputs=structured, logprobs=logprobs,
            output_kind=RequestOutputKind.DELTA, **optional)

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        if self.structured_outputs is None:
            return None
        try:
            return StructuredOutputsParams(**self.structured_outputs)
        except TypeError as e:
            raise ValueError(f"structured_outputs={self.structured_outputs!r}: {e}") from None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None  # the legacy API's top-k
    echo: bool = False
    suffix: str | None = None

    def single_prompt(self) -> str | list[int]:
        """The one prompt (a string or token ids); ValueError for a batch or what is not supported."""
        if self.echo:
            raise ValueError("echo=True is not supported")
        if self.suffix is not None:
            raise ValueError(f"suffix={self.suffix!r} is not supported")
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ValueError(f"prompt holds {len(p)} prompts: send one per request")
            p = p[0]
        if isinstance(p, list) and not p:
            raise ValueError("prompt=[] is empty: a request needs at least one token")
        return p


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str


class JsonSchemaFormat(BaseModel):
    name: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True
    chat_template: str | None = None

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """vLLM's ``structured_outputs``, or OpenAI's ``response_format``."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return super().structured_outputs_params()
        if fmt.type == "json_object":
            return StructuredOutputsParams(json={"type": "object"})
        if fmt.json_schema is None:
            raise ValueError("response_format.json_schema is required when response_format.type is 'json_schema'")
        return StructuredOutputsParams(json=fmt.json_schema.schema_)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]
