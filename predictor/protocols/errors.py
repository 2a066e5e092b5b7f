"""How errors look on the HTTP wire: one handler per kind, each reading ``predictor/errors.py``'s table.

OpenAI routes (and vLLM's token routes) answer with the OpenAI error body
``{"error": {"message", "type", "param", "code"}}``; the KServe routes (V1, V2, generate) with KServe's
``{"error": "..."}``. Overload is 429 with ``Retry-After``. A client error is one log line (a client cannot flood
the log with tracebacks); a server error logs its traceback once, under its request id, and its body says only
that id.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..errors import InvalidRequest, PredictorError, QueueFull, from_kserve, internal_error
from ..request_context import current_request_id
from .openai import PREFIXES

logger = logging.getLogger("kserve")  # KServe configures this logger's handlers

# How long a client told 429 should wait before retrying (the Retry-After header).
RETRY_AFTER_SECONDS = 1

# vLLM's token routes sit outside /v1 but answer errors as its OpenAI routes do.
OPENAI_STYLE_PATHS = ("/tokenize", "/detokenize")


def is_openai_path(path: str) -> bool:
    if path in OPENAI_STYLE_PATHS:
        return True
    return any(path.startswith(prefix + "/") and not path.startswith("/v1/models/") for prefix in PREFIXES)


def openai_error_body(exc: PredictorError) -> dict:
    return {"error": {"message": exc.message, "type": exc.openai_type, "param": exc.param, "code": exc.code}}


def error_response(path: str, exc: PredictorError) -> JSONResponse:
    body = openai_error_body(exc) if is_openai_path(path) else {"error": exc.message}
    response = JSONResponse(status_code=exc.status, content=body)
    if isinstance(exc, QueueFull):
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


def log_client_error(where: str, exc: PredictorError) -> None:
    """One line per client error, at INFO: the status and the message, never a traceback."""
    logger.info("%s -> %d %s", where, exc.status, exc.message)


def install_error_handlers(app: FastAPI) -> None:
    """Handlers for every error a route can raise, KServe's own included (registered after KServe's, they replace
    its handlers, which log a traceback for every 400 and put exception text in 500 bodies)."""

    async def predictor_error(request: Request, exc: PredictorError) -> JSONResponse:
        if exc.client_error:
            log_client_error(f"{request.method} {request.url.path}", exc)
        return error_response(request.url.path, exc)

    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if p != "body") or None
        return await predictor_error(request, InvalidRequest(f"invalid request body at '{param}': {err['msg']}", param=param))

    async def kserve_error(request: Request, exc: Exception) -> JSONResponse:
        mapped = from_kserve(exc)
        if mapped is None:
            return await unexpected(request, exc)
        return await predictor_error(request, mapped)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = current_request_id()
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(request.url.path, PredictorError(internal_error(request_id), status=500, code="internal_error"))

    from kserve import errors as kserve_errors

    app.add_exception_handler(PredictorError, predictor_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    for kind in (
        kserve_errors.InvalidInput,
        kserve_errors.ModelNotFound,
        kserve_errors.ModelNotReady,
        kserve_errors.ServerNotReady,
        kserve_errors.ServerNotLive,
        kserve_errors.UnsupportedProtocol,
        kserve_errors.InferenceError,
        NotImplementedError,
    ):
        app.add_exception_handler(kind, kserve_error)
    app.add_exception_handler(Exception, unexpected)
