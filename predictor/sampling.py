"""The one request type every protocol builds: prompt token ids plus ``SamplingParams``.

Protocol adapters translate their wire format into these objects and validate there (4xx); the engine
never sees HTTP. Ranges follow the OpenAI API, with vLLM's extensions (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequest

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 4096  # characters of one stop string
# Integers are 64-bit from the wire to the tensors: a larger seed or count is a 400 naming it, never an overflow in a step.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def seed_for_choice(seed: int, index: int) -> int:
    """Choice ``index`` of a seeded request uses ``seed + index``, wrapped into the 64-bit range the generator takes."""
    return (seed + index - INT64_MIN) % 2**64 + INT64_MIN


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint on the output: ``kind`` is ``json_schema`` (``source`` the schema as compact JSON),
    ``regex``, ``choice`` (a JSON list of strings) or ``grammar`` (Lark or GBNF). Hashable: the
    compiled-grammar cache's key. ``param`` names the request field it came from, for error messages."""

    kind: str
    source: str
    param: str = field(default="response_format", compare=False)


@dataclass
class SamplingParams:
    """How to pick tokens for one sequence. ``temperature == 0`` means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    structured: GrammarSpec | None = None  # constrained decoding (engine/structured.py)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int) -> None:
        """Raise ``InvalidRequest`` naming the first out-of-range parameter."""
        checks = [
            (self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (self.seed is None or INT64_MIN <= self.seed <= INT64_MAX, "seed", f"must be a 64-bit integer, between {INT64_MIN} and {INT64_MAX}"),
            (0.0 <= self.temperature <= 2.0, "temperature", "must be between 0 and 2"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k == -1 or self.top_k >= 0, "top_k", "must be -1 or 0 (disabled) or a positive integer"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be between 0 and 1"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be between -2 and 2"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be between -2 and 2"),
            (0.0 < self.repetition_penalty <= 10.0, "repetition_penalty", "must be in (0, 10]"),
            (self.min_tokens >= 0, "min_tokens", "must be non-negative"),
            (self.min_tokens <= self.max_tokens, "min_tokens", "must not exceed max_tokens"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", f"must be between 0 and {MAX_LOGPROBS}"),
            (len(self.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} stop strings"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty"),
            (all(len(s) <= MAX_STOP_LENGTH for s in self.stop), "stop", f"stop strings must be at most {MAX_STOP_LENGTH} characters"),
            (all(0 <= t < vocab_size for t in self.logit_bias), "logit_bias", f"token ids must be in [0, {vocab_size})"),
            (all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()), "logit_bias", "biases must be between -100 and 100"),
            (not (self.structured and self.ignore_eos), "ignore_eos", "cannot be combined with structured outputs (the grammar decides the end)"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidRequest(f"{param} {message}", param=param)


@dataclass
class GenerationRequest:
    """One sequence to generate: what the engine schedules."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt_logprobs: bool = False
    grammar: Any = None  # the compiled params.structured (engine.structured.Grammar), set by Generation.request
    lora: str | None = None  # a LoRA adapter's name (--lora_modules); None: the base model
    stops: Any = None  # params.stop as an engine.stop_strings.StopAutomaton, built by Generation.request
    trace_context: dict[str, str] | None = None  # the caller's W3C trace context (traceparent), for the request's span


@dataclass
class TokenLogprob:
    """Log-probability of a chosen token and the top alternatives at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class StepOutput:
    """What a request produced in one engine step: a text delta and, at the end, ``finish_reason``.

    ``token_ids`` and ``logprobs`` cover the tokens behind this delta; ``prompt_logprobs`` is sent once,
    with the first output, when asked for.
    """

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
