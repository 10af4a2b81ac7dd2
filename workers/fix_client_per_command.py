"""One redis-py client per broker connection pool, instead of a new one per command.

kombu's Redis channel builds a fresh ``redis.Redis`` object around its connection pool
for every synchronous operation: recording a delivered message as unacknowledged,
acknowledging it, publishing an event. A ``redis.Redis`` copies its ~250 response
callbacks into a new case-insensitive dict when built, and a task needs three of them:
~0.12 ms of worker CPU per task, profiled on an LM-bound worker at 64 concurrent tasks.
The HTTP API server (``dspex-tasks api``) installs it too: each run it starts publishes
the task and its task-sent event, two more clients built and dropped per request.

The client holds no connection of its own (every command borrows one from the pool and
returns it) and is safe to share between threads, so one per pool serves them all. A
channel that replaces its pool (a reconnect) gets a new client for the new pool; the
asynchronous client (``BRPOP``) is kombu's own and untouched.

Upstream: kombu 5.7.0's ``Channel.client`` / ``_create_client`` build a client per call by
design (no issue filed that we know of); remove this module if kombu starts caching one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kombu.transport import redis as kombu_redis

__all__ = ["install"]

_MARK = "_dspex_shared_client"


def install() -> None:
    """Patch kombu's Redis channel once per process (idempotent)."""
    channel = kombu_redis.Channel
    if getattr(channel._create_client, _MARK, False):
        return
    create: Callable[..., Any] = channel._create_client

    def create_client(self: Any, asynchronous: bool = False) -> Any:
        if asynchronous:
            return create(self, asynchronous=True)
        pool = self.pool
        cached = self.__dict__.get(_MARK)
        if cached is not None and cached[0] is pool:
            return cached[1]
        client = create(self, asynchronous=False)
        # Keyed by the pool it wraps: a pool replaced after a reconnect gets a new one.
        self.__dict__[_MARK] = (pool, client)
        return client

    setattr(create_client, _MARK, True)
    setattr(channel, "_create_client", create_client)  # noqa: B010 (a method: mypy refuses =)
