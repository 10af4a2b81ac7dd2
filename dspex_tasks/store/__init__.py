"""SessionStore: sessions, typed variables, programs and expiry on Redis."""

from __future__ import annotations

from typing import Any

import redis

from dspex_tasks.settings import Settings
from dspex_tasks.store.expiry import ExpiryMixin
from dspex_tasks.store.models import Session, Variable
from dspex_tasks.store.programs import ProgramsMixin
from dspex_tasks.store.sessions import SessionsMixin
from dspex_tasks.store.taskstate import TaskContext, TaskStateMixin

__all__ = ["Session", "SessionStore", "TaskContext", "Variable", "redis_client"]


def redis_client(url: str, *, socket_timeout_s: float = 5.0, **kwargs: Any) -> redis.Redis:
    """A redis-py client for the store: decoded strings, bounded timeouts, health checks.

    Timeouts are what turn an outage into a quick ``StoreUnavailable`` instead of a hang.
    """
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        health_check_interval=30,
        **kwargs,
    )


class SessionStore(SessionsMixin, TaskStateMixin, ProgramsMixin, ExpiryMixin):
    """The Redis-backed SessionStore shared by producers and workers.

    ``SessionStore(redis_client, prefix="dspex", default_ttl_s=3600)``; the client must
    use ``decode_responses=True`` (see :func:`redis_client`).
    """

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> SessionStore:
        """A store on its own connection pool to ``url``."""
        timeout = kwargs.pop("socket_timeout_s", 5.0)
        return cls(redis_client(url, socket_timeout_s=timeout), **kwargs)

    @classmethod
    def from_settings(cls, settings: Settings) -> SessionStore:
        """A store configured from the process's Settings."""
        return cls(
            redis_client(settings.redis_url, socket_timeout_s=settings.socket_timeout_s),
            prefix=settings.key_prefix,
            default_ttl_s=settings.session_ttl_s,
            expiry_grace_s=settings.expiry_grace_s,
            max_sessions=settings.max_sessions,
            max_value_bytes=settings.max_value_bytes,
            global_program_ttl_s=settings.global_program_ttl_s,
            idempotency_keep_s=max(settings.idempotency_ttl_s, settings.visibility_timeout_s * 2),
        )

    def close(self) -> None:
        self.redis.close()
