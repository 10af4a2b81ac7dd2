"""The two Server-Sent Event streams: a session's events, a run's stream.

Both read Redis with the asyncio client (``store.awatch``, ``TaskHandle.astream``), on
the event loop, one connection per open stream, closed when the stream ends or its client
goes away.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from sse_starlette import EventSourceResponse

from dspex_tasks.gateway.deps import ClientDep
from dspex_tasks.gateway.errors import error_responses
from dspex_tasks.gateway.routes.runs import SESSION_HINT
from dspex_tasks.gateway.sse import SSE_RESPONSES, event_stream, resume_from
from dspex_tasks.handles import TaskHandle
from dspex_tasks.keys import check_session_id

__all__ = ["router"]

router = APIRouter(tags=["streams"])


def _csv(raw: str | None) -> list[str] | None:
    return [part for part in raw.split(",") if part] if raw else None


@router.get(
    "/v1/sessions/{session_id}/events",
    response_class=EventSourceResponse,
    responses={
        **SSE_RESPONSES,
        **error_responses(
            "session_not_found", "session_expired", "invalid_session_id", "invalid_inputs"
        ),
    },
)
async def session_events(
    session_id: str,
    request: Request,
    client: ClientDep,
    after: str | None = Query(None, description="an event id; 0: from the oldest kept"),
    names: str | None = Query(None, description="only these variables' events (a,b)"),
    types: str | None = Query(None, description="only these event types (a,b)"),
) -> EventSourceResponse:
    """The session's events as they happen (from now; ``?after=0``: from the oldest
    kept), resumable with ``Last-Event-ID``. Ends with an ``error`` event if the
    session goes away."""
    store = client.store
    cursor = resume_from(request, after, "$")
    # Before the 200: a missing session is a 404, not an empty stream; and "now" is a
    # fixed id once the client sees the response, so a read it makes next (the
    # variables) cannot miss a write the stream does not show.
    newest = await run_in_threadpool(store.last_event_id, session_id)
    if cursor == "$":
        cursor = newest
    watch = store.awatch(session_id, names=_csv(names), types=_csv(types), after=cursor)

    async def items() -> AsyncIterator[tuple[str, str, Mapping[str, Any]]]:
        async for event in watch:
            yield event.id, event.type, event.data

    return event_stream(items())


@router.get(
    "/v1/runs/{run_id}/stream",
    response_class=EventSourceResponse,
    responses={
        **SSE_RESPONSES,
        **error_responses("run_not_found", "invalid_inputs", "invalid_session_id"),
    },
)
async def run_stream(
    run_id: str,
    request: Request,
    client: ClientDep,
    after: str | None = Query(None, description="an event id: resume after it"),
    session_id: str | None = SESSION_HINT,
) -> EventSourceResponse:
    """A run's stream (``options.stream``) from its start: ``token``, ``status``,
    ``output``, ``progress``, then ``done`` (the result) or ``error``; resumable with
    ``Last-Event-ID``. A run that failed without streaming ends with one ``error``."""
    cursor = resume_from(request, after, "0")
    if session_id is None:
        session_id = await run_in_threadpool(client.store.find_run_session, run_id)
    else:
        check_session_id(session_id)
    handle: TaskHandle = client.result(run_id, session_id)

    async def items() -> AsyncIterator[tuple[str, str, Mapping[str, Any]]]:
        async for event in handle.astream(after=cursor):
            yield event.id, event.type, event.data

    return event_stream(items())
