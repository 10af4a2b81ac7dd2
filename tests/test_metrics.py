"""The Prometheus exporter, worker outcome counters and the heartbeat liveness check, on a
real redis-server and a real Celery worker (threads pool).

Everything lives in Redis db 6 of the test server (this module's alone: queue names are
fixed, so the module flushes db 6 per test) under a per-test key prefix.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.app import trace
from celery.utils.saferepr import saferepr
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support.dbs import db_url
from support.polling import wait_until
from support.redis_server import free_port
from support.store import wait_expired
from support.worker import close_app, in_process_worker

from dspex_tasks.app import EXPIRE_TASK, LM_QUEUE, MAINTENANCE_QUEUE, PREDICT_TASK, make_celery
from dspex_tasks.errors import SessionNotFound
from dspex_tasks.settings import Settings
from dspex_tasks.store import SessionStore
from workers import fix_event_flush_per_event, fix_result_repr, heartbeat, liveness, outcomes
from workers.exporter import SENT_AT_HEADER, DspexCollector, queue_keys

ROOT = Path(__file__).resolve().parent.parent

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Env:
    """A store, a producer app and a collector on this module's db, under one key prefix."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.settings = Settings(redis_url=url, key_prefix=prefix)
        self.store = SessionStore.from_settings(self.settings)
        self.app = make_celery(self.settings)
        self.broker = redis.Redis.from_url(url)
        self.now = time.time()
        self.collector = DspexCollector(
            self.store,
            self.broker,
            transport_options=self.app.conf.broker_transport_options,
            clock=lambda: self.now,
        )
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)

    def scrape(self) -> Samples:
        """The exporter's text exposition, parsed back into ``{(name, labels): value}``."""
        text = generate_latest(self.registry).decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def close(self) -> None:
        close_app(self.app)
        self.store.close()
        self.broker.close()


@pytest.fixture
def env(redis_url: str, key_prefix: str) -> Iterator[Env]:
    url = db_url(redis_url, "metrics")
    e = Env(url, key_prefix)
    e.broker.flushdb()
    try:
        yield e
    finally:
        e.broker.flushdb()
        e.close()


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def heartbeating_worker(app: Celery) -> Any:
    """An in-process threads worker that sends heartbeats (events on) every 0.5 s."""
    return in_process_worker(
        app, shutdown_timeout=15, without_heartbeat=False, heartbeat_interval=0.5
    )


# --- queues -------------------------------------------------------------------------------


def test_queue_keys_follow_kombu_priority_lists() -> None:
    assert queue_keys("dspex") == ["dspex", "dspex\x06\x163", "dspex\x06\x166", "dspex\x06\x169"]
    assert queue_keys("q", {"global_keyprefix": "p:", "priority_steps": [0, 5]}) == [
        "p:q",
        "p:q\x06\x165",
    ]


def test_queue_depth_and_oldest_age_with_sent_at_header(env: Env) -> None:
    sent = time.time()
    # Nothing consumes: the messages stay in Redis lists exactly as kombu wrote them.
    env.app.send_task(PREDICT_TASK, args=["s1", "q -> a", {}], headers={SENT_AT_HEADER: sent})
    env.app.send_task(PREDICT_TASK, args=["s1", "q -> a", {}], headers={SENT_AT_HEADER: sent + 1})
    env.app.send_task(
        PREDICT_TASK, args=["s1", "q -> a", {}], priority=5, headers={SENT_AT_HEADER: sent + 2}
    )
    env.app.send_task(EXPIRE_TASK, headers={SENT_AT_HEADER: sent + 3})
    assert env.broker.llen("dspex") == 2
    assert env.broker.llen("dspex\x06\x163") == 1  # priority 5 -> step 3
    assert env.broker.llen(MAINTENANCE_QUEUE) == 1

    env.now = sent + 10
    samples = env.scrape()
    assert value(samples, "dspex_queue_length", queue=LM_QUEUE) == 3
    assert value(samples, "dspex_queue_length", queue=MAINTENANCE_QUEUE) == 1
    # The oldest waiting message of each queue, wherever its priority list.
    assert value(samples, "dspex_queue_oldest_age_seconds", queue=LM_QUEUE) == pytest.approx(10)
    assert value(
        samples, "dspex_queue_oldest_age_seconds", queue=MAINTENANCE_QUEUE
    ) == pytest.approx(7)
    assert value(samples, "dspex_broker_unacked_messages") == 0
    assert value(samples, "dspex_exporter_redis_up", role="broker") == 1

    # Consume the oldest the way a worker does (right end): the age moves to the next one.
    env.broker.rpop("dspex")
    assert value(env.scrape(), "dspex_queue_oldest_age_seconds", queue=LM_QUEUE) == pytest.approx(9)


@pytest.fixture
def no_sent_at_header() -> Iterator[None]:
    """Publish like a foreign producer whose messages carry no send-time header."""
    from celery.signals import before_task_publish

    from dspex_tasks import app as app_module

    before_task_publish.disconnect(app_module._stamp_sent_at, dispatch_uid="dspex-sent-at")
    try:
        yield
    finally:
        before_task_publish.connect(
            app_module._stamp_sent_at, weak=False, dispatch_uid="dspex-sent-at"
        )


@pytest.mark.usefixtures("no_sent_at_header")
def test_oldest_age_without_header_counts_from_first_sighting(env: Env) -> None:
    env.app.send_task(PREDICT_TASK, args=["s1", "q -> a", {}])
    env.app.send_task(PREDICT_TASK, args=["s1", "q -> a", {}])
    t0 = env.now
    assert value(env.scrape(), "dspex_queue_oldest_age_seconds", queue=LM_QUEUE) == 0
    env.now = t0 + 4
    samples = env.scrape()
    assert value(samples, "dspex_queue_oldest_age_seconds", queue=LM_QUEUE) == pytest.approx(4)
    assert value(samples, "dspex_queue_length", queue=LM_QUEUE) == 2
    # A new message at the right end starts its own clock.
    env.broker.rpop("dspex")
    env.now = t0 + 5
    assert value(env.scrape(), "dspex_queue_oldest_age_seconds", queue=LM_QUEUE) == 0
    env.broker.delete("dspex")
    assert value(env.scrape(), "dspex_queue_oldest_age_seconds", queue=LM_QUEUE) == 0


def test_empty_queues_report_zero(env: Env) -> None:
    samples = env.scrape()
    for queue in (LM_QUEUE, MAINTENANCE_QUEUE):
        assert value(samples, "dspex_queue_length", queue=queue) == 0
        assert value(samples, "dspex_queue_oldest_age_seconds", queue=queue) == 0


# --- store --------------------------------------------------------------------------------


def test_sessions_variables_programs_and_expiry(env: Env) -> None:
    store = env.store
    store.create_session("a")
    store.create_session("b")
    store.register_variable("a", "temperature", "float", 0.7)
    store.register_variable("a", "style", "string", "terse")
    store.register_variable("b", "n", "integer", 3)
    store.store_program("a", "qa", {"module": "predict", "signature": "question -> answer"})
    store.create_session("short", ttl_s=0.2)
    store.register_variable("short", "x", "integer", 1)
    wait_expired(store.redis, store, "short")
    assert store.expire_sessions() == 1

    samples = env.scrape()
    assert value(samples, "dspex_sessions") == 2
    assert value(samples, "dspex_variables") == 3
    assert value(samples, "dspex_programs") == 1
    assert value(samples, "dspex_global_programs") == 0
    assert value(samples, "dspex_sessions_created_total") == 3
    assert value(samples, "dspex_sessions_expired_total") == 1
    assert value(samples, "dspex_sessions_deleted_total") == 0
    assert value(samples, "dspex_expiry_sweeps_total") == 1
    assert value(samples, "dspex_expiry_last_sweep_timestamp_seconds") == pytest.approx(
        time.time(), abs=30
    )
    assert value(samples, "dspex_exporter_redis_up", role="store") == 1
    store.delete_session("b")
    samples = env.scrape()
    assert value(samples, "dspex_sessions") == 1
    assert value(samples, "dspex_sessions_deleted_total") == 1


def test_unreachable_redis_is_reported_not_raised(env: Env) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = Settings(redis_url=dead, key_prefix="x", socket_timeout_s=0.5)
    collector = DspexCollector.from_settings(settings)
    registry = CollectorRegistry()
    registry.register(collector)
    try:
        text = generate_latest(registry).decode()
    finally:
        collector.close()
    assert 'dspex_exporter_redis_up{role="broker"} 0.0' in text
    assert 'dspex_exporter_redis_up{role="store"} 0.0' in text
    assert "dspex_sessions " not in text


# --- LM profiles ------------------------------------------------------------------------


def test_lm_profile_counters_calls_tokens_429s_waits_cache_hits(env: Env) -> None:
    from fake_openai import FakeOpenAI

    from dspex_tasks.lm.profiles import LMRegistry
    from dspex_tasks.lm.traffic import LMTraffic
    from dspex_tasks.settings import LMCacheConfig, LMLimits, LMProfileConfig

    traffic = LMTraffic(env.store.redis, env.store.keys)
    assert traffic.stats is not None
    with FakeOpenAI(retry_after_s=0.3) as fake:
        profile = LMProfileConfig(
            name="lim",
            model="openai/fake",
            api_base=fake.base_url,
            api_key_env="FAKE_KEY",
            params={"temperature": 0.0, "max_tokens": 16},
            limits=LMLimits(concurrency=2),
            cache=LMCacheConfig(),
        )
        registry = LMRegistry({"lim": profile}, environ={"FAKE_KEY": "k"}, traffic=traffic)
        lm = registry.resolve({"profile": "lim"}, {})
        lm(messages=[{"role": "user", "content": "one"}])
        lm(messages=[{"role": "user", "content": "one"}])  # a cache hit
        fake.storm(0.2)
        lm(messages=[{"role": "user", "content": "two"}])  # a 429, a wait, then answered
    traffic.flush()  # the settles and counters, before the store's client closes
    # A profile no worker has counted yet is reported (at 0) when the exporter knows it.
    env.collector.lm_profiles = ("idle",)
    samples = env.scrape()
    assert value(samples, "dspex_lm_calls_total", profile="lim") == 2
    assert value(samples, "dspex_lm_tokens_total", profile="lim", kind="prompt") == 100
    assert value(samples, "dspex_lm_tokens_total", profile="lim", kind="completion") == 20
    assert value(samples, "dspex_lm_rate_limited_total", profile="lim") == 1
    assert value(samples, "dspex_lm_waits_total", profile="lim") >= 1
    assert value(samples, "dspex_lm_wait_seconds_total", profile="lim") >= 0.2
    assert value(samples, "dspex_lm_cache_hits_total", profile="lim") == 1
    assert value(samples, "dspex_lm_cache_misses_total", profile="lim") == 2
    assert value(samples, "dspex_lm_deferred_total", profile="lim") == 0
    assert value(samples, "dspex_lm_calls_total", profile="idle") == 0


# --- worker: outcomes, heartbeat, ping ----------------------------------------------------


def _register_test_tasks(app: Celery) -> None:
    @app.task(name="t.ok")
    def ok() -> str:
        return "ok"

    @app.task(name="t.fail")
    def fail() -> None:
        raise ValueError("boom")

    @app.task(name="t.retry", bind=True, max_retries=1)
    def retry_once(self: Any) -> str:
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        return "second time"


def test_worker_counts_outcomes_and_touches_heartbeat(env: Env, tmp_path: Path) -> None:
    app = make_celery(env.settings)
    _register_test_tasks(app)
    beat_file = tmp_path / "heartbeat"
    beat_file.write_text("stale file of an earlier process")
    uninstall_beat = heartbeat.install(app, beat_file)
    assert not beat_file.exists()  # only this process's heartbeats count
    uninstall_outcomes = outcomes.install(app, env.store)
    try:
        with heartbeating_worker(app) as worker:
            wait_until(beat_file.exists, what="first heartbeat")
            first = beat_file.stat().st_mtime
            wait_until(lambda: beat_file.stat().st_mtime > first, what="a second heartbeat")
            assert liveness.check_heartbeat(beat_file, max_age_s=5)[0]
            assert liveness.ping_worker(app, worker.hostname, timeout_s=5)[0]
            assert not liveness.ping_worker(app, "celery@no-such-node", timeout_s=0.5)[0]
            # The Docker HEALTHCHECK command, as a process reading DSPEX_* like the image.
            ping = subprocess.run(
                [sys.executable, "-m", "workers.liveness", "--ping", "--node", worker.hostname],
                cwd=ROOT,
                env={**os.environ, "DSPEX_REDIS_URL": env.url},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert ping.returncode == 0, ping.stderr

            # A consumer loop that stops turning stops the heartbeats: block the worker's
            # event loop (its timer runs in it) for 2.5 s and watch the file go stale.
            worker.timer.call_after(0.01, lambda: time.sleep(2.5))
            wait_until(
                lambda: not liveness.check_heartbeat(beat_file, max_age_s=1.5)[0],
                what="a stale heartbeat while the loop is blocked",
            )
            wait_until(
                lambda: liveness.check_heartbeat(beat_file, max_age_s=1.5)[0],
                what="heartbeats to resume",
            )

            results = [env.app.send_task("t.ok") for _ in range(2)]
            results.append(env.app.send_task("t.fail"))
            results.append(env.app.send_task("t.retry"))
            for r in results:
                r.get(timeout=20, propagate=False)

            expected = {
                ("t.ok", "success"): 2,
                ("t.fail", "failure"): 1,
                ("t.retry", "retry"): 1,
                ("t.retry", "success"): 1,
            }

            def counted() -> Samples | None:
                samples = env.scrape()
                got = {
                    (dict(labels)["task"], dict(labels)["state"]): v
                    for (name, labels), v in samples.items()
                    if name == "dspex_task_outcomes_total"
                }
                return samples if got == expected else None

            samples = wait_until(counted, what=f"outcome counts {expected}")
            # A ValueError is no DspexError: its failure is counted under "unknown".
            codes = {
                tuple(sorted(dict(labels).items())): v
                for (name, labels), v in samples.items()
                if name == "dspex_task_failures_total"
            }
            assert codes == {(("code", "unknown"), ("task", "t.fail")): 1.0}
        # The worker stopped: no more heartbeats, so the file goes stale.
        stopped = beat_file.stat().st_mtime
        time.sleep(1.2)
        assert beat_file.stat().st_mtime == stopped
        healthy, reason = liveness.check_heartbeat(beat_file, max_age_s=1)
        assert not healthy and "stalled" in reason
    finally:
        uninstall_beat()
        uninstall_outcomes()
        close_app(app)


NESTED = {"outputs": {"answer": "ok"}, "lm": {"usage": {"m": {"calls": 1}}}, "n": [1.5, None]}


def test_batched_task_events_reach_monitors(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker entry point's consumer sends task events in batches: a monitor (Flower,
    ``celery events``) still gets every task's received, started and succeeded events,
    each once and in order, within the flush interval. Its succeeded events show the
    result as ``repr`` writes it (``fix_result_repr``), nesting included."""
    app = make_celery(env.settings)
    app.conf.worker_consumer = fix_event_flush_per_event.CONSUMER
    monkeypatch.setattr(trace, "saferepr", trace.saferepr)  # restored after the test
    fix_result_repr.install()

    @app.task(name="t.events", shared=False)
    def events() -> dict[str, Any]:
        return NESTED

    seen: dict[str, list[str]] = {}
    shown: list[str] = []
    heartbeats: list[float] = []

    def on_event(event: dict[str, Any]) -> None:
        if event["type"] == "worker-heartbeat":
            heartbeats.append(time.monotonic())
        elif event["type"].startswith("task-") and event["type"] != "task-sent":  # producer's
            seen.setdefault(event["uuid"], []).append(event["type"])
            if event["type"] == "task-succeeded":
                shown.append(event["result"])

    connection = app.connection_for_read()
    receiver = app.events.Receiver(connection, handlers={"*": on_event})
    monitor = threading.Thread(
        target=receiver.capture, kwargs={"limit": None, "timeout": None}, daemon=True
    )
    monitor.start()
    try:
        with heartbeating_worker(app) as worker:
            assert type(worker.consumer) is fix_event_flush_per_event.BatchingConsumer
            wait_until(lambda: heartbeats, what="the monitor to receive events")
            results = [env.app.send_task("t.events") for _ in range(10)]
            for r in results:
                assert r.get(timeout=20) == NESTED
            expected = {r.id: ["task-received", "task-started", "task-succeeded"] for r in results}
            wait_until(
                lambda: {i: seen.get(i) for i in expected} == expected,
                timeout_s=5,
                what="every task's events",
            )
            assert shown == [repr(NESTED)] * 10  # Celery's saferepr: {'m': {...}}
    finally:
        receiver.should_stop = True
        monitor.join(timeout=10)
        connection.release()
        close_app(app)


def test_outcomes_ignore_other_apps(env: Env) -> None:
    """Signals are process-wide; a second app's tasks are not counted under this one."""
    counted_app = make_celery(env.settings)
    other_app = make_celery(env.settings)

    @other_app.task(name="t.other")
    def other() -> str:
        return "ok"

    uninstall = outcomes.install(counted_app, env.store)
    try:
        assert other.apply().get() == "ok"  # runs the task and its signals in-process
        assert env.store.task_outcomes() == {}
    finally:
        uninstall()
        close_app(counted_app)
        close_app(other_app)


def test_failures_are_counted_by_code_in_batches(env: Env) -> None:
    """Each failure counts its DspexError code (else ``unknown``); nothing is written per
    task: the pending counts go out in one round trip (here: when uninstalled)."""
    app = make_celery(env.settings)

    @app.task(name="t.coded")
    def coded() -> None:
        raise SessionNotFound("session 'x' not found", {"session_id": "x"})

    @app.task(name="t.bug")
    def bug() -> None:
        raise ValueError("boom")

    writes: list[tuple[dict[Any, int], dict[Any, int]]] = []
    real_add = env.store.add_task_outcomes

    def spy(counts: Any, failure_codes: Any = None) -> None:
        writes.append((dict(counts), dict(failure_codes or {})))
        real_add(counts, failure_codes)

    env.store.add_task_outcomes = spy  # type: ignore[method-assign]
    uninstall = outcomes.install(app, env.store, interval_s=3600)
    try:
        for task in (coded, coded, bug):
            task.apply()  # runs the task and its signals in-process
        assert writes == []
    finally:
        uninstall()
        app.close()
    assert writes == [
        (
            {("t.coded", "failure"): 2, ("t.bug", "failure"): 1},
            {("t.coded", "session_not_found"): 2, ("t.bug", "unknown"): 1},
        )
    ]
    samples = env.scrape()
    failures = "dspex_task_failures_total"
    assert value(samples, failures, task="t.coded", code="session_not_found") == 2
    assert value(samples, failures, task="t.bug", code="unknown") == 1
    assert value(samples, "dspex_task_outcomes_total", task="t.coded", state="failure") == 2


def test_liveness_command_exit_codes(tmp_path: Path) -> None:
    beat_file = tmp_path / "hb"

    def probe(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "workers.liveness", "--path", str(beat_file), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )

    missing = probe()
    assert missing.returncode == 1 and "no heartbeat file" in missing.stderr
    beat_file.touch()
    fresh = probe("--max-age-s", "30")
    assert fresh.returncode == 0, fresh.stderr
    old = time.time() - 120
    os.utime(beat_file, (old, old))
    stale = probe("--max-age-s", "60")
    assert stale.returncode == 1 and "stalled" in stale.stderr


# --- the HTTP exporter, as deployed --------------------------------------------------------


def test_exporter_process_serves_metrics(env: Env) -> None:
    env.store.create_session("served")
    env.app.send_task(PREDICT_TASK, args=["served", "q -> a", {}])
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.exporter", "--port", str(port)],
        cwd=ROOT,
        env={
            **os.environ,
            "DSPEX_REDIS_URL": env.url,
            "DSPEX_KEY_PREFIX": env.settings.key_prefix,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def fetch() -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    return str(r.read().decode())
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                return None

        text = wait_until(fetch, timeout_s=30, what="the exporter's /metrics")
        assert "dspex_sessions 1.0" in text
        assert 'dspex_queue_length{queue="dspex"} 1.0' in text
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0  # SIGTERM: clean shutdown
        log = proc.stderr.read().decode() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    # It says where it listens.
    assert f"dspex exporter listening on http://127.0.0.1:{port}/metrics" in log, log


class _Shown:
    def __repr__(self) -> str:
        return "shown"


@pytest.mark.parametrize(
    "value",
    [
        {"a": "x" * 2000},  # longer than the limit: cut by saferepr
        {"a": _Shown()},  # not JSON: its own repr, through saferepr
        [{"when": datetime.datetime(2026, 1, 1)}],  # not JSON either
        "plain text",  # not a container: saferepr's quoting and cut
        {"a": {"b": {"c": {"d": 1}}}},  # JSON: repr, all levels shown
    ],
)
def test_result_repr_is_saferepr_but_for_small_json(value: Any) -> None:
    text = fix_result_repr.result_repr(value, 1024)
    if value == {"a": {"b": {"c": {"d": 1}}}}:
        assert text == repr(value) != saferepr(value, 1024)
    else:
        assert text == saferepr(value, 1024)
