"""Between the protocol adapters and the engine: checked prompts in, finished or streamed completions out.

Every protocol adapter (OpenAI completions and chat, KServe V1, Open Inference V2 infer, V2 generate) follows one
recipe, ``Generation.prepare``: resolve the ``model`` name, tokenize (or render the chat template), check the
prompt and ``max_tokens`` against the limits, fill the model's sampling defaults, expand ``n`` choices, compile
the output grammar and build the engine requests. So the limits and their error messages are the same on every
route, and an adapter only translates its wire format; it never touches the loaded model itself.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from jinja2 import TemplateError

from .engine import Engine, Sequence
from .engine.stop_strings import stop_automaton
from .engine.structured import GrammarCompiler
from .errors import ClientDisconnected, InvalidRequest
from .loading import LoadedModel
from .request_context import current_request_id, current_trace_carrier
from .sampling import GenerationRequest, GrammarSpec, SamplingParams, StepOutput, TokenLogprob, seed_for_choice

# max_tokens when a non-chat request gives none (the OpenAI completions default).
DEFAULT_MAX_TOKENS = 16
# Stop strings up to this many characters in all are matched with an automaton built in place (well under a millisecond).
SMALL_STOP_CHARS = 1024

Disconnected = Callable[[], Awaitable[bool]]


class SamplingSource(Protocol):
    """A protocol request's sampling fields (``protocols.schema.SamplingFields``): engine parameters, given the
    checked ``max_tokens`` and the model's sampling defaults for the fields the request leaves unset."""

    def sampling_params(self, max_tokens: int, defaults: dict[str, float], logprobs: int | None = None, logit_bias: dict | None = None) -> SamplingParams: ...


@dataclass
class ChatPrompt:
    """A chat conversation as a prompt: rendered with the model's chat template (``tools`` passed to it)."""

    messages: list[dict]
    tools: list[dict] | None = None
    add_generation_prompt: bool = True


Prompt = str | list[int] | ChatPrompt


@dataclass
class Prepared:
    """The engine requests of one protocol request: each prompt's token ids, and its choices as (index, request),
    prompt by prompt (prompt i's choice j has index ``first_index + i * n + j``)."""

    prompt_ids: list[list[int]] = field(default_factory=list)
    jobs: list[tuple[int, GenerationRequest]] = field(default_factory=list)

    @property
    def requests(self) -> list[GenerationRequest]:
        return [request for _, request in self.jobs]

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompt_ids))


@dataclass
class Completion:
    """A finished sequence, accumulated from its ``StepOutput``s."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0

    def add(self, out: StepOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.finish_reason = out.finish_reason or self.finish_reason
        self.num_prompt_tokens = out.num_prompt_tokens


class Generation:
    """The model's tokenizer and limits plus its engine: what every protocol adapter calls."""

    def __init__(self, loaded: LoadedModel, engine: Engine, served_name: str):
        self.served_name = served_name
        self.attach(loaded, engine)

    def attach(self, loaded: LoadedModel, engine: Engine) -> None:
        """Serve ``loaded`` through ``engine`` (again, after the model was unloaded and loaded: the routes keep this object)."""
        self.loaded = loaded
        self.engine = engine
        self.grammars = GrammarCompiler(loaded.tokenizer, loaded.vocab_size, loaded.eos_token_id)

    def encode(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """Token ids of a text prompt, or a token-id prompt checked against the vocabulary."""
        if isinstance(prompt, str):
            ids = self.loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        else:
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.loaded.vocab_size]
            if bad:
                raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary [0, {self.loaded.vocab_size})", param=param)
        if not ids:
            raise InvalidRequest("the prompt is empty", param=param)
        return ids

    def chat_prompt(self, chat: ChatPrompt) -> list[int]:
        """Render the chat template (the model's, or the documented fallback) and tokenize it.

        ``tools`` go to the template as ``tools=`` (only for templates that use them; see
        ``protocols/tool_calls.py``). A template that refuses the conversation (``raise_exception``) is a 400.
        """
        extra = {"tools": chat.tools} if chat.tools else {}
        try:
            text = self.loaded.tokenizer.apply_chat_template(
                chat.messages, chat_template=self.loaded.chat_template, add_generation_prompt=chat.add_generation_prompt, tokenize=False, **extra
            )
        except TemplateError as exc:
            raise InvalidRequest(f"the model's chat template refused these messages: {exc}", param="messages") from None
        return self.encode(text, param="messages")

    def max_tokens(self, prompt_ids: list[int], requested: int | None, default: int | None = DEFAULT_MAX_TOKENS) -> int:
        """Check the prompt and ``max_tokens`` against ``--max_model_len``; ``None`` default means 'the rest'."""
        limit = self.loaded.max_model_len
        if len(prompt_ids) >= limit:
            raise InvalidRequest(
                f"the prompt has {len(prompt_ids)} tokens but this model's maximum context length is {limit} tokens "
                "(prompt and generated tokens together); shorten the prompt",
                param="prompt",
            )
        room = limit - len(prompt_ids)
        cache = self.engine.max_cached_tokens  # one sequence may fill the whole KV-cache pool, no more
        if requested is None:
            room = min(room, cache - len(prompt_ids))
            if room < 1:
                raise InvalidRequest(self._cache_message(len(prompt_ids), 1, cache), param="prompt")
            return room if default is None else min(default, room)
        if requested < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        if requested > room:
            raise InvalidRequest(
                f"max_tokens is {requested} but the prompt has {len(prompt_ids)} tokens and this model's maximum "
                f"context length is {limit} tokens, so at most {room} tokens can be generated",
                param="max_tokens",
            )
        if len(prompt_ids) + requested > cache:
            raise InvalidRequest(self._cache_message(len(prompt_ids), requested, cache), param="max_tokens")
        return requested

    @staticmethod
    def _cache_message(prompt: int, requested: int, cache: int) -> str:
        return (
            f"the prompt ({prompt} tokens) and max_tokens ({requested}) need {prompt + requested} KV-cache positions, but the "
            f"server's whole KV cache holds {cache} (--kv_cache_memory); shorten the request or ask the operator for a larger cache"
        )

    @property
    def lora_adapters(self) -> dict:
        """The LoRA adapters served beside the base model (``--lora_modules``, runtime loads), by name; not those unloading."""
        lora = self.engine.lora
        return {name: a for name, a in lora.adapters.items() if name not in lora.unloading} if lora is not None else {}

    def resolve_model(self, model: str) -> str | None:
        """The LoRA adapter a request's ``model`` names, None for the base model (the served name); any other name is a 404."""
        if model == self.served_name:
            return None
        if model not in self.lora_adapters:
            served = ", ".join(f"'{n}'" for n in [self.served_name, *self.lora_adapters])
            raise InvalidRequest(f"the model '{model}' does not exist; this server serves {served}", param="model", status=404, code="model_not_found")
        return model

    async def prepare(
        self,
        prompts: list[Prompt],
        fields: SamplingSource,
        *,
        max_tokens: int | None,
        default_max_tokens: int | None = DEFAULT_MAX_TOKENS,
        model: str | None = None,
        n: int = 1,
        first_index: int = 0,
        param: str = "prompt",
        logprobs: int | None = None,
        logit_bias: dict | None = None,
        prompt_logprobs: bool = False,
        structured: GrammarSpec | None = None,
    ) -> Prepared:
        """The recipe every protocol adapter follows, from its parsed request to engine requests, in the order its
        errors are reported: ``model`` resolved to the base model or a LoRA adapter (None: the base model); each
        prompt tokenized (``param`` names it in errors) and checked with ``max_tokens`` against the limits
        (``default_max_tokens`` when the request gives none; None there means 'the rest of the context');
        ``n`` choices per prompt, choice j of a seeded request seeded ``seed + j``; sampling defaults filled."""
        lora = None if model is None else self.resolve_model(model)
        prepared = Prepared()
        for i, prompt in enumerate(prompts):
            ids = self.chat_prompt(prompt) if isinstance(prompt, ChatPrompt) else self.encode(prompt, param)
            limit = self.max_tokens(ids, max_tokens, default_max_tokens)
            prepared.prompt_ids.append(ids)
            for j in range(n):
                params = fields.sampling_params(limit, self.loaded.sampling_defaults, logprobs, logit_bias)
                params.structured = structured
                if params.seed is not None:
                    params.seed = seed_for_choice(params.seed, j)
                index = first_index + i * n + j
                prepared.jobs.append((index, await self._request(ids, params, prompt_logprobs, lora, index)))
        return prepared

    async def _request(self, prompt_ids: list[int], params: SamplingParams, prompt_logprobs: bool, lora: str | None, index: int) -> GenerationRequest:
        """The engine request for one sequence (choice ``index`` of the protocol request): parameters checked, its output
        grammar compiled (off the event loop; a bad one is a 400 before anything is queued)."""
        params.validate(self.loaded.vocab_size)
        grammar = None
        if params.structured is not None:
            grammar = await self.grammars.compile_async(params.structured, params.structured.param)
        stops = None
        if params.stop:  # a large set takes a while to build: never on the event loop, never on the engine thread
            small = sum(map(len, params.stop)) <= SMALL_STOP_CHARS
            stops = stop_automaton(tuple(params.stop)) if small else await asyncio.to_thread(stop_automaton, tuple(params.stop))
        request_id = current_request_id() or uuid.uuid4().hex
        return GenerationRequest(
            request_id if index == 0 else f"{request_id}-{index}", prompt_ids, params, prompt_logprobs, grammar, lora, stops, current_trace_carrier()
        )

    def submit_all(self, requests: list[GenerationRequest], param: str = "n") -> list[Sequence]:
        """Queue every request or none. More sequences than the server can ever hold at once is the client's error
        (a 400 naming ``param`` and the limits: retrying cannot help); more than it holds now is ``QueueFull`` (429)."""
        capacity = self.engine.capacity
        if len(requests) > capacity:
            config = self.engine.config
            raise InvalidRequest(
                f"this request needs {len(requests)} sequences (prompts × n) but the server holds at most {capacity} at once "
                f"({config.max_num_seqs} running, --max_num_seqs, and {config.max_queue} waiting, --max_queue); send fewer per request",
                param=param,
            )
        return self.engine.submit_all(requests)

    async def complete_all(self, requests: list[GenerationRequest], disconnected: Disconnected | None = None, param: str = "n") -> list[Completion]:
        """Run requests to the end. With ``disconnected``, a client that goes away cancels them within 0.2 s."""
        seqs = self.submit_all(requests, param)

        async def collect(seq: Sequence) -> Completion:
            completion = Completion(num_prompt_tokens=len(seq.request.prompt_ids))
            async for out in seq.stream():
                completion.add(out)
            return completion

        work = asyncio.gather(*(collect(s) for s in seqs))
        if disconnected is None:
            return await work
        try:
            while True:
                done, _ = await asyncio.wait({work}, timeout=0.2)
                if done:
                    return work.result()
                if await disconnected():
                    for seq in seqs:
                        seq.cancel()
                    raise ClientDisconnected("client closed the request")
        finally:
            if not work.done():
                work.cancel()
                work.add_done_callback(lambda future: future.cancelled() or future.exception())

    def token_text(self, token_id: int) -> str:
        return self.loaded.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)

    def decode(self, ids: list[int], clean_up: bool | None = False) -> str:
        """The text of token ids; ``clean_up``: the clean-up of spaces before punctuation (None: the tokenizer's default)."""
        extra = {} if clean_up is None else {"clean_up_tokenization_spaces": clean_up}
        return self.loaded.tokenizer.decode(ids, **extra)

    def token_strs(self, ids: list[int]) -> list[str]:
        """The tokenizer's own string for each token id (byte-level pieces, not decoded text)."""
        return self.loaded.tokenizer.convert_ids_to_tokens(ids)

    @property
    def chat_template(self) -> str | None:
        """The chat template in use (the model's, or the documented fallback); the tool-call format is read from it."""
        return self.loaded.chat_template

    @property
    def max_model_len(self) -> int:
        return self.loaded.max_model_len

    @property
    def base_model(self):
        """The served model itself (a runtime LoRA adapter is checked against its projections)."""
        return self.loaded.model
