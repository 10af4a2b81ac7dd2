"""Session-wide fixtures (registered by ``tests/conftest.py``). Tests normally run under
scripts/with-redis.sh (``make test``), which provides DSPEX_TEST_REDIS_URL; plain
``pytest`` starts its own server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from dspex_tasks.store import SessionStore
from support.dbs import db_url
from support.redis_server import RedisProc, start_redis_server
from support.store import StoreFactory, raw_client

__all__ = ["dedicated_redis", "key_prefix", "make_store", "raw", "redis_client", "redis_url"]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis for the whole session.

    DSPEX_TEST_REDIS_URL if set, otherwise a throwaway redis-server started here.
    """
    url = os.environ.get("DSPEX_TEST_REDIS_URL")
    if url:
        yield url
        return
    try:
        server = start_redis_server()
    except RuntimeError as exc:
        pytest.fail(f"cannot start redis-server for tests: {exc}", pytrace=False)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def dedicated_redis(tmp_path: Path) -> Iterator[RedisProc]:
    """A redis-server of this test's own, for tests that kill, restart or count on it."""
    server = start_redis_server(data_dir=tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on a freshly flushed db 0 (FLUSHDB: never point tests at real data).

    Only the shared db: modules keep their broker and store in databases of their own
    (support.dbs), and a FLUSHALL would pull the queue out from under them.
    """
    client = redis.Redis.from_url(db_url(redis_url, "shared"))
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def key_prefix() -> str:
    """Unique key prefix, so tests can share a server without flushing it."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_store(redis_url: str, key_prefix: str) -> Iterator[StoreFactory]:
    """Build SessionStores on the test server under this test's prefix; closed after."""
    stores: list[SessionStore] = []

    def make(**kwargs: Any) -> SessionStore:
        kwargs.setdefault("default_ttl_s", 60)
        store = SessionStore.from_url(redis_url, prefix=key_prefix, **kwargs)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain decoded client for inspecting what the store wrote."""
    client = raw_client(redis_url)
    yield client
    client.close()
