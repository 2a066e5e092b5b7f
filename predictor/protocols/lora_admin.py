"""vLLM's runtime LoRA routes: ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``.

Off unless ``--enable_lora_runtime_updates`` (then 404 naming the flag), and behind ``--api_key`` like every
``/v1`` route. ``{"lora_name": NAME, "lora_path": DIR}`` registers a local peft adapter directory, checked against
the base model as at start-up (``engine/lora.py``), and usable at once: ``/v1/models`` lists it and a request's
``model`` picks it. ``{"lora_name": NAME}`` unloads one: it takes no new requests at once, and the answer comes
when its waiting and running requests are done. Answers are vLLM's: 200 with a line of text, or an OpenAI error.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse

from ..engine.lora import LoRAError, load_adapter
from ..errors import InvalidRequest, RouteDisabled
from ..generation import Generation
from .schema import _Strict, parse


class LoadLoRARequest(_Strict):
    lora_name: str
    lora_path: str


class UnloadLoRARequest(_Strict):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's; ignored


class LoRARoutes:
    def __init__(self, generation: Generation, enabled: bool, max_rank: int):
        self.gen = generation
        self.enabled = enabled
        self.max_rank = max_rank

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise RouteDisabled("runtime LoRA updates are disabled; start the server with --enable_lora_runtime_updates")

    async def load(self, request: Request) -> PlainTextResponse:
        self._check_enabled()
        body = parse(LoadLoRARequest, await request.body())
        name = body.lora_name
        if not name or name == self.gen.served_name:
            raise InvalidRequest(f"lora_name must be a name other than the served model's ('{self.gen.served_name}')", param="lora_name")
        if name in self.gen.engine.lora.adapters:
            raise InvalidRequest(f"the LoRA adapter '{name}' has already been loaded", param="lora_name")
        where = f"lora_name {name}, lora_path {body.lora_path}"
        try:  # reading and checking the files: off the event loop
            lora = self.gen.engine.lora
            adapter = await asyncio.to_thread(load_adapter, name, Path(body.lora_path), self.gen.base_model, self.max_rank, where, lora.digests)
            self.gen.engine.add_lora(adapter, where)
        except LoRAError as exc:
            raise InvalidRequest(str(exc), param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: Request) -> PlainTextResponse:
        self._check_enabled()
        body = parse(UnloadLoRARequest, await request.body())
        if body.lora_name not in self.gen.lora_adapters:
            raise InvalidRequest(f"the LoRA adapter '{body.lora_name}' cannot be found", param="lora_name", status=404, code="model_not_found")
        await self.gen.engine.remove_lora(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def register(app: FastAPI, routes: LoRARoutes) -> None:
    router = APIRouter(prefix="/v1", tags=["LoRA"])
    router.add_api_route("/load_lora_adapter", routes.load, methods=["POST"], response_model=None)
    router.add_api_route("/unload_lora_adapter", routes.unload, methods=["POST"], response_model=None)
    app.include_router(router)
