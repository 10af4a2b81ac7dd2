"""Sanity checks for the test harness itself (Redis fixtures, the db table)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis
from support.dbs import DBS, MAX_DBS, OWNERS, db_url


def test_redis_fixture_answers_ping(redis_client: redis.Redis) -> None:
    assert redis_client.ping() is True


def test_redis_is_a_real_server(redis_client: redis.Redis) -> None:
    info = redis_client.info("server")
    # A real redis-server reports its version (fakes/mocks typically do not).
    assert "redis_version" in info
    assert int(str(info["redis_version"]).split(".")[0]) >= 6


def test_every_redis_db_has_one_owner() -> None:
    assert len(set(DBS.values())) == len(DBS) == len(OWNERS)
    assert sorted(DBS.values()) == list(range(len(OWNERS)))
    assert all(0 <= db < MAX_DBS for db in DBS.values())
    assert DBS["shared"] == 0  # redis_client's FLUSHDB db
    with pytest.raises(TypeError):
        DBS["another"] = 1  # type: ignore[index]


def test_db_url_points_at_the_owners_db() -> None:
    assert db_url("redis://127.0.0.1:6379", "worker") == f"redis://127.0.0.1:6379/{DBS['worker']}"
    assert db_url("redis://h:1/9", "cli") == f"redis://h:1/{DBS['cli']}"
    with pytest.raises(KeyError):
        db_url("redis://h:1", "nobody")


# A URL of the shared test server with a db chosen in place: f"{redis_url}/3",
# urlsplit(redis_url)._replace(path="/7"), redis.Redis(..., db=4).
_OWN_DB = re.compile(r"redis_url\}/\d|redis_url\)\._replace\(path|\bdb=\d|_DB = \d")


def test_test_modules_take_their_db_from_the_table() -> None:
    offenders = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted(Path(__file__).parent.glob("test_*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if path.name != Path(__file__).name and _OWN_DB.search(line)
    ]
    assert offenders == [], "use support.dbs.db_url:\n" + "\n".join(offenders)
