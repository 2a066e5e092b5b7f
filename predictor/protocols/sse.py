"""Server-sent events: the streaming format of the OpenAI and generate_stream routes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from ..engine import EngineError, GrammarFailed, RequestTimeout


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def error_status(exc: EngineError) -> int:
    """504 for a request past ``--request_timeout``; 400 for its own grammar failing; 503 for shutdown or an engine failure."""
    if isinstance(exc, GrammarFailed):
        return 400
    return 504 if isinstance(exc, RequestTimeout) else 503


def event_stream(events: AsyncIterator[str], error_events: Callable[[EngineError], list[str]]) -> StreamingResponse:
    """Stream ``events``; an engine error after the stream has begun becomes ``error_events(exc)``."""

    async def guarded() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except EngineError as exc:
            for event in error_events(exc):
                yield event

    return StreamingResponse(guarded(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
