"""A session's event log: read it, watch it live, resume a watch without gap or duplicate.

Every state change appends its event to the session's stream (``dspex:s:{sid}:events``)
inside the Lua script that makes the change (``store/scripts.py``), so a reader never
sees a change without its event or the reverse. The stream's ids are the resume tokens: a
watcher that resumes after the last id it saw gets every later event once, in order, as
long as the stream still holds them (it keeps about ``DSPEX_EVENTS_MAXLEN`` events).

Variable events are stored compact (``[name, tag, version, type, value(, run id)]``) and
read back as ``{name, id, version, type, value(, run_id)}``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Collection, Iterator, Mapping
from typing import Any

from dspex_tasks.errors import InvalidInputs
from dspex_tasks.keys import check_session_id
from dspex_tasks.store.base import StoreCore, translate_errors
from dspex_tasks.store.codec import decode_stored, loads
from dspex_tasks.store.connection import async_twin
from dspex_tasks.store.models import Event, ms_to_datetime
from dspex_tasks.store.scripts import EVENT_DATA_FIELD, EVENT_TYPE_FIELD
from dspex_tasks.store.tailing import Pacer, entries_of, session_gone
from dspex_tasks.types import encode_value

__all__ = ["EVENT_TYPES", "EventsMixin", "check_after", "decode_event"]

EVENT_TYPES = frozenset(
    {
        "session.created",
        "session.updated",
        "variable.registered",
        "variable.updated",
        "variable.deleted",
        "variable.rolled_back",
        "program.stored",
        "program.deleted",
        "run.queued",
        "run.started",
        "run.succeeded",
        "run.failed",
        "run.cancelled",
        "run.interrupted",
        "run.rolled_back",
        "run.rejected",
    }
)
_STREAM_ID = re.compile(r"(0|[1-9][0-9]{0,19})(-(0|[1-9][0-9]{0,19}))?")
_BATCH = 100


def decode_event(entry_id: str, fields: Mapping[str, str]) -> Event:
    """An :class:`Event` from one stream entry."""
    kind = fields[EVENT_TYPE_FIELD]
    raw = loads(fields[EVENT_DATA_FIELD])
    data: dict[str, Any]
    if kind.startswith("variable."):
        name, tag, version, type_name, value, *run = raw
        data = {
            "name": name,
            "id": f"var_{name}_{tag}",
            "version": int(version),
            "type": type_name,
            "value": None
            if value is None
            else encode_value(type_name, decode_stored(type_name, value)),
        }
        if run:
            data["run_id"] = run[0]
    else:
        data = raw
    return Event(id=entry_id, type=kind, at=ms_to_datetime(entry_id.split("-", 1)[0]), data=data)


def check_after(after: Any, *, allow_now: bool) -> str:
    if allow_now and after == "$":
        return "$"
    if not isinstance(after, str) or not _STREAM_ID.fullmatch(after):
        raise InvalidInputs(
            f"after must be an event id such as '1700000000000-0' or '0'"
            f"{' or $' if allow_now else ''}, got {after!r}",
            {"after": repr(after)},
        )
    return after


def _check_filter(values: Collection[str] | None, what: str) -> frozenset[str] | None:
    if values is None:
        return None
    if isinstance(values, str) or not all(isinstance(v, str) for v in values):
        raise InvalidInputs(
            f"{what} must be a list of strings, got {values!r}", {what: repr(values)}
        )
    return frozenset(values)


class _Filter:
    def __init__(self, names: Collection[str] | None, types: Collection[str] | None) -> None:
        self.names = _check_filter(names, "names")
        self.types = _check_filter(types, "types")

    def __call__(self, event: Event) -> bool:
        if self.types is not None and event.type not in self.types:
            return False
        if self.names is not None:
            return event.type.startswith("variable.") and event.data.get("name") in self.names
        return True


class EventsMixin(StoreCore):
    """Reading and watching the per-session event log."""

    def events(
        self,
        session_id: str,
        *,
        after: str = "0",
        types: Collection[str] | None = None,
        limit: int = 100,
    ) -> list[Event]:
        """Events after the id ``after`` (exclusive; "0": from the oldest kept), oldest first.

        Raises:
            SessionNotFound, InvalidInputs (``after`` not an event id, bad filter or limit).
        """
        sid = check_session_id(session_id)
        cursor = check_after(after, allow_now=False)
        keep = _Filter(None, types)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidInputs(f"limit must be a positive integer, got {limit!r}")
        self._session_script("GET_SESSION", sid, False)
        found: list[Event] = []
        key = self.keys.events(sid)
        while len(found) < limit:
            with translate_errors():
                batch: Any = self.redis.xrange(key, min=f"({cursor}", count=max(limit, _BATCH))
            for entry_id, fields in batch:
                cursor = entry_id
                event = decode_event(entry_id, fields)
                if keep(event):
                    found.append(event)
                    if len(found) == limit:
                        break
            if len(batch) < max(limit, _BATCH):
                break
        return found

    def last_event_id(self, session_id: str) -> str:
        """The id of the session's newest event ("0-0" if none): where "$" starts."""
        sid = check_session_id(session_id)
        self._session_script("GET_SESSION", sid, False)
        with translate_errors():
            newest: Any = self.redis.xrevrange(self.keys.events(sid), count=1)
        return str(newest[0][0]) if newest else "0-0"

    def watch(
        self,
        session_id: str,
        *,
        names: Collection[str] | None = None,
        types: Collection[str] | None = None,
        after: str = "$",
        block_s: float | None = None,
    ) -> Iterator[Event]:
        """Events as they happen, resumable: pass the last seen ``id`` as ``after``.

        ``after="$"``: from now; ``"0"``: from the oldest kept. ``block_s``: stop after
        that long with no event (None: wait for ever). ``names`` keeps only those
        variables' events. Ends with ``SessionNotFound`` when the session goes away.
        """
        sid = check_session_id(session_id)
        cursor = check_after(after, allow_now=True)
        keep = _Filter(names, types)
        if cursor == "$":
            cursor = self.last_event_id(sid)
        else:
            self._session_script("GET_SESSION", sid, False)
        key = self.keys.events(sid)
        return self._watch(sid, key, cursor, keep, block_s)

    def _watch(
        self, sid: str, key: str, cursor: str, keep: _Filter, block_s: float | None
    ) -> Iterator[Event]:
        pace = Pacer(block_s)
        while True:
            with translate_errors():
                reply: Any = self.redis.xread({key: cursor}, count=_BATCH, block=pace.block_ms())
            entries = entries_of(reply)
            for entry_id, fields in entries:
                cursor = entry_id
                event = decode_event(entry_id, fields)
                if keep(event):
                    yield event
            if entries:
                pace.heard()
                continue
            if pace.gave_up():
                return
            self._require_session(sid)

    def _require_session(self, sid: str) -> None:
        with translate_errors():
            alive = self.redis.exists(self.keys.session(sid))
        if not alive:
            raise session_gone(sid)

    async def awatch(
        self,
        session_id: str,
        *,
        names: Collection[str] | None = None,
        types: Collection[str] | None = None,
        after: str = "$",
        block_s: float | None = None,
    ) -> AsyncIterator[Event]:
        """The asyncio twin of :meth:`watch` (redis-py's asyncio client; the event loop
        is never blocked)."""
        sid = check_session_id(session_id)
        cursor = check_after(after, allow_now=True)
        keep = _Filter(names, types)
        key = self.keys.events(sid)
        client = async_twin(self.redis)
        try:
            if cursor == "$":
                with translate_errors():
                    newest = await client.xrevrange(key, count=1)
                cursor = str(newest[0][0]) if newest else "0-0"
            await self._arequire_session(client, sid)
            pace = Pacer(block_s)
            while True:
                with translate_errors():
                    reply = await client.xread({key: cursor}, count=_BATCH, block=pace.block_ms())
                entries = entries_of(reply)
                for entry_id, fields in entries:
                    cursor = entry_id
                    event = decode_event(entry_id, fields)
                    if keep(event):
                        yield event
                if entries:
                    pace.heard()
                    continue
                if pace.gave_up():
                    return
                await self._arequire_session(client, sid)
        finally:
            await client.aclose()

    async def _arequire_session(self, client: Any, sid: str) -> None:
        with translate_errors():
            alive = await client.exists(self.keys.session(sid))
        if not alive:
            raise session_gone(sid)
