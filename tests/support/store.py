"""Helpers shared by the SessionStore tests (tests/test_store_*.py).

Stores are built on the real test redis-server with a per-test key prefix, so tests
never see each other's keys and need no FLUSHALL.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import redis

from dspex_tasks.store import SessionStore

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


def sleep_until(t0: float, offset_s: float) -> None:
    """Sleep until ``offset_s`` seconds after the monotonic instant ``t0``."""
    remaining = t0 + offset_s - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)


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
