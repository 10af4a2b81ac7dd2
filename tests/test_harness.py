"""Sanity checks for the test harness itself (Redis fixtures)."""

from __future__ import annotations

import redis


def test_redis_fixture_answers_ping(redis_client: redis.Redis) -> None:
    assert redis_client.ping() is True


def test_redis_is_a_real_server(redis_client: redis.Redis) -> None:
    info = redis_client.info("server")
    # A real redis-server reports its version (fakes/mocks typically do not).
    assert "redis_version" in info
    assert int(str(info["redis_version"]).split(".")[0]) >= 6
