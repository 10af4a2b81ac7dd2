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

from typing import Any

from celery import Celery, states
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str
from kombu.utils.objects import cached_property

__all__ = ["OneTripRedisBackend", "OneTripSentinelBackend", "use_one_trip_result_store"]

# KEYS: the task's result key.  ARGV: meta JSON, expiry in seconds ('0': none)
# Celery's guard, atomic: a stored SUCCESS is never overwritten. Otherwise SET (SETEX with
# an expiry) and PUBLISH on the key's channel (what waiting result consumers listen to).
STORE_STATE = """
local current = redis.call('GET', KEYS[1])
if current and string.find(current, '"SUCCESS"', 1, true) then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then return 0 end
end
local expires = tonumber(ARGV[2])
if expires > 0 then
  redis.call('SETEX', KEYS[1], expires, ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


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
        if state in states.EXCEPTION_STATES:
            traceback = None  # kept in the worker's log, never shown to producers
        if not self._one_trip():
            return super()._store_result(  # type: ignore[misc]
                task_id, result, state, traceback=traceback, request=request, **kwargs
            )
        meta = self._get_result_meta(  # type: ignore[attr-defined]
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = bytes_to_str(task_id)  # type: ignore[no-untyped-call]
        value = self.encode(meta)  # type: ignore[attr-defined]
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError(
                "value too large for Redis backend", state=state, task_id=task_id
            )
        expires = self.failure_expires if state == states.FAILURE else self.expires
        key = self.get_key_for_task(task_id)  # type: ignore[attr-defined]
        self.ensure(self._store_state_once, (key, value, expires))  # type: ignore[attr-defined]
        return result

    def _store_state_once(self, key: Any, value: Any, expires: int | None) -> Any:
        return self._store_state(keys=[key], args=[value, int(expires or 0)])

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
