"""The SessionStore's shared core: the Redis client, scripts, error translation, JSON."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from redis.commands.core import Script

from dspex_tasks.errors import (
    ConfigError,
    PayloadTooLarge,
    SessionExpired,
    SessionNotFound,
    StoreUnavailable,
    ValidationFailed,
)
from dspex_tasks.keys import Keys
from dspex_tasks.store import scripts

__all__ = ["StoreCore", "dumps", "loads", "translate_errors"]

#: Redis failures that mean "the store is not reachable right now" (retryable): a
#: refused or dropped connection, a timeout, a server still loading its AOF, a replica
#: that became read-only during a failover.
_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.MasterDownError,
)


@contextmanager
def translate_errors() -> Iterator[None]:
    """Turn Redis connectivity failures into ``StoreUnavailable`` at the store boundary."""
    try:
        yield
    except _UNAVAILABLE as e:
        raise StoreUnavailable(f"Redis is unavailable: {type(e).__name__}: {e}") from e


def dumps(value: Any) -> bytes:
    """JSON-encode ``value``; anything JSON cannot carry is a ``ValidationFailed``."""
    try:
        return orjson.dumps(value)
    except TypeError as e:
        raise ValidationFailed(f"value is not JSON-serializable: {e}", {"rule": "json"}) from e


def loads(raw: str | bytes) -> Any:
    return orjson.loads(raw)


@dataclass(frozen=True)
class VarSchema:
    """The immutable part of a variable (id, name, type, constraints), cached per process.

    Type and constraints never change after registration and ids are never reused, so a
    cached schema is valid while the name still maps to its id; the write scripts check
    exactly that (status ``stale``) and the caller refetches.
    """

    id: str
    name: str
    type: str
    constraints: dict[str, Any]
    description: str | None
    created_ms: int


class _SchemaCache:
    """A small thread-safe LRU of ``(session_id, token) -> VarSchema``."""

    def __init__(self, max_entries: int = 8192) -> None:
        self._data: OrderedDict[tuple[str, str], VarSchema] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_entries

    def get(self, sid: str, token: str) -> VarSchema | None:
        with self._lock:
            schema = self._data.get((sid, token))
            if schema is not None:
                self._data.move_to_end((sid, token))
            return schema

    def put(self, sid: str, schema: VarSchema) -> None:
        with self._lock:
            for token in (schema.name, schema.id):
                self._data[(sid, token)] = schema
                self._data.move_to_end((sid, token))
            while len(self._data) > self._max:
                self._data.popitem(last=False)

    def drop(self, sid: str, token: str) -> None:
        with self._lock:
            schema = self._data.pop((sid, token), None)
            if schema is not None:
                self._data.pop((sid, schema.name), None)
                self._data.pop((sid, schema.id), None)


class StoreCore:
    """State and helpers every part of the SessionStore shares."""

    def __init__(
        self,
        redis_client: redis.Redis,
        *,
        prefix: str = "dspex",
        default_ttl_s: float = 3600,
        expiry_grace_s: float = 300,
        max_sessions: int | None = None,
        max_value_bytes: int = 1_048_576,
        global_program_ttl_s: float = 3600,
        idempotency_keep_s: float = 3600,
    ) -> None:
        if not redis_client.get_connection_kwargs().get("decode_responses"):
            raise ConfigError("SessionStore needs a Redis client with decode_responses=True")
        if default_ttl_s <= 0:
            raise ConfigError(f"default_ttl_s must be positive, got {default_ttl_s}")
        self.redis = redis_client
        self.keys = Keys(prefix)
        self.default_ttl_s = default_ttl_s
        self.grace_ms = int(expiry_grace_s * 1000)
        self.max_sessions = max_sessions
        self.max_value_bytes = max_value_bytes
        self.global_program_ttl_s = global_program_ttl_s
        #: How long a task's "outputs written" record is kept: longer than the broker's
        #: visibility timeout, the window in which the same message can come back.
        self.idempotency_keep_s = idempotency_keep_s
        self._schemas = _SchemaCache()
        self._scripts: dict[str, Script] = {
            name: redis_client.register_script(getattr(scripts, name))
            for name in (
                "CREATE_SESSION",
                "GET_SESSION",
                "SET_SESSION_FIELD",
                "DELETE_SESSION",
                "EXPIRY_CANDIDATES",
                "EXPIRE_SESSIONS",
                "REGISTER_VARIABLES",
                "GET_VARIABLES",
                "LIST_VARIABLES",
                "UPDATE_VARIABLES",
                "DELETE_VARIABLE",
                "PROGRAM_OP",
                "GLOBAL_PROGRAM_OP",
                "TASK_CONTEXT",
                "RELEASE_TASK",
            )
        }

    # --- running scripts -------------------------------------------------------------

    def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        with translate_errors():
            return self._scripts[name](keys=list(keys), args=list(args))

    def _session_script(self, name: str, sid: str, touch: bool, *args: Any) -> list[Any]:
        """Run a session-scoped script; raise for a missing or expired session."""
        reply = self._script(
            name, self.keys.session_keys(sid), [self.grace_ms, "1" if touch else "0", *args]
        )
        status = reply[0]
        if status == "missing":
            raise SessionNotFound(f"session {sid!r} not found", {"session_id": sid})
        if status == "expired":
            self._expire_ids([sid])
            raise SessionExpired(f"session {sid!r} has expired", {"session_id": sid})
        return list(reply)

    def _expire_ids(self, sids: Sequence[str]) -> tuple[int, int]:
        """Expire these sessions if their deadline passed; returns (expired, kept)."""
        keys = [self.keys.sessions, self.keys.stats]
        for sid in sids:
            keys.extend(self.keys.session_keys(sid))
        expired, kept = self._script("EXPIRE_SESSIONS", keys, list(sids))
        return int(expired), int(kept)

    def _expire_some(self, limit: int = 100) -> int:
        """Expire up to ``limit`` overdue sessions now (frees quota without waiting for beat)."""
        candidates = self._script("EXPIRY_CANDIDATES", [self.keys.sessions], [limit])
        return self._expire_ids(candidates)[0] if candidates else 0

    # --- encoding --------------------------------------------------------------------

    def _object_json(self, value: Any, what: str) -> bytes:
        """A JSON object (metadata and the like), size-limited like a value."""
        if value is None:
            return b"{}"
        if not isinstance(value, Mapping):
            raise ValidationFailed(f"{what} must be a JSON object", {"rule": "metadata"})
        return self._encode_limited(dict(value), what)

    def _encode_limited(self, value: Any, what: str) -> bytes:
        raw = dumps(value)
        if len(raw) > self.max_value_bytes:
            raise PayloadTooLarge(
                f"{what} is {len(raw)} bytes encoded, over the limit of {self.max_value_bytes}",
                {"size_bytes": len(raw), "limit_bytes": self.max_value_bytes},
            )
        return raw
