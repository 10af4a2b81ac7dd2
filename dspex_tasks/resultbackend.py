"""Celery's Redis result backend, storing a task state in one round trip instead of two.

Before every state it stores, Celery's key-value backend reads the stored state back
(a ``GET`` and a JSON decode) so that a late duplicate can never overwrite ``SUCCESS``,
then writes with ``MULTI SET PUBLISH EXEC``. A task stores two states (``STARTED`` with
``task_track_started``, then its outcome), so that is four round trips per task, and
profiling an LM-bound worker put that read at ~8 % of its CPU. Here the check and the
write are one Lua script: one round trip per state, and the guarantee is stronger (the
check and the write are atomic; Celery's are two steps). Everything else -- the key,
the JSON, the expiry (``result_expires``, ``result_failure_expires``), the pub/sub
message result consumers wait for, retries -- is Celery's own code path.

A task that claims its id in the store (predict, chain_of_thought, run_program) goes
further when the backend is the store's Redis (:func:`writes_to`): its STARTED record is
written by the script that claims the task, and its SUCCESS record by the one that
records its end (:class:`TaskRecords`), so the records cost no round trip of their own.
The records are the ones built here (same JSON, expiry, guard and publish).

A failed (or retried) task's state is stored without its traceback: producers read the
error's class, code and details (``errors.py``), and a traceback would show them the
worker's file paths and source lines. The worker logs the traceback with the failure.

Sending a task subscribes to nothing (see ``on_task_call``): a producer that waits on a
result subscribes when it starts waiting. The subclasses are selected for ``redis://``,
``rediss://`` and ``sentinel://`` result backend URLs by
:func:`use_one_trip_result_store`; reading results (producers, ``AsyncResult``) is
otherwise unchanged.
"""

from __future__ import annotations

import os
from typing import Any

import orjson
from celery import Celery, states
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str
from kombu.utils.objects import cached_property
from redis import BlockingConnectionPool, ConnectionPool

from dspex_tasks.store.scripts.lua import lua_script
from dspex_tasks.store.taskstate import ResultRecord

__all__ = [
    "JSON_TYPES_ONLY",
    "OneTripRedisBackend",
    "OneTripSentinelBackend",
    "TaskRecords",
    "started_result",
    "use_one_trip_result_store",
    "writes_to",
]

#: orjson options that refuse what is not a JSON type (subclasses, dataclasses, dates),
#: which kombu's JSON encoder would tag for its decoder.
JSON_TYPES_ONLY = (
    orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
)

# KEYS: the task's result key.  ARGV: meta JSON, expiry in seconds ('0': none)
STORE_STATE = lua_script("return store_task_state(KEYS[1], ARGV[1], tonumber(ARGV[2]))")


class _OneTripStore:
    """``_store_result`` in one round trip (mixed into Celery's Redis backends)."""

    app: Celery
    client: Any
    serializer: str
    expires: int | None
    failure_expires: int | None
    _MAX_STR_VALUE_SIZE: int

    @cached_property
    def _store_state(self) -> Any:
        return self.client.register_script(STORE_STATE)

    def _one_trip(self) -> bool:
        # The script reads the stored state as JSON: other serializers and compressed
        # payloads take Celery's own path.
        conf = self.app.conf
        return self.serializer == "json" and not conf.result_compression

    def _store_result(
        self,
        task_id: Any,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        if state == states.SUCCESS and getattr(request, _SUCCESS_WRITTEN, False):
            return result  # written with the task's finish record (TaskRecords)
        if not self._one_trip():
            if state in states.EXCEPTION_STATES:
                traceback = None  # kept in the worker's log, never shown to producers
            return super()._store_result(  # type: ignore[misc]
                task_id, result, state, traceback=traceback, request=request, **kwargs
            )
        record = self.state_record(task_id, result, state, request)
        self.ensure(self._store_state_once, (record.key, record.value, record.expires_s))  # type: ignore[attr-defined]
        return result

    def state_record(self, task_id: Any, result: Any, state: str, request: Any) -> ResultRecord:
        """The record ``_store_result`` writes for this state, built but not written."""
        # No traceback: it is kept in the worker's log, never shown to producers.
        meta = self._get_result_meta(  # type: ignore[attr-defined]
            result=result, state=state, traceback=None, request=request
        )
        meta["task_id"] = bytes_to_str(task_id)  # type: ignore[no-untyped-call]
        value: str | bytes
        try:
            # JSON types only (a result of other types takes kombu's encoder, which tags
            # them for its decoder); the same JSON, built in C: ~50 us less per record.
            value = orjson.dumps(meta, option=JSON_TYPES_ONLY)
        except TypeError:
            value = self.encode(meta)  # type: ignore[attr-defined]
        if len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError(
                "value too large for Redis backend", state=state, task_id=task_id
            )
        expires = self.failure_expires if state == states.FAILURE else self.expires
        key = bytes_to_str(self.get_key_for_task(task_id))  # type: ignore[attr-defined,no-untyped-call]
        return ResultRecord(key, value, int(expires or 0))

    def _store_state_once(self, key: str, value: Any, expires_s: int) -> Any:
        return self._store_state(keys=[key], args=[value, expires_s])

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Subscribe to nothing when a task is sent.

        Celery subscribes to every sent task's result channel, in case the sender waits
        on it; but ``send_task``'s own result object is dropped by most senders (the
        Client keeps a handle of its own), and dropping it unsubscribes at once: two
        wasted round trips per task sent, ~10 % of an API start-run's CPU. A sender
        that does wait subscribes when it starts waiting, then reads the stored state,
        so a result that came first is not missed.
        """


class OneTripRedisBackend(_OneTripStore, RedisBackend):  # type: ignore[misc]
    """``redis://`` / ``rediss://`` result backend with one-round-trip state writes."""


class OneTripSentinelBackend(_OneTripStore, SentinelBackend):  # type: ignore[misc]
    """``sentinel://`` result backend with one-round-trip state writes."""


def use_one_trip_result_store(app: Celery) -> None:
    """Make ``app`` resolve Redis result backend URLs to the one-round-trip subclasses."""
    here = f"{__name__}:"
    app.loader.override_backends = {
        **getattr(app.loader, "override_backends", {}),
        "redis": here + "OneTripRedisBackend",
        "rediss": here + "OneTripRedisBackend",
        "sentinel": here + "OneTripSentinelBackend",
    }


#: What makes two redis-py clients talk to the same keyspace as the same user, with
#: redis-py's defaults (a URL without a database has no "db" in its pool's arguments).
_SERVER_FIELDS = {"host": "localhost", "port": 6379, "path": None, "db": 0, "username": None}


def writes_to(backend: Any, client: Any) -> bool:
    """Whether ``backend`` is a one-trip Redis backend whose records ``client`` (a plain
    redis-py client, not Cluster or Sentinel) can write in its own scripts: same server,
    database and user. Then a task's STARTED and SUCCESS records can ride in the store's
    claim and finish scripts (:class:`TaskRecords`)."""
    if not isinstance(backend, OneTripRedisBackend) or not backend._one_trip():
        return False
    pools = [getattr(c, "connection_pool", None) for c in (backend.client, client)]
    if any(type(p) is not ConnectionPool and type(p) is not BlockingConnectionPool for p in pools):
        return False
    mine, theirs = (p.connection_kwargs for p in pools)  # type: ignore[union-attr]
    return all(mine.get(f, d) == theirs.get(f, d) for f, d in _SERVER_FIELDS.items())


def started_result(request: Any) -> dict[str, Any]:
    """The result of a STARTED record, as Celery's tracer writes it."""
    return {"pid": os.getpid(), "hostname": request.hostname}


#: Request attribute: the store wrote the task's SUCCESS record (``TaskRecords``).
_SUCCESS_WRITTEN = "_dspex_success_written"


class TaskRecords:
    """A running task's STARTED and SUCCESS records, for the store to write in the round
    trips that claim the task and record its end (``begin_task``, ``finish_task``)
    instead of one round trip each. Celery's own write of a SUCCESS the store wrote is
    then skipped (``_store_result``). Only for a backend the store ``writes_to``."""

    def __init__(self, backend: _OneTripStore, request: Any) -> None:
        self.backend, self.request = backend, request

    def started(self) -> ResultRecord:
        """The record Celery writes before the task runs (``task_track_started``)."""
        result = started_result(self.request)
        return self.backend.state_record(self.request.id, result, states.STARTED, self.request)

    def succeeded(self, result: Any) -> ResultRecord:
        """The record of the task returning ``result``."""
        return self.backend.state_record(self.request.id, result, states.SUCCESS, self.request)

    def mark_succeeded(self) -> None:
        """The store wrote the SUCCESS record (or found one): Celery writes none."""
        setattr(self.request, _SUCCESS_WRITTEN, True)
