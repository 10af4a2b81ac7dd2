"""Run streams: the events of one streamed run, appended by its worker, read resumably.

A run with ``options={"stream": True}`` owns one Redis Stream,
``dspex:s:{sid}:run:{run_id}:stream`` (``Keys.run_stream``), whose entries are
``t`` (the event type) and ``d`` (its data, JSON): ``token`` ``{"field", "delta"}``,
``status`` ``{"step", "detail"}``, ``output`` ``{"field", "value"}``, then ``done`` (the
task's result) or ``error`` ``{"code", "message"}``, always last.

Lifetime. The worker appends in small batches, one script per batch
(``APPEND_RUN_STREAM``), which also sets the stream's TTL: while the run goes on, as long
as a run may last; once it ended, ``DSPEX_STREAM_KEEP_S``. Deleted with the session: a
run stream's key is created per run, so no script can name it among its fixed KEYS; each
one is therefore indexed in a small zset under the session's hash tag,
``dspex:s:{sid}:streams`` (``Keys.run_streams``: stream key -> expiry in ms), and the
session delete, expiry and re-create scripts delete what it lists (and the index). No
SCAN anywhere; the index prunes its expired members on every append, so it holds at most
the streams still alive, and it carries the TTL of the longest-lived one.

Reading. Stream ids are the resume tokens, as for the session event log
(``store/events.py``): a reader that resumes after the last id it saw gets every later
event once, in order. A reader stops after the terminal event.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dspex_tasks.errors import InvalidInputs
from dspex_tasks.keys import check_session_id
from dspex_tasks.store.base import StoreCore, translate_errors
from dspex_tasks.store.codec import loads
from dspex_tasks.store.connection import async_twin
from dspex_tasks.store.events import check_after
from dspex_tasks.store.scripts import EVENT_DATA_FIELD, EVENT_TYPE_FIELD
from dspex_tasks.store.tailing import Pacer, entries_of, session_gone

__all__ = [
    "STREAM_EVENT_TYPES",
    "TERMINAL_TYPES",
    "StreamEvent",
    "StreamsMixin",
    "check_run_id",
]

STREAM_EVENT_TYPES = frozenset({"token", "status", "output", "progress", "done", "error"})
TERMINAL_TYPES = frozenset({"done", "error"})
_BATCH = 500
_RUN_ID_MAX = 200


@dataclass(frozen=True)
class StreamEvent:
    """One event of a run's stream: ``id`` is its stream id (resume after it)."""

    id: str
    type: str
    data: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "data": self.data}


def _decode(entry_id: str, fields: Mapping[str, str]) -> StreamEvent:
    return StreamEvent(
        id=entry_id, type=fields[EVENT_TYPE_FIELD], data=loads(fields[EVENT_DATA_FIELD])
    )


def check_run_id(run_id: object) -> str:
    if (
        not isinstance(run_id, str)
        or not run_id
        or len(run_id) > _RUN_ID_MAX
        or any(c in run_id for c in "{}*?[] \n")
    ):
        raise InvalidInputs(f"invalid run id {run_id!r}", {"run_id": repr(run_id)[:80]})
    return run_id


class StreamsMixin(StoreCore):
    """Appending to and reading run streams."""

    def append_run_stream(
        self,
        session_id: str,
        run_id: str,
        events: Sequence[tuple[str, str | bytes]],
        *,
        keep_s: float,
    ) -> str | None:
        """Append ``(type, data JSON)`` events in order, in one round trip; the stream
        then lives ``keep_s`` from now. Returns the last id, None if the session is gone
        (nothing is written)."""
        sid = check_session_id(session_id)
        rid = check_run_id(run_id)
        args: list[Any] = [max(1, int(keep_s * 1000)), "0"]
        for kind, data in events:
            args.extend((kind, data))
        keys = [self.keys.session(sid), self.keys.run_stream(sid, rid), self.keys.run_streams(sid)]
        last = self._script("APPEND_RUN_STREAM", keys, args)
        return None if last in (0, b"0", "0") else str(last)

    def run_stream_exists(self, session_id: str, run_id: str) -> bool:
        sid = check_session_id(session_id)
        with translate_errors():
            return bool(self.redis.exists(self.keys.run_stream(sid, check_run_id(run_id))))

    def run_stream_ended(self, session_id: str, run_id: str) -> bool:
        """Whether the run's stream holds its terminal event already."""
        sid = check_session_id(session_id)
        with translate_errors():
            last: Any = self.redis.xrevrange(
                self.keys.run_stream(sid, check_run_id(run_id)), count=1
            )
        return bool(last) and last[0][1].get(EVENT_TYPE_FIELD) in TERMINAL_TYPES

    def run_stream_events(
        self, session_id: str, run_id: str, *, after: str = "0", limit: int = 10_000
    ) -> list[StreamEvent]:
        """What the run's stream holds after the id ``after`` (exclusive), oldest first."""
        sid = check_session_id(session_id)
        key = self.keys.run_stream(sid, check_run_id(run_id))
        cursor = check_after(after, allow_now=False)
        with translate_errors():
            batch: Any = self.redis.xrange(key, min=f"({cursor}", count=limit)
        return [_decode(entry_id, fields) for entry_id, fields in batch]

    def watch_run_stream(
        self,
        session_id: str,
        run_id: str,
        *,
        after: str | None = None,
        block_s: float | None = None,
        finished: Callable[[], bool] | None = None,
    ) -> Iterator[StreamEvent]:
        """The run's events as they come, from after ``after`` (None: the first), until
        the terminal one (``done`` / ``error``).

        Also ends when ``finished()`` says the run is over and the stream holds nothing
        more (a run without ``stream`` has none), after ``block_s`` with no event, and
        with ``SessionNotFound`` when the session goes away.
        """
        sid = check_session_id(session_id)
        key = self.keys.run_stream(sid, check_run_id(run_id))
        cursor = check_after(after or "0", allow_now=False)
        return self._watch_run_stream(sid, key, cursor, block_s, finished)

    def _watch_run_stream(
        self,
        sid: str,
        key: str,
        cursor: str,
        block_s: float | None,
        finished: Callable[[], bool] | None,
    ) -> Iterator[StreamEvent]:
        pace = Pacer(block_s)
        over = False
        entries: Any
        while True:
            with translate_errors():
                if over:  # the run is over: what is left, without waiting
                    entries = self.redis.xrange(key, min=f"({cursor}")
                else:
                    entries = entries_of(
                        self.redis.xread({key: cursor}, count=_BATCH, block=pace.block_ms())
                    )
            for entry_id, fields in entries:
                cursor = entry_id
                event = _decode(entry_id, fields)
                yield event
                if event.type in TERMINAL_TYPES:
                    return
            if entries:
                pace.heard()
                continue
            if over or pace.gave_up():
                return
            with translate_errors():
                alive = self.redis.exists(self.keys.session(sid))
            if not alive:
                raise session_gone(sid)
            over = finished is not None and finished()

    async def awatch_run_stream(
        self,
        session_id: str,
        run_id: str,
        *,
        after: str | None = None,
        block_s: float | None = None,
        finished: Callable[[], bool | Awaitable[bool]] | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """The asyncio twin of :meth:`watch_run_stream` (the loop is never blocked;
        ``finished`` is called between reads, after a second of silence: a coroutine
        function, or a plain one that is cheap)."""
        sid = check_session_id(session_id)
        key = self.keys.run_stream(sid, check_run_id(run_id))
        cursor = check_after(after or "0", allow_now=False)
        client = async_twin(self.redis)
        try:
            pace = Pacer(block_s)
            over = False
            entries: Any
            while True:
                with translate_errors():
                    if over:
                        entries = await client.xrange(key, min=f"({cursor}")
                    else:
                        entries = entries_of(
                            await client.xread({key: cursor}, count=_BATCH, block=pace.block_ms())
                        )
                for entry_id, fields in entries:
                    cursor = entry_id
                    event = _decode(entry_id, fields)
                    yield event
                    if event.type in TERMINAL_TYPES:
                        return
                if entries:
                    pace.heard()
                    continue
                if over or pace.gave_up():
                    return
                with translate_errors():
                    alive = await client.exists(self.keys.session(sid))
                if not alive:
                    raise session_gone(sid)
                if finished is not None:
                    answer = finished()
                    over = bool(await answer) if inspect.isawaitable(answer) else bool(answer)
        finally:
            await client.aclose()
