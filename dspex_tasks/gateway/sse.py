"""Server-Sent Events: one response type for every stream the API serves.

Each event has ``id:`` (its Redis stream id, the resume token), ``event:`` (its type)
and ``data:`` (its data, one line of JSON). A client resumes by sending the last id it
saw as ``Last-Event-ID`` (browsers' ``EventSource`` does this on reconnect): it gets
every later event once, in order. A comment line every ``PING_S`` keeps proxies from
closing an idle stream.

A client that disconnects ends the response: the generator is cancelled where it waits
(a blocking XREAD on its own asyncio Redis connection) and its ``finally`` closes that
connection, so a departed reader holds nothing on the server or in Redis.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from fastapi import Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from dspex_tasks.errors import DspexError
from dspex_tasks.store.events import check_after

__all__ = ["PING_S", "SSE_RESPONSES", "event_stream", "resume_from"]

#: Seconds between keep-alive comments on an idle stream.
PING_S = 15
#: A client that reads nothing for this long is dropped (its reader freed).
SEND_TIMEOUT_S = 30

#: OpenAPI description of a stream's success response.
SSE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "text/event-stream: `id:` the event id, `event:` its type, `data:` JSON;"
        " resume with `Last-Event-ID`",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


def resume_from(request: Request, after: str | None, default: str) -> str:
    """Where a stream starts: after ``Last-Event-ID`` if sent, else ``?after=``, else
    ``default``. Raises ``invalid_inputs`` for something that is not an event id."""
    header = request.headers.get("last-event-id")
    chosen = header if header else (after if after is not None else default)
    return check_after(chosen, allow_now=default == "$")


def _event(event_id: str | None, kind: str, data: Mapping[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(orjson.dumps(data).decode(), event=kind, id=event_id)


async def _events(
    source: AsyncIterator[tuple[str, str, Mapping[str, Any]]],
) -> AsyncIterator[ServerSentEvent]:
    try:
        async for event_id, kind, data in source:
            yield _event(event_id, kind, data)
    except DspexError as e:
        # The session went away, Redis dropped: say so in-band (no id: a client that
        # reconnects resumes after the last real event), then end.
        yield _event(None, "error", e.to_dict())


def event_stream(source: AsyncIterator[tuple[str, str, Mapping[str, Any]]]) -> EventSourceResponse:
    """An SSE response of ``(id, type, data)`` items."""
    return EventSourceResponse(
        _events(source),
        ping=PING_S,
        send_timeout=SEND_TIMEOUT_S,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
