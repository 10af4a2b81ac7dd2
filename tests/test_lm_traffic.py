"""LM traffic control in one process against a real Redis and the fake OpenAI server:
limits (rpm spacing, concurrency, 429 pause, max_wait, leases), the single-flight cache,
usage and budgets through the Runtime, and no Redis call for a profile without either."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fake_openai import FakeOpenAI

from dspex_tasks.errors import BudgetExceeded, ConfigError, LMRateLimited
from dspex_tasks.keys import Keys
from dspex_tasks.lm.limits import RateLimiter
from dspex_tasks.lm.profiles import LMRegistry
from dspex_tasks.lm.traffic import LMTraffic, RunUsage, counted
from dspex_tasks.runtime import Runtime
from dspex_tasks.settings import LMCacheConfig, LMLimits, LMProfileConfig, Settings
from dspex_tasks.store import SessionStore

KEY = "sk-test-secret-key-123456"


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(delay_s=0.05) as server:
        yield server


#: The LMTraffic objects a test built: flushed before its client closes, so no background
#: thread reconnects a closed client (a socket nobody closes).
TRAFFIC: list[LMTraffic] = []


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    while TRAFFIC:
        TRAFFIC.pop().flush()
    c.close()


def registry(
    client: redis.Redis,
    fake: FakeOpenAI,
    *,
    limits: LMLimits | None = None,
    cache: LMCacheConfig | None = None,
    api_base: str | None = None,
    key: str = KEY,
) -> LMRegistry:
    profile = LMProfileConfig(
        name="p",
        model="openai/fake",
        api_base=api_base or fake.base_url,
        api_key_env="FAKE_KEY",
        params={"temperature": 0.0, "max_tokens": 32},
        limits=limits,
        cache=cache,
    )
    traffic = LMTraffic(client, Keys(f"t{uuid.uuid4().hex[:8]}"))
    TRAFFIC.append(traffic)
    return LMRegistry({"p": profile}, environ={"FAKE_KEY": key}, traffic=traffic)


def ask(lm: Any, text: str, session_id: str | None = "s1") -> tuple[str, RunUsage]:
    used = RunUsage(session_id)
    out = counted(used, lambda: lm(messages=[{"role": "user", "content": text}]))
    return out[0], used


def in_parallel(n: int, fn: Any) -> list[Any]:
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = fn(i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def max_overlap(fake: FakeOpenAI) -> int:
    edges = sorted([(c.arrived, 1) for c in fake.calls] + [(c.replied, -1) for c in fake.calls])
    level = peak = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    return peak


# --- settings --------------------------------------------------------------------------


def test_profile_limits_and_cache_are_parsed_and_checked() -> None:
    raw = (
        '{"p": {"model": "openai/x", "limits": {"rpm": 60, "concurrency": 2, "max_wait_s": 5},'
        ' "cache": {"ttl_s": 60, "scope": "session"}}}'
    )
    profile = Settings.from_env(environ={"DSPEX_LM_PROFILES": raw}).lm_profiles["p"]
    assert profile.limits == LMLimits(rpm=60, concurrency=2, max_wait_s=5.0)
    assert profile.cache == LMCacheConfig(ttl_s=60.0, scope="session")
    for bad in (
        '{"limits": {"rpm": 0}}',
        '{"limits": {"rpm": 1.5}}',
        '{"limits": {"burst": 3}}',
        '{"cache": {"scope": "world"}}',
        '{"cache": {"ttl_s": -1}}',
    ):
        spec = '{"p": {"model": "openai/x", ' + bad[1:] + "}"
        with pytest.raises(ConfigError):
            Settings.from_env(environ={"DSPEX_LM_PROFILES": spec})


# --- limits ----------------------------------------------------------------------------


def test_concurrency_is_never_exceeded(client: redis.Redis, fake: FakeOpenAI) -> None:
    fake.delay_s = 0.15
    lm = registry(client, fake, limits=LMLimits(concurrency=3)).resolve({"profile": "p"}, {})
    in_parallel(12, lambda i: ask(lm, f"q{i}"))
    assert len(fake.calls) == 12
    assert max_overlap(fake) == 3


def test_rpm_spaces_calls_without_a_burst(client: redis.Redis, fake: FakeOpenAI) -> None:
    # 600 rpm: one call every 100 ms, never a minute's quota at once.
    lm = registry(client, fake, limits=LMLimits(rpm=600)).resolve({"profile": "p"}, {})
    started = time.monotonic()
    in_parallel(20, lambda i: ask(lm, f"q{i}"))
    assert time.monotonic() - started >= 1.9  # 20 calls take 19 intervals at least
    arrivals = sorted(c.arrived for c in fake.calls)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert sorted(gaps)[len(gaps) // 2] >= 0.09  # spaced, not bunched
    for i, t in enumerate(arrivals):
        in_window = sum(1 for u in arrivals[i:] if u < t + 1.0)
        # 10 per second, +1 at the window's edge, +1 for a call that reached the fake
        # LM late (its thread was not scheduled at once on a loaded machine).
        assert in_window <= 12


def test_a_call_without_a_turn_within_max_wait_is_rate_limited(
    client: redis.Redis, fake: FakeOpenAI
) -> None:
    lm = registry(client, fake, limits=LMLimits(rpm=60, max_wait_s=0.3)).resolve(
        {"profile": "p"}, {}
    )
    ask(lm, "first")
    with pytest.raises(LMRateLimited) as info:
        ask(lm, "second")
    assert info.value.code == "lm_rate_limited"
    assert 0.5 <= info.value.details["retry_after_s"] <= 1.0
    assert len(fake.calls) == 1


def test_a_429_pauses_the_profile_instead_of_hammering(
    client: redis.Redis, fake: FakeOpenAI
) -> None:
    fake.retry_after_s = 1.0
    lm = registry(client, fake, limits=LMLimits(concurrency=2)).resolve({"profile": "p"}, {})
    fake.storm(0.8)
    answers = in_parallel(8, lambda i: ask(lm, f"q MARK[m{i}]")[0])
    assert all(f"MARK[m{i}]" in a for i, a in enumerate(answers))
    # Only the calls in flight when the storm began got a 429; then nothing went out for
    # the Retry-After, and every call succeeded once it was over.
    assert 1 <= len(fake.rejected) <= 2
    first = min(fake.rejected)
    assert all(c.arrived >= first + 0.95 for c in fake.calls)


def test_a_dead_holders_slot_comes_back_within_its_lease(
    client: redis.Redis, fake: FakeOpenAI
) -> None:
    reg = registry(client, fake, limits=LMLimits(concurrency=1, lease_s=0.6, max_wait_s=5))
    lm = reg.resolve({"profile": "p"}, {})
    limiter: RateLimiter = reg.traffic.limiters["p"]  # type: ignore[union-attr]
    # A holder that dies: its lease is taken and never renewed nor settled.
    status, _ = limiter._reserve(keys=limiter.keys, args=["dead", 0, 0, 1, 600, 1, 0])
    assert status == b"ok"
    started = time.monotonic()
    ask(lm, "after the crash")
    assert 0.4 <= time.monotonic() - started <= 2.0


# --- cache -----------------------------------------------------------------------------


def test_single_flight_many_identical_calls_make_one_lm_call_each(
    client: redis.Redis, fake: FakeOpenAI
) -> None:
    fake.delay_s = 0.3
    lm = registry(client, fake, cache=LMCacheConfig()).resolve({"profile": "p"}, {})
    results = in_parallel(60, lambda i: ask(lm, f"prompt MARK[p{i % 6}]"))
    assert len(fake.calls) == 6
    assert all(f"MARK[p{i % 6}]" in out for i, (out, _) in enumerate(results))
    assert sum(used.cached_calls for _, used in results) == 54
    assert sum(used.calls for _, used in results) == 60


def test_cache_key_holds_the_endpoint_never_the_key(
    client: redis.Redis, fake: FakeOpenAI, redis_url: str
) -> None:
    reg = registry(client, fake, cache=LMCacheConfig())
    ask(reg.resolve({"profile": "p"}, {}), "same MARK[k]")
    for key in client.scan_iter(f"{reg.traffic.keys.prefix}:*"):  # type: ignore[union-attr]
        assert KEY.encode() not in key
        value = client.get(key) if client.type(key) == b"string" else b""
        assert KEY.encode() not in (value or b"")
    # Another key, same endpoint: a hit. Another endpoint: a miss.
    reg2 = LMRegistry(
        {"p": reg.profile_config("p")},  # type: ignore[dict-item]
        environ={"FAKE_KEY": "sk-another-key-000000"},
        traffic=reg.traffic,
    )
    assert ask(reg2.resolve({"profile": "p"}, {}), "same MARK[k]")[1].cached_calls == 1
    with FakeOpenAI() as other:
        profile = reg.profile_config("p")
        assert profile is not None
        moved = LMProfileConfig(
            name="p",
            model=profile.model,
            api_base=other.base_url,
            api_key_env="FAKE_KEY",
            params=profile.params,
            cache=profile.cache,
        )
        reg3 = LMRegistry({"p": moved}, environ={"FAKE_KEY": KEY}, traffic=reg.traffic)
        assert ask(reg3.resolve({"profile": "p"}, {}), "same MARK[k]")[1].cached_calls == 0
        assert len(other.calls) == 1


def test_temperature_above_zero_and_session_scope(
    client: redis.Redis, fake: FakeOpenAI, redis_url: str
) -> None:
    reg = registry(client, fake, cache=LMCacheConfig(scope="session"))
    store = SessionStore.from_url(redis_url, prefix=reg.traffic.keys.prefix)  # type: ignore[union-attr]
    store.create_session("s1")
    store.create_session("s2")
    store.close()
    hot = reg.resolve({"profile": "p", "params": {"temperature": 0.7}}, {})
    ask(hot, "hot MARK[h]")
    assert ask(hot, "hot MARK[h]")[1].cached_calls == 0  # not asked for: no cache
    cold = reg.resolve({"profile": "p"}, {})
    ask(cold, "cold MARK[c]", "s1")
    assert ask(cold, "cold MARK[c]", "s1")[1].cached_calls == 1
    assert ask(cold, "cold MARK[c]", "s2")[1].cached_calls == 0  # another session's entry
    reg_any = registry(client, fake, cache=LMCacheConfig(any_temperature=True))
    hot_any = reg_any.resolve({"profile": "p", "params": {"temperature": 0.7}}, {})
    ask(hot_any, "hot2 MARK[h2]")
    assert ask(hot_any, "hot2 MARK[h2]")[1].cached_calls == 1


def test_session_scoped_entries_go_with_their_session(
    client: redis.Redis, fake: FakeOpenAI, make_store: Any
) -> None:
    from support.store import wait_expired

    store = make_store()
    profile = LMProfileConfig(
        name="p",
        model="openai/fake",
        api_base=fake.base_url,
        api_key_env="FAKE_KEY",
        params={"temperature": 0.0, "max_tokens": 32},
        cache=LMCacheConfig(scope="session"),
    )
    traffic = LMTraffic(client, store.keys)
    TRAFFIC.append(traffic)
    lm = LMRegistry({"p": profile}, environ={"FAKE_KEY": KEY}, traffic=traffic).resolve(
        {"profile": "p"}, {}
    )

    def keys_of(sid: str) -> list[bytes]:
        return sorted(client.scan_iter(match=store.keys.session_pattern(sid)))

    for sid in ("gone", "short"):
        store.create_session(sid, ttl_s=60 if sid == "gone" else 0.5)
        for n in range(3):
            ask(lm, f"scoped MARK[{sid}{n}]", sid)
        assert ask(lm, f"scoped MARK[{sid}0]", sid)[1].cached_calls == 1
        assert store.keys.lm_cache_index(sid).encode() in keys_of(sid)
        assert client.zcard(store.keys.lm_cache_index(sid)) == 3
    # Deleted: every entry goes with the session; expired (the sweep): the same.
    store.delete_session("gone")
    assert keys_of("gone") == []
    wait_expired(store.redis, store, "short")
    assert store.expire_sessions() == 1
    assert keys_of("short") == []
    # A session that does not exist (or no longer) gets no entry.
    ask(lm, "scoped MARK[none]", "never-made")
    assert keys_of("never-made") == []
    assert len(fake.calls) == 7


class CountingRedis(redis.Redis):
    """A client that counts every command and pipeline it sends."""

    sent = 0

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        CountingRedis.sent += 1
        return super().execute_command(*args, **kwargs)

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        CountingRedis.sent += 1
        return super().pipeline(*args, **kwargs)


def test_a_profile_without_limits_or_cache_makes_no_redis_call(
    redis_url: str, fake: FakeOpenAI
) -> None:
    counting = CountingRedis.from_url(redis_url)
    lm = registry(counting, fake).resolve({"profile": "p"}, {})
    CountingRedis.sent = 0
    for i in range(5):
        ask(lm, f"q{i} {uuid.uuid4().hex}")  # fresh prompts: DSPy's own cache misses
    assert len(fake.calls) == 5
    assert CountingRedis.sent == 0
    # ... while a limited profile makes two round trips per call (reserve, settle).
    reg = registry(counting, fake, limits=LMLimits(rpm=6000))
    reg.traffic.stats.interval_s = 3600  # type: ignore[union-attr]  # counters: no flush now
    limited = reg.resolve({"profile": "p"}, {})
    ask(limited, f"warm {uuid.uuid4().hex}")  # loads the scripts
    assert reg.traffic.settler.join()  # type: ignore[union-attr]
    CountingRedis.sent = 0
    ask(limited, f"once {uuid.uuid4().hex}")
    assert reg.traffic.settler.join()  # type: ignore[union-attr]  # settled off the call path
    assert CountingRedis.sent == 2
    while TRAFFIC:
        TRAFFIC.pop().flush()
    counting.close()


# --- usage and budgets through the runtime --------------------------------------------


@pytest.fixture
def runtime(redis_url: str, fake: FakeOpenAI) -> Iterator[Runtime]:
    profiles = json.dumps(
        {
            "default": {
                "model": "openai/fake",
                "api_base": fake.base_url,
                "api_key_env": "FAKE_KEY",
                "params": {"max_tokens": 32},
                "cache": {"ttl_s": 60},
            }
        }
    )
    settings = Settings.from_env(
        environ={"DSPEX_LM_PROFILES": profiles},
        redis_url=redis_url,
        key_prefix=f"t{uuid.uuid4().hex[:8]}",
    )
    rt = Runtime(settings, lms=None)
    rt.lms._environ = {"FAKE_KEY": KEY}
    yield rt
    if rt.lms.traffic is not None:
        rt.lms.traffic.flush()
    rt.store.close()


def test_usage_accumulates_and_a_spent_budget_fails_the_next_run(runtime: Runtime) -> None:
    store = runtime.store
    store.create_session("u1")
    spec = runtime.spec_for("predict", "question -> answer")
    first = runtime.run(None, "u1", spec, {"question": "MARK[u] one"})
    assert first["lm"]["cached"] is False
    again = runtime.run(None, "u1", spec, {"question": "MARK[u] one"})
    assert again["lm"]["cached"] is True
    assert again["outputs"] == first["outputs"]
    assert store.usage("u1") == {
        "prompt_tokens": 50,
        "completion_tokens": 10,
        "calls": 2,
        "cached_calls": 1,
    }
    store.configure_session("u1", max_tokens_total=100)
    runtime.run(None, "u1", spec, {"question": "MARK[u] two"})  # 60 spent < 100: runs
    with pytest.raises(BudgetExceeded) as info:
        runtime.run(None, "u1", spec, {"question": "MARK[u] three"})
    assert info.value.code == "budget_exceeded"
    assert info.value.details["spent_tokens"] == 120
    store.configure_session("u1", max_tokens_total=None)
    runtime.run(None, "u1", spec, {"question": "MARK[u] three"})
    # Deleted with the session: nothing of it is left.
    store.delete_session("u1")
    assert not store.redis.exists(store.keys.session("u1"))


def test_usage_from_the_cli_and_the_client(redis_url: str, make_store: Any) -> None:
    from dspex_tasks.client import Client

    store = make_store()
    store.create_session("cu1")
    store.add_usage("cu1", {"prompt_tokens": 5, "completion_tokens": 3, "calls": 2})
    env = {**os.environ, "DSPEX_REDIS_URL": redis_url, "DSPEX_KEY_PREFIX": store.keys.prefix}
    out = subprocess.run(
        [sys.executable, "-m", "dspex_tasks.cli", "usage", "cu1", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(out.stdout) == {
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "calls": 2,
        "cached_calls": 0,
        "max_tokens_total": None,
    }
    settings = Settings.from_env(environ={}, redis_url=redis_url, key_prefix=store.keys.prefix)
    with Client(settings=settings) as client:
        s = client.session("cu1")
        s.set_budget(8)
        assert s.usage()["completion_tokens"] == 3
    assert store.get_session("cu1").max_tokens_total == 8


# --- doctor -----------------------------------------------------------------------------


def test_doctor_reports_each_profiles_limits_and_current_use(
    client: redis.Redis, fake: FakeOpenAI, redis_url: str
) -> None:
    reg = registry(client, fake, limits=LMLimits(rpm=60, concurrency=2), cache=LMCacheConfig())
    traffic = reg.traffic
    assert traffic is not None and traffic.stats is not None
    lm = reg.resolve({"profile": "p"}, {})
    ask(lm, "doctor MARK[d]")
    ask(lm, "doctor MARK[d]")  # a cache hit
    limiter = traffic.limiters["p"]
    limiter._reserve(keys=limiter.keys, args=["held", 0, 0, 2, 60000, 1, 0])  # one in flight
    limiter.settle(limiter.reserve(1, time.monotonic() + 5), retry_after_s=30)  # a 429 pause
    traffic.stats.flush()
    assert 0 < limiter.state(client)["queue_s"] <= 1  # the next rpm turn, booked ahead
    profiles = json.dumps(
        {
            "p": {
                "model": "openai/fake",
                "limits": {"rpm": 60, "concurrency": 2},
                "cache": {"ttl_s": 600},
            }
        }
    )
    env = {
        **os.environ,
        "DSPEX_REDIS_URL": redis_url,
        "DSPEX_KEY_PREFIX": traffic.keys.prefix,
        "DSPEX_LM_PROFILES": profiles,
    }
    skip = [a for c in ("workers", "lm", "local_model", "beat") for a in ("--skip", c)]
    out = subprocess.run(
        [sys.executable, "-m", "dspex_tasks.cli", "doctor", *skip, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    check = json.loads(out.stdout)["checks"]["lm_traffic"]
    assert check["status"] == "warn"  # paused
    state = check["profiles"]["p"]
    assert state["limits"]["rpm"] == 60 and state["limits"]["concurrency"] == 2
    assert state["cache"] == {"ttl_s": 600.0, "scope": "global"}
    assert state["in_flight"] == 1
    assert 25 < state["paused_s"] <= 30
    counters = state["counters"]
    assert (counters["calls"], counters["cache_hits"], counters["cache_misses"]) == (1, 1, 1)
    assert counters["prompt_tokens"] == 50 and counters["completion_tokens"] == 10
    assert "1/2 in flight" in check["summary"] and "PAUSED" in check["summary"]
