"""Request bodies of the HTTP protocols, as pydantic models that reject unknown fields and wrong types.

``SamplingFields`` is shared by every protocol, so a parameter means the same thing on each route and
is converted to ``SamplingParams`` in one place.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..sampling import InvalidRequest, SamplingParams


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingFields(_Strict):
    """Sampling parameters accepted by every route (OpenAI names, with vLLM's extensions)."""

    max_tokens: int | None = None
    # None: the model's generation_config.json value if it has one (see loading.sampling_defaults), else
    # the OpenAI / vLLM default in SamplingParams.
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0

    def sampling_params(self, max_tokens: int, defaults: dict[str, float], logprobs: int | None = None, logit_bias: dict | None = None) -> SamplingParams:
        """``defaults`` (the model's recommended sampling) fill the fields the request leaves unset."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        bias: dict[int, float] = {}
        for key, value in (logit_bias or {}).items():
            try:
                bias[int(key)] = float(value)
            except (TypeError, ValueError):
                raise InvalidRequest(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        chosen = {name: getattr(self, name) for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
        chosen = {name: defaults[name] if value is None and name in defaults else value for name, value in chosen.items()}
        return SamplingParams(
            max_tokens=max_tokens,
            **{name: value for name, value in chosen.items() if value is not None},
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            logit_bias=bias,
        )


class StreamOptions(_Strict):
    include_usage: bool = False


class _OpenAIFields(SamplingFields):
    model: str
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an end-user id for the caller's own tracing; it does not change generation


class CompletionRequest(_OpenAIFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ResponseFormat(_Strict):
    type: str


class ChatCompletionRequest(_OpenAIFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


class GenerateRequest(_Strict):
    """Body of the V2 generate extension: ``text_input`` and optional ``parameters``."""

    text_input: str
    parameters: SamplingFields = Field(default_factory=SamplingFields)


def parse(model: type[BaseModel], body: bytes) -> Any:
    """Validate a JSON body; a malformed or invalid one becomes ``InvalidRequest`` naming the field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError) -> InvalidRequest:
    """The first validation problem as a client error that names its parameter."""
    err = exc.errors(include_url=False)[0]
    param = ".".join(str(part) for part in err["loc"]) or None
    if err["type"] == "json_invalid":
        return InvalidRequest(f"request body is not valid JSON: {err['msg']}", param=None)
    if err["type"] == "extra_forbidden":
        return InvalidRequest(f"unknown parameter '{param}'", param=param)
    if err["type"] == "missing":
        return InvalidRequest(f"missing required parameter '{param}'", param=param)
    return InvalidRequest(f"invalid value for '{param}': {err['msg']}", param=param)
