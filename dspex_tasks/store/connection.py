"""Every Redis topology concern in one place: direct, TLS, Sentinel, Cluster.

The store's clients (:func:`redis_client`, :func:`redis_client_for`), the broker and
result-backend connection options Celery gets (:func:`celery_connection_conf`), and how
to close a client of any topology without leaking a socket (:func:`close_client`).
Settings only parse and check the ``DSPEX_REDIS_*`` variables; what they mean for a
connection is decided here.
"""

from __future__ import annotations

import copy
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from dspex_tasks.settings import Settings

__all__ = [
    "async_twin",
    "celery_connection_conf",
    "close_client",
    "decoding_client",
    "redis_client",
    "redis_client_for",
    "sentinel_kwargs",
    "tls_options",
]


def tls_options(settings: Settings) -> dict[str, Any]:
    """``ssl_*`` connection options for a TLS connection (redis-py, kombu, Celery)."""
    options: dict[str, Any] = {"ssl_cert_reqs": settings.redis_tls_verify}
    if settings.redis_tls_ca_file:
        options["ssl_ca_certs"] = settings.redis_tls_ca_file
    if settings.redis_tls_cert_file:
        options["ssl_certfile"] = settings.redis_tls_cert_file
    if settings.redis_tls_key_file:
        options["ssl_keyfile"] = settings.redis_tls_key_file
    return options


def sentinel_kwargs(settings: Settings, *, tls: bool) -> dict[str, Any]:
    """Connection options for the sentinels themselves (not the master)."""
    options: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.socket_timeout_s,
    }
    if settings.redis_sentinel_password:
        options["password"] = settings.redis_sentinel_password.get()
    if tls:
        options.update(ssl=True, **tls_options(settings))
    return options


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
            options.update(tls_options(settings))
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
            options.update(ssl=True, **tls_options(settings))
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(sentinels), sentinel_kwargs=sentinel_kwargs(settings, tls=tls)
        )
        master = sentinel.master_for(settings.redis_sentinel_master, **options)  # type: ignore[no-untyped-call]
        return cast("redis.Redis", master)
    if tls:
        options.update(tls_options(settings))
    return redis_client(url, socket_timeout_s=timeout, **options)


def decoding_client(
    client: redis.Redis | RedisCluster,
) -> tuple[redis.Redis | RedisCluster, bool]:
    """``client`` itself if it decodes replies to ``str``, else a decoding twin.

    The store reads strings; a user's default ``redis.Redis()`` (bytes replies) must work
    as it is, so the twin connects to the same server(s) with the same options (TLS,
    credentials, Sentinel master, cluster nodes) on a pool of its own. Returns the client
    and whether the caller owns it (and so must close it).
    """
    if client.get_connection_kwargs().get("decode_responses"):
        return client, False
    if isinstance(client, RedisCluster):
        kwargs = client.get_connection_kwargs()  # type: ignore[no-untyped-call]
        # Per-node and cluster-refused options are the constructor's to set again.
        options = {k: v for k, v in kwargs.items() if k not in ("host", "port", "db", "retry")}
        options["decode_responses"] = True
        # The constructor takes TLS as ssl=True, not as the connection class it implies.
        if issubclass(options.pop("connection_class", redis.Connection), redis.SSLConnection):
            options["ssl"] = True
        nodes = [
            ClusterNode(node.host, node.port)  # type: ignore[no-untyped-call]
            for node in client.get_nodes()  # type: ignore[no-untyped-call]
        ]
        return RedisCluster(startup_nodes=nodes, **options), True
    # A shallow copy keeps what the pool class needs (a Sentinel pool's master name and
    # sentinels); reset() gives it its own connections and locks.
    pool = copy.copy(client.connection_pool)
    pool.connection_kwargs = {**pool.connection_kwargs, "decode_responses": True}
    pool.reset()
    return redis.Redis(connection_pool=pool), True


def _async_options(kwargs: dict[str, Any], connection_class: type[Any]) -> dict[str, Any]:
    """The options of a sync connection that the asyncio connection class accepts."""
    import inspect

    accepted: set[str] = set()
    for cls in connection_class.__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None:
            accepted.update(inspect.signature(init).parameters)
    return {k: v for k, v in kwargs.items() if k in accepted and k != "self"}


def async_twin(client: redis.Redis | RedisCluster) -> Any:
    """A ``redis.asyncio`` client to the same server(s) as ``client``, decoding replies.

    For asyncio readers (``SessionStore.awatch``): same host, credentials and TLS; a
    Sentinel master through the same sentinels; a cluster through its known nodes. The
    caller owns it (``await twin.aclose()``).
    """
    import redis.asyncio as aredis
    from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel

    if isinstance(client, RedisCluster):
        kwargs = dict(client.get_connection_kwargs())  # type: ignore[no-untyped-call]
        ssl = issubclass(kwargs.pop("connection_class", redis.Connection), redis.SSLConnection)
        options = _async_options(kwargs, aredis.SSLConnection if ssl else aredis.Connection)
        for key in ("host", "port", "db"):
            options.pop(key, None)
        nodes = [
            AsyncClusterNode(node.host, node.port)
            for node in client.get_nodes()  # type: ignore[no-untyped-call]
        ]
        return aredis.RedisCluster(
            startup_nodes=nodes, ssl=ssl, **{**options, "decode_responses": True}
        )
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "decode_responses": True}
    manager = getattr(pool, "sentinel_manager", None)
    if manager is not None:
        sentinels = [
            (
                s.connection_pool.connection_kwargs["host"],
                s.connection_pool.connection_kwargs["port"],
            )
            for s in manager.sentinels
        ]
        sentinel_options = dict(manager.sentinels[0].connection_pool.connection_kwargs)
        for key in ("host", "port"):
            sentinel_options.pop(key, None)
        watcher = AsyncSentinel(  # type: ignore[no-untyped-call]
            sentinels,
            sentinel_kwargs=_async_options(sentinel_options, aredis.SSLConnection),
        )
        options = _async_options(kwargs, aredis.SSLConnection)
        for key in ("host", "port"):
            options.pop(key, None)
        return watcher.master_for(pool.service_name, **options)  # type: ignore[attr-defined]
    if issubclass(pool.connection_class, redis.SSLConnection):
        connection_class: type[Any] = aredis.SSLConnection
    elif issubclass(pool.connection_class, redis.UnixDomainSocketConnection):
        connection_class = aredis.UnixDomainSocketConnection
    else:
        connection_class = aredis.Connection
    # from_pool: the client owns the pool, so aclose() closes its connections too.
    return aredis.Redis.from_pool(
        aredis.ConnectionPool(
            connection_class=connection_class, **_async_options(kwargs, connection_class)
        )
    )


def close_client(client: redis.Redis | RedisCluster) -> None:
    """Close ``client`` and every pool it holds, whatever its topology."""
    if isinstance(client, RedisCluster):
        # RedisCluster.close() leaves the node pools of a from_url() client open.
        client.disconnect_connection_pools()  # type: ignore[no-untyped-call]
    client.close()
    # A Sentinel-managed client also holds connections to the sentinels.
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        sentinel.close()


def _transport_options(settings: Settings) -> dict[str, Any]:
    """kombu's Redis transport options for the broker and the result backend."""
    return {
        # Longer than the hard time limit: a running task is never handed to a second
        # worker just because it is slow.
        "visibility_timeout": settings.visibility_timeout_s,
        # A killed worker's unacked task comes back only when some worker scans the
        # unacked index; kombu scans every interval x throttle s (10 x 10 by default), so
        # recovery took up to 100 s on top of the visibility timeout. Scan every
        # visibility/4 s (1-10 s) instead: one cheap ZRANGE per worker per interval.
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 4)),
        "unacked_restore_throttle": 1,
        # The scan holds a mutex key (SET NX EX). If Redis dies while a worker holds it,
        # the key survives in the AOF and blocks every scan until it expires: 300 s by
        # default. A scan takes milliseconds, and restores are WATCH transactions that
        # cannot double-restore anyway, so keep it short.
        "unacked_mutex_expire": max(5, min(30, settings.visibility_timeout_s)),
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.socket_timeout_s,
        "health_check_interval": 10,
        "retry_on_timeout": True,
    }


def _sentinel_options(settings: Settings, url: str, tls: bool) -> dict[str, Any]:
    """Transport options a ``sentinel://`` broker or backend URL needs (none otherwise)."""
    if not url.startswith("sentinel://"):
        return {}
    return {
        "master_name": settings.redis_sentinel_master,
        "sentinel_kwargs": sentinel_kwargs(settings, tls=tls),
    }


def celery_connection_conf(settings: Settings) -> dict[str, Any]:
    """Celery settings for the broker's and result backend's connections.

    Sentinel URLs get their master name and sentinel options; TLS roles always get our
    ``ssl_*`` options: kombu falls back to CERT_NONE for a rediss:// broker without
    options, and Celery's backend refuses one (verification is "required" by default).
    """
    transport = _transport_options(settings)
    conf: dict[str, Any] = {
        "broker_transport_options": {
            **transport,
            **_sentinel_options(settings, settings.broker_url, settings.broker_tls),
        },
        "result_backend_transport_options": {
            **transport,
            **_sentinel_options(settings, settings.result_backend, settings.backend_tls),
        },
    }
    if settings.broker_tls:
        conf["broker_use_ssl"] = tls_options(settings)
    if settings.backend_tls:
        conf["redis_backend_use_ssl"] = tls_options(settings)
    return conf
