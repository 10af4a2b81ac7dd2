"""Session lifecycle: create, read, touch, delete, list, metadata and LM settings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from dspex_tasks.errors import SessionExists, SessionQuotaExceeded, ValidationFailed
from dspex_tasks.keys import check_session_id
from dspex_tasks.lm.params import validate_lm_settings
from dspex_tasks.store.base import StoreCore, dumps, translate_errors
from dspex_tasks.store.models import Session, session_from_record
from dspex_tasks.store.scripts import Status

__all__ = ["SessionsMixin"]


def _ttl_ms(ttl_s: Any) -> int:
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not ttl_s > 0:
        raise ValidationFailed(
            f"ttl_s must be a positive number of seconds, got {ttl_s!r}", {"rule": "ttl_s"}
        )
    if ttl_s > 10 * 365 * 86400:
        raise ValidationFailed(f"ttl_s {ttl_s} is over ten years", {"rule": "ttl_s"})
    return max(1, int(ttl_s * 1000))


class SessionsMixin(StoreCore):
    """Sessions with a sliding TTL; every key of a session is removed together."""

    def create_session(
        self,
        session_id: str,
        *,
        ttl_s: float | None = None,
        metadata: Mapping[str, Any] | None = None,
        exist_ok: bool = False,
    ) -> Session:
        """Create a session.

        Raises:
            InvalidSessionId, ValidationFailed (bad ttl_s or metadata),
            SessionExists (taken id without ``exist_ok``), SessionQuotaExceeded.
        """
        sid = check_session_id(session_id)
        ttl_ms = _ttl_ms(self.default_ttl_s if ttl_s is None else ttl_s)
        meta = self._object_json(metadata, "session metadata")
        if self.cluster:
            return self._create_session_cluster(sid, ttl_ms, meta, exist_ok)
        keys = [*self.keys.session_keys(sid), self.keys.sessions, self.keys.stats]
        args = [
            *self._prelude_args(False),
            sid,
            ttl_ms,
            meta,
            "1" if exist_ok else "0",
            self.max_sessions or 0,
        ]
        reply = self._script("CREATE_SESSION", keys, args)
        if reply[0] == Status.EXISTS:
            raise SessionExists(f"session {sid!r} already exists", {"session_id": sid})
        if reply[0] == Status.QUOTA and self._expire_some():
            # Expired sessions the sweep has not reached yet still hold quota slots.
            reply = self._script("CREATE_SESSION", keys, args)
        if reply[0] == Status.QUOTA:
            raise SessionQuotaExceeded(
                f"cannot create session {sid!r}: the limit of {reply[1]} live sessions is reached",
                {"limit": int(reply[1])},
            )
        return session_from_record(sid, reply[2])

    def _create_session_cluster(
        self, sid: str, ttl_ms: int, meta: bytes, exist_ok: bool
    ) -> Session:
        """Cluster mode of create_session: the session-slot script, then the index."""

        def attempt() -> list[Any]:
            full = False
            if self.max_sessions:
                # Approximate under concurrent creates: the index is on another slot.
                with translate_errors():
                    full = int(self.redis.zcard(self.keys.sessions)) >= self.max_sessions
            args = [*self._prelude_args(False), sid, ttl_ms, meta, "1" if exist_ok else "0"]
            reply = self._script(
                "CLUSTER_CREATE_SESSION", self.keys.session_keys(sid), [*args, "1" if full else "0"]
            )
            return list(reply)

        reply = attempt()
        if reply[0] == Status.EXISTS:
            raise SessionExists(f"session {sid!r} already exists", {"session_id": sid})
        if reply[0] == Status.QUOTA and self._expire_some():
            reply = attempt()
        if reply[0] == Status.QUOTA:
            raise SessionQuotaExceeded(
                f"cannot create session {sid!r}: the limit of {self.max_sessions} live sessions "
                "is reached",
                {"limit": self.max_sessions},
            )
        if int(reply[1]) == 1:
            with translate_errors():
                # A leftover entry (an expired or natively expired predecessor) is counted
                # as expired; the new entry as created: counters follow the index.
                pipe = self.redis.pipeline(transaction=False)
                pipe.zrem(self.keys.sessions, sid)
                pipe.zadd(self.keys.sessions, {sid: int(reply[3])})
                removed, added = pipe.execute()
                pipe = self.redis.pipeline(transaction=False)
                if removed:
                    pipe.hincrby(self.keys.stats, "expired", 1)
                if added:
                    pipe.hincrby(self.keys.stats, "created", 1)
                pipe.execute()
        return session_from_record(sid, reply[2])

    def get_session(self, session_id: str, *, touch: bool = True) -> Session:
        """Return the session (sliding its deadline unless ``touch=False``).

        Raises:
            SessionNotFound, SessionExpired (also deletes it), InvalidSessionId.
        """
        sid = check_session_id(session_id)
        reply = self._session_script("GET_SESSION", sid, touch)
        return session_from_record(sid, reply[1])

    def touch(self, session_id: str) -> Session:
        """Slide the session's deadline to now + ttl_s; returns the session."""
        return self.get_session(session_id, touch=True)

    def exists(self, session_id: str) -> bool:
        """Whether the session is live. Does not touch it."""
        sid = check_session_id(session_id)
        reply = self._script("GET_SESSION", self.keys.session_keys(sid), self._prelude_args(False))
        if reply[0] == Status.EXPIRED:
            self._expire_ids([sid])
        return bool(reply[0] == Status.OK)

    def delete_session(self, session_id: str) -> bool:
        """Delete every key of the session. Idempotent: False when it did not exist."""
        sid = check_session_id(session_id)
        if self.cluster:
            existed = int(self._script("CLUSTER_DELETE_SESSION", self.keys.session_keys(sid), []))
            with translate_errors():
                # Counted by whoever removes the index entry (a racing sweep may win).
                if self.redis.zrem(self.keys.sessions, sid):
                    self.redis.hincrby(self.keys.stats, "deleted" if existed else "expired", 1)
            return bool(existed)
        keys = [*self.keys.session_keys(sid), self.keys.sessions, self.keys.stats]
        return bool(self._script("DELETE_SESSION", keys, [sid]))

    def list_sessions(self) -> list[str]:
        """Ids of live sessions, sorted."""
        with translate_errors():
            seconds, micros = self.redis.time()
            now_ms = seconds * 1000 + micros // 1000
            indexed = cast(
                "list[tuple[str, float]]",
                self.redis.zrange(self.keys.sessions, 0, -1, withscores=True),
            )
            live = [sid for sid, score in indexed if score > now_ms]
            # Indexed deadlines are lower bounds: sessions past theirs may have been touched.
            doubtful = [sid for sid, score in indexed if score <= now_ms]
            if doubtful:
                pipe = self.redis.pipeline(transaction=False)
                for sid in doubtful:
                    pipe.hget(self.keys.session(sid), "deadline_ms")
                for sid, deadline in zip(doubtful, pipe.execute(), strict=True):
                    if deadline is not None and int(deadline) > now_ms:
                        live.append(sid)
        return sorted(live)

    def update_session_metadata(self, session_id: str, metadata: Mapping[str, Any]) -> Session:
        """Replace the session's metadata (a JSON object)."""
        sid = check_session_id(session_id)
        meta = self._object_json(metadata, "session metadata")
        reply = self._session_script("SET_SESSION_FIELD", sid, True, "metadata", meta)
        return session_from_record(sid, reply[1])

    def set_session_lm(
        self, session_id: str, *, profile: str = "default", **params: Any
    ) -> Session:
        """Choose the session's LM profile and safe parameters (temperature, max_tokens, ...).

        Endpoints and keys are never accepted here: they are worker configuration.
        """
        sid = check_session_id(session_id)
        settings = validate_lm_settings(profile, params)
        reply = self._session_script("SET_SESSION_FIELD", sid, True, "lm", dumps(settings))
        return session_from_record(sid, reply[1])
