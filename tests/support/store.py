"""Helpers shared by the SessionStore tests (tests/test_store_*.py).

Stores are built on the real test redis-server with a per-test key prefix, so tests
never see each other's keys and need no FLUSHALL.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import redis

from dspex_tasks.store import SessionStore
from support.polling import wait_until

StoreFactory = Callable[..., SessionStore]


def raw_client(url: str) -> redis.Redis:
    """A plain client for inspecting what the store wrote (strings, not bytes)."""
    return redis.Redis.from_url(url, decode_responses=True)


def session_key_names(raw: redis.Redis, store: SessionStore, sid: str) -> list[str]:
    """Every key of one session that exists right now (SCAN over its pattern)."""
    return sorted(raw.scan_iter(match=store.keys.session_pattern(sid), count=1000))


def server_now_ms(raw: redis.Redis) -> int:
    seconds, micros = raw.time()
    return int(seconds) * 1000 + int(micros) // 1000


def wait_server_past(raw: redis.Redis, when_ms: float, timeout_s: float = 30.0) -> int:
    """Wait until the Redis server's clock (the one every deadline is measured on) is
    past ``when_ms``; returns the server time seen."""
    return wait_until(
        lambda: (now := server_now_ms(raw)) > when_ms and now,
        timeout_s,
        interval=0.01,
        what=f"the Redis clock to pass {when_ms}",
    )


def server_tick(raw: redis.Redis) -> int:
    """Wait until the Redis clock moves on by at least one millisecond."""
    return wait_server_past(raw, server_now_ms(raw))


def deadline_ms(raw: redis.Redis, store: SessionStore, sid: str) -> int:
    """The session's real deadline (its record's ``deadline_ms``)."""
    value = raw.hget(store.keys.session(sid), "deadline_ms")
    assert value is not None, f"session {sid!r} has no record"
    return int(value)


def wait_expired(raw: redis.Redis, store: SessionStore, *sids: str) -> int:
    """Wait until every session in ``sids`` is past its deadline on the server clock."""
    return wait_server_past(raw, max(deadline_ms(raw, store, sid) for sid in sids))


def same(a: Any, b: Any) -> bool:
    """Deep equality that treats NaN == NaN and checks float/int/bool types exactly."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)
