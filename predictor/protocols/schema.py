"""Request bodies of the HTTP protocols, as pydantic models that reject unknown fields and wrong types.

``SamplingFields`` is shared by every protocol, so a parameter means the same thing on each route and
is converted to ``SamplingParams`` in one place.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import InvalidRequest
from ..sampling import INT64_MAX, INT64_MIN, MAX_LOGPROBS, GrammarSpec, SamplingParams

# Every integer of a request is bounded: ranges the engine can hold, checked before anything is queued.
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingFields(_Strict):
    """Sampling parameters accepted by every route (OpenAI names, with vLLM's extensions)."""

    max_tokens: Annotated[int, Field(ge=1, le=INT64_MAX)] | None = None
    # None: the model's generation_config.json value if it has one (see loading.sampling_defaults), else
    # the OpenAI / vLLM default in SamplingParams.
    temperature: float | None = None
    top_p: float | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT64_MAX)] | None = None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    min_tokens: Count = 0

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


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_only_with_its_type(self) -> ResponseFormat:
        if self.json_schema is not None and self.type != "json_schema":
            raise ValueError(f"json_schema is only read with type 'json_schema', not {self.type!r}: it would be ignored")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` extra body: exactly one constraint."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


ANY_JSON_OBJECT = {"type": "object"}


def closed(schema: Any) -> Any:
    """OpenAI's ``strict: true``: every object schema that lists ``properties`` and says nothing of others gets
    ``additionalProperties: false``, so the output has exactly the listed keys (plain JSON Schema allows more)."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def json_schema_spec(schema: dict | str, param: str, strict: bool = False) -> GrammarSpec:
    """A JSON schema (object, or its text) as a hashable spec: compact JSON, keys in their given order (the order
    the output writes them), so equal schemas share a compile; ``strict`` closes its objects (:func:`closed`)."""
    if isinstance(schema, str):
        schema = parse_json(schema, param)
    if not isinstance(schema, dict):
        raise InvalidRequest(f"'{param}' must be a JSON schema object", param=param)
    return GrammarSpec("json_schema", json.dumps(closed(schema) if strict else schema, separators=(",", ":")), param)


class _OpenAIFields(SamplingFields):
    model: str
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an end-user id for the caller's own tracing; it does not change generation
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def grammar_spec(self) -> GrammarSpec | None:
        """The one output constraint the request asks for, or None; two at once is a 400."""
        found: list[GrammarSpec] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(json_schema_spec(ANY_JSON_OBJECT, "response_format"))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise InvalidRequest("response_format of type 'json_schema' needs json_schema.schema", param="response_format.json_schema")
            found.append(json_schema_spec(rf.json_schema.schema_, "response_format.json_schema.schema", bool(rf.json_schema.strict)))
        so = self.structured_outputs
        if so is not None:
            given = {
                k: v for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice), ("grammar", so.grammar), ("json_object", so.json_object)) if v
            }
            if len(given) != 1:
                raise InvalidRequest("structured_outputs takes exactly one of json, regex, choice, grammar, json_object", param="structured_outputs")
            ((key, value),) = given.items()
            found.append(_spec(key, value, f"structured_outputs.{key}"))
        for key, value in (("json", self.guided_json), ("regex", self.guided_regex), ("choice", self.guided_choice), ("grammar", self.guided_grammar)):
            if value is not None:
                found.append(_spec(key, value, f"guided_{key}"))
        if len(found) > 1:
            raise InvalidRequest(f"give one output constraint, not {' and '.join(s.param for s in found)}", param=found[1].param)
        return found[0] if found else None


def _spec(key: str, value: Any, param: str) -> GrammarSpec:
    if key == "json":
        return json_schema_spec(value, param)
    if key == "json_object":
        return json_schema_spec(ANY_JSON_OBJECT, param)
    if key == "choice":
        if not value or not all(value):
            raise InvalidRequest(f"'{param}' must be a non-empty list of non-empty strings", param=param)
        return GrammarSpec("choice", json.dumps(value), param)
    if not value:
        raise InvalidRequest(f"'{param}' is empty", param=param)
    return GrammarSpec(key, value, param)


class CompletionRequest(_OpenAIFields):
    prompt: str | list[str] | list[Int64] | list[list[Int64]]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    best_of: Int64 | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # a JSON object, as text

    @field_validator("arguments")
    @classmethod
    def _an_object(cls, value: str) -> str:
        try:
            decoded = pydantic_core.from_json(value)  # its depth limit, not Python's recursion
        except ValueError as exc:
            raise ValueError(f"arguments must be a JSON object, as text: {exc}") from None
        if not isinstance(decoded, dict):
            raise ValueError(f"arguments must be a JSON object, as text; got {value[:80]!r}")
        return value


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages: the calls it made
    tool_call_id: str | None = None  # tool messages: the call this is the result of

    @model_validator(mode="after")
    def _tool_fields_on_their_roles(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id: the id of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls belong to assistant messages, not {self.role} messages")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _an_object_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """Checked whatever tool_choice says: the same tools are valid or not for every choice."""
        if value is None:
            return value
        from ..engine.schema_checks import check_schema

        if value.get("type", "object") != "object":
            raise ValueError(f"parameters must be a JSON schema of an object (the arguments); got type {value.get('type')!r}")
        check_schema(value)
        return value


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_OpenAIFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT64_MAX)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class GenerateRequest(_Strict):
    """Body of the V2 generate extension: ``text_input`` and optional ``parameters``."""

    text_input: str
    parameters: SamplingFields = Field(default_factory=SamplingFields)


def parse_json(text: bytes | str, param: str | None = None) -> Any:
    """JSON (the request body, or the text of parameter ``param``), parsed by pydantic's parser: its depth limit makes
    JSON nested thousands of levels a 400, not a RecursionError."""
    what = f"'{param}'" if param else "request body"
    try:
        return pydantic_core.from_json(text)
    except ValueError as exc:
        if "recursion limit" in str(exc):
            raise InvalidRequest(f"{what} is nested too deeply (JSON parser limit): {exc}", param=param) from None
        raise InvalidRequest(f"{what} is not valid JSON: {exc}", param=param) from None


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
        if "recursion limit" in err["msg"]:
            return InvalidRequest(f"request body is nested too deeply (JSON parser limit): {err['msg']}", param=param)
        return InvalidRequest(f"request body is not valid JSON: {err['msg']}", param=None)
    if param is None:  # the body itself is not an object
        return InvalidRequest(f"request body must be a JSON object: {err['msg']}", param=None)
    if err["type"] == "extra_forbidden":
        return InvalidRequest(f"unknown parameter '{param}'", param=param)
    if err["type"] == "missing":
        return InvalidRequest(f"missing required parameter '{param}'", param=param)
    return InvalidRequest(f"invalid value for '{param}': {err['msg']}", param=param)
