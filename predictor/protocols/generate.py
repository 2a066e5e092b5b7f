"""The V2 generate extension used by Triton-style clients: ``/v2/models/{name}/generate`` and ``generate_stream``.

Sampling parameters go in ``parameters`` (or, as Triton allows, next to ``text_input``). The stream is
server-sent events, one JSON object per text delta; the last carries ``finish_reason``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from ..errors import InvalidRequest
from ..generation import Generation
from ..sampling import GenerationRequest
from .schema import GenerateRequest, SamplingFields, parse_json, validation_error
from .sse import event_stream, sse


class GenerateRoutes:
    def __init__(self, generation: Generation):
        self.gen = generation

    async def _request(self, model_name: str, raw: bytes) -> GenerationRequest:
        """The engine request of a generate body; ``model_name`` (the path's) is the served model or a LoRA adapter."""
        data = parse_json(raw)
        if not isinstance(data, dict):
            raise InvalidRequest("request body must be a JSON object")
        # Triton's generate puts parameters beside text_input; fold them into "parameters".
        top_level = {k: data.pop(k) for k in list(data) if k in SamplingFields.model_fields}
        if top_level:
            data["parameters"] = {**top_level, **(data.get("parameters") or {})}
        try:
            body = GenerateRequest.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc) from None
        prepared = await self.gen.prepare([body.text_input], body.parameters, max_tokens=body.parameters.max_tokens, model=model_name, param="text_input")
        return prepared.requests[0]

    async def generate(self, model_name: str, request: Request) -> dict:
        (done,) = await self.gen.complete_all([await self._request(model_name, await request.body())], request.is_disconnected)
        return {
            "model_name": model_name,
            "model_version": None,
            "text_output": done.text,
            "finish_reason": done.finish_reason,
            "usage": {"prompt_tokens": done.num_prompt_tokens, "completion_tokens": len(done.token_ids)},
        }

    async def generate_stream(self, model_name: str, request: Request) -> StreamingResponse:
        (seq,) = self.gen.submit_all([await self._request(model_name, await request.body())])

        async def events() -> AsyncIterator[str]:
            async for out in seq.stream():
                event = {"model_name": model_name, "model_version": None, "text_output": out.text}
                if out.finish_reason is not None:
                    event["finish_reason"] = out.finish_reason
                yield sse(event)

        return event_stream(events(), lambda exc: [sse({"error": exc.message, "code": exc.status})])


def register(app: FastAPI, routes: GenerateRoutes) -> None:
    router = APIRouter(prefix="/v2/models/{model_name}", tags=["V2 generate"])
    router.add_api_route("/generate", routes.generate, methods=["POST"])
    router.add_api_route("/generate_stream", routes.generate_stream, methods=["POST"], response_model=None)
    app.include_router(router)
