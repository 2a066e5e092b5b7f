"""What every HTTP request passes before a route sees it: its request id, the API key, and the body's limits.

Plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``, which buffers streamed responses), outermost first:

- ``RequestIdMiddleware``: ``X-Request-Id`` accepted or made (``request_context.py``), set for the request's
  context and returned in the response headers.
- ``ApiKeyMiddleware`` (``--api_key``): ``Authorization: Bearer <key>`` on every route but the probes' and the
  scraper's (``OPEN_PATHS``); a missing or wrong key is a 401 with ``WWW-Authenticate: Bearer``. Keys are compared
  in constant time, each of them every time.
- ``BodyLimitMiddleware``: a body over ``--max_body_bytes`` is a 413 (announced or streamed), and a body that does
  not arrive within ``--body_read_timeout`` seconds of the request is a 408 that closes the connection, so that
  half-sent bodies cannot hold connections open.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import BodyReadTimeout, InvalidRequest, PredictorError, Unauthorized
from ..request_context import HEADER, accept_request_id, enter, leave
from .errors import error_response, log_client_error

# Probes (liveness, readiness) and the metrics scraper never need the key.
OPEN_PATHS = frozenset({"/", "/metrics", "/v2/health/live", "/v2/health/ready"})
_OPEN_PATTERN = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/ready$")


def is_open_path(path: str) -> bool:
    return path in OPEN_PATHS or _OPEN_PATTERN.match(path) is not None


async def _send_error(scope: Scope, receive: Receive, send: Send, exc: PredictorError, headers: dict[str, str] | None = None) -> None:
    log_client_error(f"{scope.get('method', '')} {scope.get('path', '')}", exc)
    response = error_response(scope.get("path", ""), exc)
    response.headers.update(headers or {})
    await response(scope, receive, send)


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope.get("headers") or []}
        try:
            request_id = accept_request_id(headers.get(HEADER))
        except InvalidRequest as exc:
            await _send_error(scope, receive, send, exc)
            return
        token = enter(request_id, headers)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (HEADER.encode(), request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            leave(token)


class ApiKeys:
    """The accepted keys (``--api_key``); ``authorized`` compares in constant time, against every key every time."""

    def __init__(self, keys: list[str]):
        self.keys = [key.encode() for key in keys]

    def authorized(self, header: bytes | None) -> bool:
        """Whether an ``Authorization`` value is ``Bearer <one of the keys>``."""
        scheme, _, given = (header or b"").partition(b" ")
        if scheme.lower() != b"bearer" or not given:
            return False
        matched = False
        for key in self.keys:  # the time taken does not tell which key (or whether one) matched
            matched |= hmac.compare_digest(given.strip(), key)
        return matched


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: ApiKeys):
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open_path(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        if not self.keys.authorized(dict(scope.get("headers") or []).get(b"authorization")):
            problem = Unauthorized("a valid API key is required: send 'Authorization: Bearer <key>'")
            await _send_error(scope, receive, send, problem, {"WWW-Authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout: float):
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = InvalidRequest(f"request body is larger than the server's limit of {self.max_bytes} bytes (--max_body_bytes)", status=413)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_error(scope, receive, send, too_large)
            return
        received = 0
        deadline = time.monotonic() + self.read_timeout if self.read_timeout > 0 else None
        timed_out = complete = False

        async def limited_receive() -> Message:
            nonlocal received, timed_out, complete
            if deadline is None or complete:  # once the body is in, later receives (disconnect watching) wait as long as they need
                msg = await receive()
            else:
                try:
                    msg = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    timed_out = True
                    raise BodyReadTimeout(
                        f"the request body did not arrive within {self.read_timeout:g} s (--body_read_timeout); {received} bytes were received"
                    ) from None
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise too_large
                complete = not msg.get("more_body", False)
            return msg

        async def closing_send(message: Message) -> None:
            if timed_out and message["type"] == "http.response.start":  # the rest of the body is unread: this connection is done
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, limited_receive, closing_send)
