"""The id of the request being served, for the logs, the responses and the traces.

``X-Request-Id`` (HTTP header, gRPC metadata ``x-request-id``) is taken from the client when it sends a
well-formed one (what ingress proxies and meshes forward) and made otherwise. It is set in a context
variable for the life of the request, returned in the response's ``X-Request-Id``, used in the OpenAI
``id`` and the engine's request ids, and prefixed to every log line written while serving it
(``RequestIdFilter``); the engine thread names it in its own lines.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass

from .errors import InvalidRequest

HEADER = "x-request-id"
# What a client may send: ids of proxies and tracing systems (UUIDs, hex, base64url, dotted), nothing that could
# break a log line or a header.
_VALID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")

TRACE_HEADERS = ("traceparent", "tracestate")  # W3C trace context, read by tracing.py


@dataclass(frozen=True)
class RequestContext:
    request_id: str
    trace: dict[str, str] | None = None  # the caller's W3C trace context headers, when it sent them


_current: ContextVar[RequestContext | None] = ContextVar("request_context", default=None)


def current_request_id() -> str | None:
    context = _current.get()
    return context.request_id if context is not None else None


def current_trace_carrier() -> dict[str, str] | None:
    context = _current.get()
    return context.trace if context is not None else None


def accept_request_id(sent: str | None) -> str:
    """The client's id if it is well-formed, a new one if none was sent; a malformed one is a 400."""
    if sent is None or sent == "":
        return uuid.uuid4().hex
    if not _VALID.match(sent):
        raise InvalidRequest(f"{HEADER} must be 1-128 characters of letters, digits and ._:/+=-", param=HEADER)
    return sent


def enter(request_id: str, headers: Mapping[str, str]) -> Token:
    """Serve a request under ``request_id`` (with the trace context among ``headers``, lower-case names); returns the
    token for ``leave``."""
    trace = {name: headers[name] for name in TRACE_HEADERS if name in headers}
    return _current.set(RequestContext(request_id, trace or None))


def leave(token: Token) -> None:
    _current.reset(token)


class RequestIdFilter(logging.Filter):
    """Prefixes ``[request <id>]`` to records written while a request is served (and sets ``record.request_id``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = current_request_id()
        record.request_id = request_id or "-"
        if request_id and not getattr(record, "_request_id_prefixed", False) and isinstance(record.msg, str):
            record.msg = f"[request {request_id}] {record.msg}"
            record._request_id_prefixed = True
        return True


def install_log_filter(logger_names: tuple[str, ...] = ("kserve", "kserve.trace", "uvicorn", "uvicorn.access")) -> None:
    """Add ``RequestIdFilter`` to the handlers of the server's loggers (KServe configures them before this is called),
    so that records of their child loggers get it too. uvicorn's access lines are formatted from their arguments, not
    their message: their format gets the request id appended."""
    from uvicorn.logging import AccessFormatter

    log_filter = RequestIdFilter()
    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            if any(isinstance(f, RequestIdFilter) for f in handler.filters):
                continue
            handler.addFilter(log_filter)
            formatter = handler.formatter
            if isinstance(formatter, AccessFormatter) and "request_id" not in formatter._fmt:
                fmt = formatter._fmt + " [request %(request_id)s]"
                handler.setFormatter(AccessFormatter(fmt=fmt, datefmt=formatter.datefmt, use_colors=formatter.use_colors))
