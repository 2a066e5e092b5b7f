"""How client errors look on the wire, and the request-body size limit.

OpenAI routes answer with the OpenAI error body; the KServe routes (V1, V2, generate) with KServe's
``{"error": "..."}``. Both carry the status of the mistake (400, 404, 413), never a 500. Overload is 429 with ``Retry-After``;
shutdown 503; a request past ``--request_timeout`` 504.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine import EngineError, EngineStopped, QueueFull
from ..generation import ClientDisconnected
from ..sampling import InvalidRequest
from .openai import PREFIXES, openai_error
from .sse import error_status

# How long a client told 429 should wait before retrying (the Retry-After header).
RETRY_AFTER_SECONDS = 1


# vLLM's token routes sit outside /v1 but answer errors as its OpenAI routes do.
OPENAI_STYLE_PATHS = ("/tokenize", "/detokenize")


def _is_openai(path: str) -> bool:
    if path in OPENAI_STYLE_PATHS:
        return True
    return any(path.startswith(prefix + "/") and not path.startswith("/v1/models/") for prefix in PREFIXES)


def error_response(path: str, status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    if _is_openai(path):
        return openai_error(status, message, param, code)
    return JSONResponse(status_code=status, content={"error": message})


def install_error_handlers(app: FastAPI, max_body_bytes: int) -> None:
    async def invalid_request(request: Request, exc: InvalidRequest) -> JSONResponse:
        return error_response(request.url.path, exc.status, exc.message, exc.param, exc.code)

    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if p != "body") or None
        return error_response(request.url.path, 400, f"invalid request body at '{param}': {err['msg']}", param)

    async def engine_error(request: Request, exc: EngineError) -> JSONResponse:
        if isinstance(exc, QueueFull):
            response = error_response(request.url.path, 429, str(exc), code="queue_full")
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
            return response
        if isinstance(exc, EngineStopped):
            return error_response(request.url.path, 503, str(exc), code="shutting_down")
        return error_response(request.url.path, error_status(exc), str(exc))

    async def disconnected(request: Request, exc: ClientDisconnected) -> JSONResponse:
        return error_response(request.url.path, 499, "client closed the request")

    app.add_exception_handler(InvalidRequest, invalid_request)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(EngineError, engine_error)
    app.add_exception_handler(ClientDisconnected, disconnected)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)


class BodyLimitMiddleware:
    """Answer 413 to a request body over ``max_bytes``, whether it announces its length or streams it."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        message = f"request body is larger than the server's limit of {self.max_bytes} bytes (--max_body_bytes)"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await error_response(path, 413, message)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise InvalidRequest(message, status=413)
            return msg

        await self.app(scope, limited_receive, send)
