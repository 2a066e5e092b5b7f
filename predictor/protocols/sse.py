"""Server-sent events: the streaming format of the OpenAI and generate_stream routes."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from ..errors import PredictorError

logger = logging.getLogger("kserve")


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def event_stream(events: AsyncIterator[str], error_events: Callable[[PredictorError], list[str]]) -> StreamingResponse:
    """Stream ``events``; an error after the stream has begun (its status line is sent) becomes ``error_events(exc)``."""

    async def guarded() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except PredictorError as exc:
            if exc.client_error:
                logger.info("stream ended by a client error: %d %s", exc.status, exc.message)
            for event in error_events(exc):
                yield event

    return StreamingResponse(guarded(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
