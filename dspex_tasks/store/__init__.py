"""SessionStore: sessions, typed variables, programs and expiry on Redis."""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import unquote, urlsplit

import redis
from redis.cluster import RedisCluster
from redis.sentinel import Sentinel

from dspex_tasks.settings import Settings
from dspex_tasks.store.expiry import ExpiryMixin
from dspex_tasks.store.ledger import LedgerMixin
from dspex_tasks.store.models import Session, Variable
from dspex_tasks.store.programs import ProgramsMixin
from dspex_tasks.store.sessions import SessionsMixin
from dspex_tasks.store.taskstate import TaskContext, TaskStateMixin

__all__ = [
    "Session",
    "SessionStore",
    "TaskContext",
    "Variable",
    "redis_client",
    "redis_client_for",
]


def redis_client(url: str, *, socket_timeout_s: float = 5.0, **kwargs: Any) -> redis.Redis:
    """A redis-py client for the store: decoded strings, bounded timeouts, health checks.

    Timeouts are what turn an outage into a quick ``StoreUnavailable`` instead of a hang.
    ``kwargs`` (e.g. ``ssl_ca_certs`` for a ``rediss://`` URL) override the defaults.
    """
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_timeout_s,
        "health_check_interval": 30,
    }
    options.update(kwargs)
    return redis.Redis.from_url(url, **options)


def _url_auth_db(url: str) -> dict[str, Any]:
    """username / password / db of a ``redis(s)://`` or ``sentinel://`` URL."""
    parts = urlsplit(url)
    found: dict[str, Any] = {}
    if parts.username:
        found["username"] = unquote(parts.username)
    if parts.password:
        found["password"] = unquote(parts.password)
    db = parts.path.strip("/")
    if db:
        found["db"] = int(db)
    return found


def redis_client_for(
    settings: Settings, *, role: str = "store", decode_responses: bool = True
) -> redis.Redis:
    """A redis-py client on the Redis that ``settings`` name for ``role``.

    ``role="store"``: ``DSPEX_REDIS_URL`` as a Redis Cluster (``DSPEX_REDIS_CLUSTER``; the
    result is then a ``RedisCluster``, which offers the same command methods), through
    Sentinel (``DSPEX_REDIS_SENTINELS``: the current master, re-resolved on failover), or
    direct. ``role="broker"``: ``DSPEX_BROKER_URL`` (``sentinel://`` URLs resolve the
    master like Celery does), for tools that read the queues. TLS options apply to
    ``rediss://`` URLs (and, with Sentinel, when ``DSPEX_REDIS_URL`` is ``rediss://``).
    """
    if role not in ("store", "broker"):
        raise ValueError(f"role must be 'store' or 'broker', got {role!r}")
    url = settings.redis_url if role == "store" else settings.broker_url
    tls = settings.store_tls if role == "store" else settings.broker_tls
    timeout = settings.socket_timeout_s
    options: dict[str, Any] = {
        "decode_responses": decode_responses,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
    }
    if role == "store" and settings.redis_cluster:
        if tls:
            options.update(settings.redis_tls_options())
        return cast("redis.Redis", RedisCluster.from_url(url, **options))
    sentinels = settings.redis_sentinels
    if role == "broker" and url.startswith("sentinel://"):
        sentinels = tuple(
            (part.hostname or "localhost", part.port or 26379)
            for part in (urlsplit(chunk) for chunk in url.split(";") if chunk)
        )
    elif role == "broker":
        sentinels = ()
    if sentinels:
        assert settings.redis_sentinel_master  # checked by Settings
        options.update(_url_auth_db(url.split(";")[0]), health_check_interval=30)
        if tls:
            options.update(ssl=True, **settings.redis_tls_options())
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(sentinels), sentinel_kwargs=settings.sentinel_kwargs(tls=tls)
        )
        master = sentinel.master_for(settings.redis_sentinel_master, **options)  # type: ignore[no-untyped-call]
        return cast("redis.Redis", master)
    if tls:
        options.update(settings.redis_tls_options())
    return redis_client(url, socket_timeout_s=timeout, **options)


class SessionStore(SessionsMixin, TaskStateMixin, ProgramsMixin, ExpiryMixin, LedgerMixin):
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
            redis_client_for(settings),
            prefix=settings.key_prefix,
            default_ttl_s=settings.session_ttl_s,
            expiry_grace_s=settings.expiry_grace_s,
            max_sessions=settings.max_sessions,
            max_value_bytes=settings.max_value_bytes,
            global_program_ttl_s=settings.global_program_ttl_s,
            idempotency_keep_s=max(settings.idempotency_ttl_s, settings.visibility_timeout_s * 2),
        )

    def close(self) -> None:
        if self.cluster:
            # RedisCluster.close() leaves the node pools of a from_url() client open.
            cast("RedisCluster", self.redis).disconnect_connection_pools()  # type: ignore[no-untyped-call]
        self.redis.close()
        # A Sentinel-managed client also holds connections to the sentinels.
        manager = getattr(getattr(self.redis, "connection_pool", None), "sentinel_manager", None)
        for client in getattr(manager, "sentinels", ()):
            client.close()
