"""OpenAI-compatible routes: completions, chat completions and the model list, under /openai/v1 and /v1.

Streaming is server-sent events ending with ``data: [DONE]``. A parameter the server cannot honour is
rejected with a 400 that names it; errors use the OpenAI error body.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import StreamingResponse

from ..engine import Sequence
from ..errors import InvalidRequest, PredictorError
from ..generation import ChatPrompt, Completion, Generation, Prepared
from ..request_context import current_request_id
from ..sampling import GenerationRequest, GrammarSpec, StepOutput, TokenLogprob
from . import tool_calls
from .schema import ChatCompletionRequest, CompletionRequest, NamedToolChoice, parse
from .sse import event_stream, sse

PREFIXES = ("/openai/v1", "/v1")


def response_id(prefix: str) -> str:
    """OpenAI's ``id``: the request id (``X-Request-Id``) behind the object's prefix, as vLLM writes it."""
    return f"{prefix}-{current_request_id() or uuid.uuid4().hex}"


class OpenAIRoutes:
    """Handlers bound to one served model."""

    def __init__(self, generation: Generation, created: int | None = None, tool_call_parser: str = "auto"):
        self.gen = generation
        self.created = created or int(time.time())
        self.tool_call_parser = tool_calls.detect_parser(generation.chat_template) if tool_call_parser == "auto" else tool_call_parser

    async def models(self) -> dict:
        served = self.gen.served_name
        card = {"id": served, "object": "model", "created": self.created, "owned_by": "kserve-llm", "max_model_len": self.gen.max_model_len}
        # LoRA adapters as vLLM lists them, parent the base model; root is the adapter's name (its directory is the server's business)
        adapters = [{**card, "id": a.name, "root": a.name, "parent": served} for a in self.gen.lora_adapters.values()]
        # "models" keeps KServe V1's GET /v1/models answer, which shares this path, for V1 clients.
        return {"object": "list", "data": [card, *adapters], "models": [served]}

    def _stream(self, body, prepared: Prepared, events: Callable[[list[Sequence], bool], AsyncIterator[str]]) -> StreamingResponse:
        """Queue the requests and answer with the SSE stream that ``events(sequences, include_usage)`` writes."""
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _event_stream(events(self.gen.submit_all(prepared.requests), include_usage))

    # ---- completions -------------------------------------------------------------------------------

    async def completions(self, request: Request):
        body = parse(CompletionRequest, await request.body())
        if body.suffix:
            raise InvalidRequest("suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise InvalidRequest("best_of other than n is not supported", param="best_of")
        if body.stream_options is not None and not body.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")
        prepared = await self.gen.prepare(
            _prompt_list(body.prompt),
            body,
            max_tokens=body.max_tokens,
            model=body.model,
            n=body.n,
            logprobs=body.logprobs,
            logit_bias=body.logit_bias,
            prompt_logprobs=body.echo and body.logprobs is not None,
            structured=body.grammar_spec(),
        )
        jobs, prompt_token_total = prepared.jobs, prepared.prompt_tokens
        rid = response_id("cmpl")
        if body.stream:
            return self._stream(body, prepared, lambda seqs, usage: self._completion_events(rid, body, jobs, seqs, prompt_token_total, usage))
        results = await self.gen.complete_all(prepared.requests, request.is_disconnected)
        choices = []
        for (index, req), done in zip(jobs, results):
            text = done.text
            logprobs = None
            if body.echo:
                text = self.gen.decode(req.prompt_ids) + text
            if body.logprobs is not None:
                logprobs = self._completion_logprobs((done.prompt_logprobs or []) + done.logprobs, req.prompt_ids)
            choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": done.finish_reason})
        return {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model,  # the base model or the LoRA adapter asked for, as vLLM answers
            "choices": choices,
            "usage": _usage(prompt_token_total, results),
        }

    async def _completion_events(self, rid, body, jobs, seqs, prompt_tokens, include_usage) -> AsyncIterator[str]:
        created = int(time.time())
        generated = 0
        started: set[int] = set()
        async for index, req, out in _merge(jobs, seqs):
            text = out.text
            if body.echo and index not in started:
                text = self.gen.decode(req.prompt_ids) + text
            started.add(index)
            logprobs = None
            if body.logprobs is not None:
                logprobs = self._completion_logprobs((out.prompt_logprobs or []) + (out.logprobs or []), req.prompt_ids)
            generated += len(out.token_ids)
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason}
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": body.model, "choices": [choice]})
        if include_usage:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated}
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": body.model, "choices": [], "usage": usage})
        yield sse("[DONE]")

    def _completion_logprobs(self, entries: list[TokenLogprob | None], prompt_ids: list[int]) -> dict:
        tokens, token_logprobs, top, offsets = [], [], [], []
        offset = 0
        for entry in entries:
            token_id = prompt_ids[0] if entry is None else entry.token_id
            text = self.gen.token_text(token_id)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            token_logprobs.append(None if entry is None else entry.logprob)
            top.append(None if entry is None else {self.gen.token_text(t): lp for t, lp in entry.top})
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    # ---- chat completions --------------------------------------------------------------------------

    async def chat_completions(self, request: Request):
        body = parse(ChatCompletionRequest, await request.body())
        if body.stream_options is not None and not body.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
        if body.max_tokens is not None and body.max_completion_tokens is not None and body.max_tokens != body.max_completion_tokens:
            raise InvalidRequest("give max_completion_tokens or max_tokens, not two different values", param="max_completion_tokens")
        tool_mode, structured = self._tool_mode(body, body.grammar_spec())
        messages, tools = tool_calls.prompt_messages(body.messages, body.tools or [], self.gen.chat_template)
        prepared = await self.gen.prepare(
            [ChatPrompt(messages, tools)],
            body,
            max_tokens=body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
            default_max_tokens=None,  # chat: the rest of the context, as OpenAI's API
            model=body.model,
            n=body.n,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            logit_bias=body.logit_bias,
            structured=structured,
        )
        jobs, prompt_tokens = prepared.jobs, prepared.prompt_tokens
        rid = response_id("chatcmpl")
        if body.stream:
            return self._stream(body, prepared, lambda seqs, usage: self._chat_events(rid, jobs, seqs, prompt_tokens, usage, tool_mode))
        results = await self.gen.complete_all(prepared.requests, request.is_disconnected)
        choices = []
        for (index, _), done in zip(jobs, results):
            message: dict[str, Any] = {"role": "assistant", "content": done.text}
            finish_reason = done.finish_reason
            if tool_mode is not None:  # as the stream does: a call cut by max_tokens keeps its partial arguments, and "length"
                content, calls = tool_calls.parse_text(self._tool_parser(tool_mode), done.text)
                if calls:
                    message = {"role": "assistant", "content": content, "tool_calls": calls}
                    finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
            logprobs_out = {"content": self._chat_logprobs(done.logprobs)} if body.logprobs else None
            choices.append({"index": index, "message": message, "logprobs": logprobs_out, "finish_reason": finish_reason})
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.model,  # the base model or the LoRA adapter asked for, as vLLM answers
            "choices": choices,
            "usage": _usage(prompt_tokens, results),
        }

    def _tool_mode(self, body: ChatCompletionRequest, structured: GrammarSpec | None) -> tuple[str | tuple[str, str] | None, GrammarSpec | None]:
        """How this request's answer becomes tool calls: None (plain text), ``auto`` (parse the model's text),
        ``required`` or ("named", function) (constrained); and the output constraint that goes with it."""
        tools = body.tools or []
        if body.tool_choice is not None and body.tool_choice != "none" and not tools:
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        names = [t.function.name for t in tools]
        if len(set(names)) != len(names):
            raise InvalidRequest("tools have duplicate function names", param="tools")
        choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
        if choice == "none":
            return None, structured
        if choice == "auto":
            return "auto", structured
        if structured is not None:
            raise InvalidRequest(
                f"{structured.param} cannot be combined with tool_choice {choice if isinstance(choice, str) else 'naming a function'}", param=structured.param
            )
        if choice == "required":
            return "required", tool_calls.required_spec(tools, body.parallel_tool_calls)
        assert isinstance(choice, NamedToolChoice)
        tool = next((t for t in tools if t.function.name == choice.function.name), None)
        if tool is None:
            raise InvalidRequest(
                f"tool_choice names '{choice.function.name}', which is not among the tools ({', '.join(names)})", param="tool_choice.function.name"
            )
        return ("named", tool.function.name), tool_calls.named_spec(tool)

    def _tool_parser(self, mode: str | tuple[str, str]) -> tool_calls.ToolCallParser:
        if mode == "auto":
            return tool_calls.make_parser(self.tool_call_parser)
        if mode == "required":
            return tool_calls.JsonCallsParser()
        return tool_calls.NamedCallParser(mode[1])

    async def _chat_events(self, rid, jobs, seqs, prompt_tokens, include_usage, tool_mode=None) -> AsyncIterator[str]:
        created = int(time.time())
        model = jobs[0][1].lora or self.gen.served_name

        def chunk(choices: list, **extra: Any) -> str:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices, **extra})

        parsers = {index: self._tool_parser(tool_mode) for index, _ in jobs} if tool_mode is not None else {}
        for index, _ in jobs:
            yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        generated = 0
        async for index, req, out in _merge(jobs, seqs):
            generated += len(out.token_ids)
            finish_reason = out.finish_reason
            if index in parsers:
                parser = parsers[index]
                parsed = parser.feed(out.text)
                if finish_reason is not None:
                    parsed += parser.finish()
                    if parser.calls and finish_reason == "stop":
                        finish_reason = "tool_calls"
                delta: dict[str, Any] = {"content": parsed.content} if parsed.content else {}
                if parsed.tool_calls:
                    delta["tool_calls"] = [d.wire() for d in parsed.tool_calls]
                if not delta and finish_reason is None and req.params.logprobs is None:
                    continue  # held back (a possible tool call): nothing to send yet
            else:
                delta = {"content": out.text} if out.text or out.finish_reason is None else {}
            logprobs = {"content": self._chat_logprobs(out.logprobs)} if req.params.logprobs is not None else None
            yield chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}])
        if include_usage:
            yield chunk([], usage={"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated})
        yield sse("[DONE]")

    def _chat_logprobs(self, entries: list[TokenLogprob] | None) -> list[dict]:
        def item(token_id: int, logprob: float) -> dict:
            text = self.gen.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries or []]


def _prompt_list(prompt: str | list) -> list[str | list[int]]:
    """The completions API's four prompt shapes as a list of prompts (text or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequest("the prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [prompt]
    return list(prompt)


def _usage(prompt_tokens: int, results: list[Completion]) -> dict:
    completion_tokens = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


async def _merge(jobs: list[tuple[int, GenerationRequest]], seqs: list[Sequence]) -> AsyncIterator[tuple[int, GenerationRequest, StepOutput]]:
    """Interleave the output streams of several requests as they arrive; closing this cancels them all."""
    if len(jobs) == 1:
        (index, req), seq = jobs[0], seqs[0]
        async for out in seq.stream():
            yield index, req, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, req: GenerationRequest, seq: Sequence) -> None:
        try:
            async for out in seq.stream():
                await queue.put((index, req, out))
        except Exception as exc:  # surfaced to the consumer below
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(index, req, seq)) for (index, req), seq in zip(jobs, seqs)]
    try:
        remaining = len(jobs)
        while remaining:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item[2].finish_reason is not None:
                remaining -= 1
            yield item
    finally:
        for task in tasks:
            task.cancel()
        for seq in seqs:
            seq.cancel()


def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    def error_events(exc: PredictorError) -> list[str]:
        return [sse({"error": {"message": exc.message, "type": exc.openai_type, "param": exc.param, "code": exc.status}}), sse("[DONE]")]

    return event_stream(events, error_events)


def register(app: FastAPI, routes: OpenAIRoutes) -> None:
    """Add the OpenAI routes under both prefixes (before KServe's own, so /v1/models answers OpenAI-style)."""
    for prefix in PREFIXES:
        router = APIRouter(prefix=prefix, tags=["OpenAI"])
        router.add_api_route("/models", routes.models, methods=["GET"])
        router.add_api_route("/completions", routes.completions, methods=["POST"], response_model=None)
        router.add_api_route("/chat/completions", routes.chat_completions, methods=["POST"], response_model=None)
        app.include_router(router)
