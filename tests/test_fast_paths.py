"""The worker's fast paths keep behaviour: the memoized DSPy price lookup, the spec cache,
and the one-round-trip result store (on a real Redis)."""

from __future__ import annotations

import copy
import datetime
import json
import time
from collections.abc import Iterator

import pytest
import redis
from celery import states

from dspex_tasks.app import make_celery
from dspex_tasks.client import close_app
from dspex_tasks.errors import InvalidProgram
from dspex_tasks.lm import LMRegistry, memoize_model_metadata, snapshot_proxy_environment
from dspex_tasks.programs import DigestedSpec, ModuleCache
from dspex_tasks.resultbackend import OneTripRedisBackend
from dspex_tasks.runtime import Runtime
from dspex_tasks.settings import Settings
from dspex_tasks.specs import normalize_spec


def test_model_metadata_memo_answers_like_the_original() -> None:
    from dspy.clients import costs, model_metadata

    assert memoize_model_metadata()
    assert memoize_model_metadata()  # idempotent
    for provider, model in [("openai", "gpt-4o-mini"), ("openai", "no-such-model-xyz")]:
        expected = model_metadata.model_info(provider, model)
        first = costs.model_info(provider, model)
        assert first == expected
        first["mutated"] = True  # callers get copies: the memo is not shared state
        assert costs.model_info(provider, model) == expected


def test_proxy_settings_are_read_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import urllib.request

    from dspy._vendor.lm15.transports import _proxy
    from dspy._vendor.lm15.transports._url import parse_url

    expected = urllib.request.getproxies()
    assert snapshot_proxy_environment()
    assert snapshot_proxy_environment()  # idempotent
    assert _proxy.getproxies() == expected
    target = parse_url("http://127.0.0.1:9/v1/chat/completions")
    route = _proxy.proxy_route_for(target, proxy=None, trust_env=True)

    class Counting(dict[str, str]):
        """The process environment, counting the times it is read through."""

        reads = 0

        def items(self):  # type: ignore[no-untyped-def,override]
            Counting.reads += 1
            return super().items()

    monkeypatch.setattr(os, "environ", Counting(os.environ))
    for _ in range(100):
        assert _proxy.proxy_route_for(target, proxy=None, trust_env=True) == route
    assert Counting.reads == 0
    _proxy.getproxies()["http"] = "http://elsewhere:1"  # callers get copies
    assert _proxy.getproxies() == expected


@pytest.fixture
def runtime(redis_url: str, key_prefix: str) -> Iterator[Runtime]:
    settings = Settings.from_env(environ={}, redis_url=redis_url, key_prefix=key_prefix)
    rt = Runtime(settings, lms=LMRegistry({}))
    yield rt
    rt.store.close()


def test_spec_cache_reuses_normalized_specs(runtime: Runtime) -> None:
    spec = runtime.spec_for("predict", "question -> answer: int")
    assert isinstance(spec, DigestedSpec)
    assert spec == normalize_spec({"module": "predict", "signature": "question -> answer: int"})
    assert spec.digest == ModuleCache.digest(dict(spec))
    assert runtime.spec_for("predict", "question -> answer: int") is spec
    other = runtime.spec_for("chain_of_thought", "question -> answer: int")
    assert other is not spec and other["module"] == "chain_of_thought"
    structured = {"inputs": ["q"], "outputs": ["a"]}
    assert runtime.spec_for("predict", structured)["signature"]["inputs"][0]["name"] == "q"
    for _ in range(2):  # a bad signature is refused every time, never cached
        with pytest.raises(InvalidProgram):
            runtime.spec_for("predict", "no arrow here")


def test_module_cache_uses_the_carried_digest() -> None:
    spec = DigestedSpec(normalize_spec({"module": "predict", "signature": "a -> b"}))
    cache = ModuleCache()
    built: list[object] = []

    def build(s: object) -> object:
        built.append(s)
        return object()

    first = cache.get(spec, build)
    assert cache.get(dict(spec), build) is first  # same digest either way
    assert len(built) == 1


@pytest.fixture
def backend(redis_url: str, key_prefix: str) -> Iterator[OneTripRedisBackend]:
    settings = Settings.from_env(environ={}, redis_url=redis_url, key_prefix=key_prefix)
    app = make_celery(settings)
    assert isinstance(app.backend, OneTripRedisBackend)
    yield app.backend
    close_app(app)


def test_one_trip_store_publishes_expires_and_never_overwrites_success(
    backend: OneTripRedisBackend, redis_url: str
) -> None:
    raw = redis.Redis.from_url(redis_url)
    task_id = f"t-{time.monotonic_ns()}"
    key = backend.get_key_for_task(task_id)
    pubsub = raw.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(key)
    try:
        backend.store_result(task_id, {"pid": 1}, states.STARTED)
        backend.store_result(task_id, {"answer": 42}, states.SUCCESS)
        backend.store_result(task_id, None, states.STARTED)  # a late duplicate
        stored = json.loads(raw.get(key))
        assert stored["status"] == states.SUCCESS and stored["result"] == {"answer": 42}
        assert 0 < raw.ttl(key) <= backend.expires
        assert backend.get_task_meta(task_id)["result"] == {"answer": 42}
        seen = []
        deadline = time.monotonic() + 5
        while len(seen) < 2 and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.5)
            if message:
                seen.append(json.loads(message["data"])["status"])
        assert seen == [states.STARTED, states.SUCCESS]  # the duplicate published nothing
    finally:
        pubsub.close()
        raw.delete(key)
        raw.close()


def test_one_trip_store_falls_back_for_other_serializers(backend: OneTripRedisBackend) -> None:
    other = copy.copy(backend)
    other.serializer = "pickle"
    assert not other._one_trip()
    assert backend._one_trip()


def test_one_trip_store_keeps_what_kombu_would_tag(backend: OneTripRedisBackend) -> None:
    """Records of JSON types are encoded by orjson; a result with other types takes
    kombu's encoder, whose tags bring them back as they were."""
    plain = {"answer": "é", "n": [1, 2.5, None, True]}
    tagged = {"when": datetime.datetime(2026, 12, 2, 21, 0, tzinfo=datetime.UTC)}
    for result in (plain, tagged):
        task_id = f"r-{time.monotonic_ns()}"
        backend.store_result(task_id, result, states.SUCCESS)
        assert backend.get_task_meta(task_id)["result"] == result
    assert isinstance(backend.state_record("x", plain, states.SUCCESS, None).value, bytes)
    assert isinstance(backend.state_record("x", tagged, states.SUCCESS, None).value, str)
