"""The SessionStore's shared core: the Redis client, scripts, error translation, JSON."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.exceptions import NoScriptError

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
from dspex_tasks.store.codec import dumps, loads
from dspex_tasks.store.connection import decoding_client
from dspex_tasks.store.scripts import Status
from dspex_tasks.store.varschema import SchemaCache

__all__ = ["StoreCore", "dumps", "loads", "translate_errors"]

#: Redis failures that mean "the store is not reachable right now" (retryable): a
#: refused or dropped connection, a timeout, a server still loading its AOF, a replica
#: that became read-only during a failover.
_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.MasterDownError,
    # Redis Cluster: a node down / slots uncovered / a slot migrating.
    redis.exceptions.ClusterDownError,
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.TryAgainError,
)
#: Failures no retry fixes: wrong credentials, or an ACL user without the commands the
#: store needs. They are configuration errors (``invalid_settings``), not outages.
_REJECTED: tuple[type[Exception], ...] = (
    redis.exceptions.AuthenticationError,
    redis.exceptions.AuthorizationError,
    redis.exceptions.NoPermissionError,
)


@contextmanager
def translate_errors() -> Iterator[None]:
    """Turn Redis connectivity failures into ``StoreUnavailable`` at the store boundary,
    and rejected credentials / ACL permissions into ``ConfigError``."""
    try:
        yield
    except _REJECTED as e:
        raise ConfigError(
            f"Redis rejected the store's credentials or ACL permissions ({type(e).__name__}: "
            f"{e}): check the user and password in DSPEX_REDIS_URL",
        ) from e
    except _UNAVAILABLE as e:
        raise StoreUnavailable(f"Redis is unavailable: {type(e).__name__}: {e}") from e


class StoreCore:
    """State and helpers every part of the SessionStore shares.

    Cluster mode (``self.cluster``, on when the client is a ``RedisCluster``): every script
    call touches the keys of one session only (one hash slot). Operations that also
    maintain the cross-session index and stats (create, delete, expiry, global programs)
    run a session-slot script, then single-key commands on the index and stats, so they
    are not atomic as a whole:

    - the quota check (``max_sessions``) reads the index before the create: approximate
      under concurrent creates;
    - counters stay exact and consistent with the index: ``created`` counts an index
      entry added, ``deleted`` / ``expired`` an index entry removed (ZADD / ZREM answered
      1), so a session is never counted twice, even by concurrent sweeps;
    - a crash between the steps can leave a session unindexed (invisible to
      ``list_sessions`` / ``stats`` and the sweep); the native-expiry backstop
      (PEXPIREAT on every session key) still reclaims it;
    - the sweep costs one round trip per candidate session (redis-py does not pipeline
      scripts on a cluster).
    """

    def __init__(
        self,
        redis_client: redis.Redis | RedisCluster,
        *,
        prefix: str = "dspex",
        default_ttl_s: float = 3600,
        expiry_grace_s: float = 300,
        max_sessions: int | None = None,
        max_value_bytes: int = 1_048_576,
        global_program_ttl_s: float = 3600,
        idempotency_keep_s: float = 3600,
        events_maxlen: int = 1000,
        variable_history: int = 10,
        program_history: int = 10,
        max_dataset_bytes: int = 4_194_304,
    ) -> None:
        # Our own decoding: any client works, whatever its decode_responses.
        redis_client, self._owns_client = decoding_client(redis_client)
        if default_ttl_s <= 0:
            raise ConfigError(f"default_ttl_s must be positive, got {default_ttl_s}")
        #: Redis Cluster: scripts stay within one session's slot (see the class doc).
        self.cluster = isinstance(redis_client, RedisCluster)
        # Typed as redis.Redis: a RedisCluster offers the same command methods.
        self.redis = cast("redis.Redis", redis_client)
        self.keys = Keys(prefix)
        self.default_ttl_s = default_ttl_s
        self.grace_ms = int(expiry_grace_s * 1000)
        self.max_sessions = max_sessions
        self.max_value_bytes = max_value_bytes
        self.global_program_ttl_s = global_program_ttl_s
        #: How long a task's "outputs written" record is kept: longer than the broker's
        #: visibility timeout, the window in which the same message can come back.
        self.idempotency_keep_s = idempotency_keep_s
        #: Approximate length of each session's event stream (0: no events at all).
        self.events_maxlen = events_maxlen
        #: Versions a variable keeps by default, the current one included.
        self.default_history = variable_history
        #: Versions a program keeps, the current one included (at least 1).
        self.program_versions_kept = max(1, program_history)
        self.max_dataset_bytes = max_dataset_bytes
        self._schemas = SchemaCache()
        self._scripts: dict[str, Script] = {
            name: redis_client.register_script(source)
            for name, source in scripts.all_scripts().items()
        }

    # --- running scripts -------------------------------------------------------------

    def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        script = self._scripts[name]
        with translate_errors():
            try:
                # EVALSHA straight away: redis-py's Script.__call__ costs ~12 us of CPU
                # more per call, on every store operation and twice per task.
                return self.redis.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                # A server that restarted or flushed its script cache: the Script loads it.
                return script(keys=list(keys), args=list(args))

    def _prelude_args(self, touch: bool) -> list[Any]:
        """ARGV[1..3] of every session-scoped script (see ``store/scripts.py``)."""
        return [self.grace_ms, "1" if touch else "0", self.events_maxlen]

    def _session_script(
        self, name: str, sid: str, touch: bool, *args: Any, keys_after: Sequence[str] = ()
    ) -> list[Any]:
        """Run a session-scoped script (``keys_after``: its keys after the session's);
        raise for a missing or expired session."""
        keys = self.keys.session_keys(sid)
        if keys_after:
            keys += keys_after
        reply = self._script(name, keys, [*self._prelude_args(touch), *args])
        status = reply[0]
        if status == Status.MISSING:
            raise SessionNotFound(f"session {sid!r} not found", {"session_id": sid})
        if status == Status.EXPIRED:
            self._expire_ids([sid])
            raise SessionExpired(f"session {sid!r} has expired", {"session_id": sid})
        return list(reply)

    def _expire_ids(self, sids: Sequence[str]) -> tuple[int, int]:
        """Expire these sessions if their deadline passed; returns (expired, kept)."""
        if self.cluster:
            return self._expire_ids_cluster(sids)
        keys = [self.keys.sessions, self.keys.stats]
        for sid in sids:
            keys.extend(self.keys.session_keys(sid))
        expired, kept = self._script("EXPIRE_SESSIONS", keys, list(sids))
        return int(expired), int(kept)

    def _expire_ids_cluster(self, sids: Sequence[str]) -> tuple[int, int]:
        """Cluster mode of ``_expire_ids``: per session a slot script re-checks the deadline
        and deletes the keys; then one pipeline fixes the index. Only a ZREM that removed
        the entry counts, so concurrent sweeps never count a session twice."""
        kept: dict[str, int] = {}
        gone: list[str] = []
        for sid in sids:
            deadline = int(self._script("CLUSTER_EXPIRE_SESSION", self.keys.session_keys(sid), []))
            if deadline > 0:
                kept[sid] = deadline
            else:
                gone.append(sid)
        expired = 0
        with translate_errors():
            pipe = self.redis.pipeline(transaction=False)
            for sid, deadline in kept.items():
                # Touched since indexed: re-index at the real deadline (XX: never re-add).
                pipe.zadd(self.keys.sessions, {sid: deadline}, xx=True)
            for sid in gone:
                pipe.zrem(self.keys.sessions, sid)
            replies = pipe.execute() if kept or gone else []
            expired = sum(int(r) for r in replies[len(kept) :])
            if expired:
                self.redis.hincrby(self.keys.stats, "expired", expired)
        return expired, len(kept)

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
