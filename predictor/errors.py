"""Every error a request can meet, each class carrying how it looks on the wire.

One table for all protocols: the HTTP status, the OpenAI error ``type`` and the gRPC status code live on the
class (an instance may narrow the status, e.g. a 404 ``InvalidRequest``), and the JSON error bodies, the
server-sent error events and the gRPC interceptor all read them from here (``protocols/errors.py``,
``protocols/sse.py``, ``protocols/grpc_calls.py``).

Client errors (4xx) say what to change. Server errors (5xx) never carry exception text: the message names
the request id, and the log has the details.
"""

from __future__ import annotations

import grpc

# gRPC code of a client error by its HTTP status (Google's HTTP ↔ gRPC mapping).
_GRPC_BY_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_OPENAI_TYPE_BY_STATUS = {401: "authentication_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}


class PredictorError(Exception):
    """Base of every error with a wire form. ``status`` (HTTP), ``code`` (OpenAI's machine-readable code), ``param``."""

    status = 500
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code

    @property
    def openai_type(self) -> str:
        return _OPENAI_TYPE_BY_STATUS.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return _GRPC_BY_STATUS.get(self.status, grpc.StatusCode.INTERNAL if self.status >= 500 else grpc.StatusCode.INVALID_ARGUMENT)

    @property
    def client_error(self) -> bool:
        return self.status < 500


class InvalidRequest(PredictorError, ValueError):
    """A client error: a 4xx naming ``param`` in every protocol (400 unless said otherwise)."""

    status = 400


class Unauthorized(PredictorError):
    """No API key, or not one of ``--api_key``'s."""

    status = 401
    code = "invalid_api_key"


class RouteDisabled(PredictorError):
    """A route this server has but serves only when a flag enables it (404; gRPC UNIMPLEMENTED)."""

    status = 404
    code = "route_disabled"

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNIMPLEMENTED


class BodyReadTimeout(InvalidRequest):
    """The request's body did not arrive within ``--body_read_timeout``."""

    status = 408
    code = "request_timeout"


class ClientDisconnected(PredictorError):
    """The client went away before its answer was ready; its requests were cancelled."""

    status = 499


class EngineError(PredictorError):
    """A request the engine could not serve."""

    status = 503


class QueueFull(EngineError):
    """The waiting queue is at ``--max_queue``: 429 / RESOURCE_EXHAUSTED, and the client may retry."""

    status = 429
    code = "queue_full"


class EngineStopped(EngineError):
    """The server is draining for shutdown and takes no new requests (503)."""

    status = 503
    code = "shutting_down"


class RequestTimeout(EngineError):
    """The request ran past ``--request_timeout``."""

    status = 504
    code = "timeout"


class GrammarFailed(EngineError):
    """The request's own output constraint failed while generating (llguidance found its lexer too large only once a
    token was consumed, say): the request's fault, a 400, and no other request is touched."""

    status = 400


class RequestFailed(EngineError):
    """Sampling or detokenizing this request's row raised: it alone fails; the rest of the batch goes on."""

    status = 500
    code = "internal_error"


class EngineDead(EngineError):
    """The engine can no longer run steps (a device error, repeated step failures): the process exits for a restart."""

    status = 503
    code = "engine_dead"


def from_kserve(exc: BaseException) -> PredictorError | None:
    """KServe's own errors (raised by its data plane: unknown model, malformed V2 body, ...) in this table, or None."""
    from kserve import errors as kserve_errors

    reason = getattr(exc, "reason", None) or str(exc)
    if isinstance(exc, kserve_errors.InvalidInput):
        return InvalidRequest(reason)
    if isinstance(exc, kserve_errors.ModelNotFound):
        return InvalidRequest(reason, param="model", status=404, code="model_not_found")
    if isinstance(exc, (kserve_errors.ModelNotReady, kserve_errors.ServerNotReady, kserve_errors.ServerNotLive)):
        return PredictorError(reason, status=503, code="not_ready")
    if isinstance(exc, (NotImplementedError, kserve_errors.UnsupportedProtocol)):
        return PredictorError(reason or "not implemented", status=501)
    return None


def internal_error(request_id: str | None) -> str:
    """The message of a 500: no exception text, the id to find it in the log."""
    return f"internal server error (request id {request_id}); the server log has the details" if request_id else "internal server error"
