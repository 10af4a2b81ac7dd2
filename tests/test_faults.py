"""Fault tests with real processes: killed and stopped workers, a task that outlives the
visibility timeout, Redis restarts under load, two beats, and contended compare-and-set.

Workers are ``celery -A fault_worker worker`` subprocesses (threads pool) whose default
LM profile is ``test/slow`` (``slow_lm.py``): a question carrying ``SLEEP[N]`` makes the
LM call take N seconds, and every call is logged with its marker and pid, so tests see
which process runs a task, kill it mid-call, and count LM calls across processes.
Each test owns a dedicated redis-server, so broker keys (``unacked``...) never mix.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import itertools
import json
import random
import signal
import statistics
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from slow_lm import MODEL, calls, parse_log
from support.polling import wait_until
from support.procs import Proc, base_env, flower_proc, start_beat, start_worker, stopping
from support.redis_server import RedisProc, free_port, start_redis_server
from support.reliability import Recorder

from dspex_tasks.app import LM_QUEUE, PREDICT_TASK
from dspex_tasks.client import Client
from dspex_tasks.errors import StoreUnavailable, VersionConflict
from dspex_tasks.settings import Settings
from dspex_tasks.store import SessionStore

pytestmark = pytest.mark.fault


SLOW_PROFILES = json.dumps({"default": {"model": MODEL}})
SIGNATURE = "question -> answer, count: int"
STORE_BOTH = {"store_outputs": ["answer", "count"]}


def fault_env(url: str, lm_log: Path, **extra: str) -> dict[str, str]:
    env = base_env(
        url,
        f"f{uuid.uuid4().hex[:6]}",
        DSPEX_LM_PROFILES=SLOW_PROFILES,
        DSPEX_TEST_LM_LOG=str(lm_log),
        DSPEX_TASK_TIME_LIMIT_S="10",
        DSPEX_VISIBILITY_TIMEOUT_S="3",
        DSPEX_SOCKET_TIMEOUT_S="1",
    )
    env.update(extra)
    return env


def question(marker: str, sleep: float) -> dict[str, str]:
    return {"question": f"Count the letters. MARK[{marker}] SLEEP[{sleep}]"}


def writing_session(store: SessionStore) -> str:
    sid = f"fs-{uuid.uuid4().hex[:10]}"
    store.create_session(sid)
    store.register_variable(sid, "answer", "string", "")
    store.register_variable(sid, "count", "integer", 0)
    return sid


def worker_logs(workers: list[Proc]) -> str:
    return "\n".join(f"--- {w.name}\n{w.log()[-3000:]}" for w in workers)


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):.1f} s, max {max(values):.1f} s"


# --- SIGKILL ------------------------------------------------------------------------------


def test_sigkill_mid_task_ten_times(
    dedicated_redis: RedisProc, tmp_path: Path, reliability: Recorder
) -> None:
    lm_log = tmp_path / "lm.log"
    env = fault_env(dedicated_redis.url, lm_log)
    client = Client(settings=Settings.from_env(env))
    sid = writing_session(client.store)
    rounds = 10
    with stopping(*(start_worker(env, tmp_path) for _ in range(2))) as workers:
        for w in workers:
            w.wait_log(" ready.", 30)
        handles: dict[str, Any] = {}
        killed_at: dict[str, float] = {}
        for n in range(rounds):
            marker = f"k{n}"
            handles[marker] = client.app.send_task(
                PREDICT_TASK, args=[sid, SIGNATURE, question(marker, 1.5), STORE_BOTH]
            )
            pid = wait_until(
                lambda m=marker: calls(lm_log, m),
                30,
                what=f"task {marker} to start",
                diagnose=lambda: worker_logs(workers),
            )[0]
            victim = next(w for w in workers if w.pid == pid)
            time.sleep(random.uniform(0.1, 0.8))  # somewhere inside the 1.5 s LM call
            victim.kill()
            killed_at[marker] = time.monotonic()
            workers.remove(victim)
            workers.append(start_worker(env, tmp_path))  # the replacement

        done_at: dict[str, float] = {}
        results: dict[str, Any] = {}

        def all_done() -> bool:
            for m, h in handles.items():
                if m not in done_at and h.ready():
                    done_at[m] = time.monotonic()
                    results[m] = h.get(timeout=5)
            return len(done_at) == rounds

        wait_until(
            all_done, 90, interval=0.1, what="every task", diagnose=lambda: worker_logs(workers)
        )
        # Nothing is left in flight: a killed worker's other unacknowledged messages come
        # back after the visibility timeout, are answered from the done record, and acked.
        r = client.store.redis
        wait_until(
            lambda: r.llen("dspex") == 0 and r.zcard("unacked_index") == 0,
            30,
            what="no queued or unacknowledged message",
            diagnose=lambda: worker_logs(workers),
        )

    for marker, result in results.items():
        assert result["session_id"] == sid
        assert f"MARK[{marker}]" in result["outputs"]["answer"]
    # Every task ran at least twice (killed, then completed), and wrote exactly once.
    log = parse_log(lm_log)
    for marker in handles:
        assert len(calls(lm_log, marker)) >= 2, log
    answer = client.store.get_variable(sid, "answer")
    counter = client.store.get_variable(sid, "count")
    assert answer.version == 1 + rounds, answer
    assert counter.version == 1 + rounds, counter
    # Stopping the workers left nothing in flight either.
    assert r.llen("dspex") == 0
    assert r.zcard("unacked_index") == 0
    recovery = [done_at[m] - killed_at[m] for m in handles]
    client.close()
    reliability.record(
        "kill",
        cases=rounds,
        passed=rounds,
        lost="0 tasks; 0 writes missing or doubled (versions checked)",
        figures=f"recovery (kill to result) {summary(recovery)}",
    )


# --- visibility timeout -----------------------------------------------------------------


def test_task_longer_than_visibility_timeout_runs_once(
    dedicated_redis: RedisProc, tmp_path: Path, reliability: Recorder
) -> None:
    lm_log = tmp_path / "lm.log"
    env = fault_env(dedicated_redis.url, lm_log, DSPEX_VISIBILITY_TIMEOUT_S="2")
    client = Client(settings=Settings.from_env(env))
    sid = writing_session(client.store)
    with stopping(*(start_worker(env, tmp_path) for _ in range(2))) as workers:
        for w in workers:
            w.wait_log(" ready.", 30)
        started = time.monotonic()
        writing = client.app.send_task(
            PREDICT_TASK, args=[sid, SIGNATURE, question("vw", 5), STORE_BOTH]
        )
        plain = client.app.send_task(
            PREDICT_TASK, args=[sid, "question -> answer", question("vp", 5)]
        )
        first = writing.get(timeout=30)
        second = plain.get(timeout=30)
        elapsed = time.monotonic() - started
        # Let any further redelivery of either message come and go.
        r = client.store.redis
        wait_until(lambda: r.zcard("unacked_index") == 0 and r.llen("dspex") == 0, 15)
        time.sleep(2.5)
        # Whole logs: worker_logs keeps only each log's tail, for failure messages.
        logs = "\n".join(w.log() for w in workers)

    assert "MARK[vw]" in first["outputs"]["answer"]
    assert "MARK[vp]" in second["outputs"]["answer"]
    # The broker did hand each message out again while it ran ...
    for handle in (writing, plain):
        assert logs.count(f"dspex.predict[{handle.id}] received") >= 2, logs
    assert "is running elsewhere; waiting for it" in logs
    # ... and the LM was called exactly once per task, the variables written once.
    assert len(calls(lm_log, "vw")) == 1, parse_log(lm_log)
    assert len(calls(lm_log, "vp")) == 1, parse_log(lm_log)
    assert client.store.get_variable(sid, "answer").version == 2
    assert client.store.get_variable(sid, "count").version == 2
    client.close()
    reliability.record(
        "visibility",
        cases=2,
        passed=2,
        lost="0 tasks; 0 extra LM calls or writes (counted)",
        figures=f"2 tasks of 5 s, visibility 2 s: 1 LM call each; done in {elapsed:.1f} s",
    )


# --- Redis restarts -----------------------------------------------------------------------


class Load:
    """Producer threads: variable writes (acknowledged ones tracked) and task submits."""

    def __init__(self, client: Client, sid: str, prefix: str) -> None:
        self.client = client
        self.sid = sid
        self.prefix = prefix
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked = 0  # highest value whose write was acknowledged
        self.attempted = 0  # highest value ever sent
        self.write_errors = 0
        self.handles: list[Any] = []
        self.submit_errors = 0
        self.threads = [
            threading.Thread(target=self._writes, daemon=True),
            threading.Thread(target=self._submits, daemon=True),
        ]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def _writes(self) -> None:
        value = self.acked
        while not self.stop.is_set():
            value += 1
            self.attempted = value
            try:
                self.client.store.update_variable(self.sid, "writes", value)
            except StoreUnavailable:
                self.write_errors += 1
                value -= 1  # not acknowledged: send the same value again
                time.sleep(0.05)
                continue
            self.acked = value
            time.sleep(0.005)

    def _submits(self) -> None:
        n = 0
        while not self.stop.is_set():
            marker = f"{self.prefix}{n}"
            try:
                handle = self.client.submit(
                    "predict", self.sid, SIGNATURE, question(marker, 0.3), STORE_BOTH
                )
            except Exception:  # StoreUnavailable, or kombu's OperationalError on publish
                self.submit_errors += 1
                time.sleep(0.1)
                continue
            with self.lock:
                self.handles.append((marker, handle))
            n += 1
            time.sleep(0.1)


def restart(port: int, args: tuple[str, ...], data: Path) -> RedisProc:
    """Start Redis again on ``port`` and check that it is ours (the port may be taken)."""
    srv = start_redis_server(port=port, extra_args=args, data_dir=data)
    pid = redis.Redis(port=port).info("server")["process_id"]
    assert pid == srv.pid, f"port {port} was taken by another process ({pid})"
    return srv


def test_redis_restart_under_load(tmp_path: Path, reliability: Recorder) -> None:
    data = tmp_path / "redis"
    aof = ("--appendonly", "yes", "--appendfsync", "always")
    srv = start_redis_server(extra_args=aof, data_dir=data)
    port = srv.port
    lm_log = tmp_path / "lm.log"
    # Beat runs the sweep every second; it also resends ledger tasks unfinished after 10 s.
    env = fault_env(srv.url, lm_log, DSPEX_EXPIRY_INTERVAL_S="1", DSPEX_RESEND_AFTER_S="10")
    settings = Settings.from_env(env)
    client = Client(settings=settings)
    sid = writing_session(client.store)
    client.store.register_variable(sid, "writes", "integer", 0)
    rounds = 5
    to_error: list[float] = []
    resume: list[float] = []
    # Results are kept until Redis is up for good: a result garbage-collected during an
    # outage unsubscribes from a dead Redis in its __del__ (an unraisable error).
    keep: list[Any] = []

    def probe_task(marker: str) -> float:
        """Seconds from now until a new task's result is back (submits retried)."""
        up = time.monotonic()

        def submitted() -> Any:
            try:
                return client.submit("predict", sid, "question -> answer", question(marker, 0))
            except StoreUnavailable:
                return None

        handle = wait_until(submitted, 30, interval=0.1, what="a submit after the outage")
        keep.append(handle)
        handle.get(timeout=60)
        return time.monotonic() - up

    def time_to_error() -> float:
        probe = SessionStore.from_settings(settings)
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            probe.get_session(sid)
        probe.close()
        return time.monotonic() - t0

    procs = [start_worker(env, tmp_path, concurrency=4) for _ in range(2)]
    procs.append(start_beat(env, tmp_path, "beat"))
    try:
        with stopping(*procs) as workers:
            for w in workers[:2]:
                w.wait_log(" ready.", 30)
            with Load(client, sid, "r") as load:
                for n in range(rounds):
                    time.sleep(1.0)  # load runs against a healthy Redis
                    if n % 2 == 0:
                        srv.kill()  # crash: no shutdown, no final fsync beyond "always"
                    else:
                        srv.stop()  # graceful: SIGTERM
                    to_error.append(time_to_error())
                    time.sleep(1.0)  # the outage
                    srv = restart(port, aof, data)
                    resume.append(probe_task(f"probe{n}"))
                # A hung Redis (SIGSTOP): calls fail after the socket timeout, not never.
                time.sleep(1.0)
                srv.proc.send_signal(signal.SIGSTOP)
                try:
                    hung = time_to_error()
                    time.sleep(max(0.0, 2.0 - hung))
                finally:
                    srv.proc.send_signal(signal.SIGCONT)
                hang_resume = probe_task("probe-hang")
            # Every task whose submit returned completes, and the ledger empties.
            handles = list(load.handles)

            def pending() -> list[tuple[str, Any]]:
                return [(m, h) for m, h in handles if not h.ready()]

            def diagnose() -> str:
                r = client.store.redis
                lines = [
                    f"unacked {r.zrange('unacked_index', 0, -1, withscores=True)}",
                    f"queue {r.llen('dspex')} ledger {client.store.pending_sent()}",
                ]
                for m, h in pending():
                    lines.append(f"pending {m} {h.id}: LM calls {calls(lm_log, m)}")
                    for w in workers:
                        lines += [ln for ln in w.log().splitlines() if h.id in ln]
                return "\n".join(lines)

            wait_until(
                lambda: not pending(), 90, interval=0.2, what="every task", diagnose=diagnose
            )
            for marker, handle in handles:
                result = handle.get_result(timeout=5)
                assert f"MARK[{marker}]" in result["outputs"]["answer"], result
            r = client.store.redis
            wait_until(
                lambda: (
                    r.zcard("unacked_index") == 0
                    and r.llen("dspex") == 0
                    and client.store.pending_sent() == 0
                ),
                30,
                what="queue, unacked and ledger empty",
                diagnose=diagnose,
            )
            logs = "\n".join(w.log() for w in workers)
            assert all(w.alive() for w in workers), worker_logs(workers)
            # No task was dropped as a failure because its retry could not be published.
            assert "reject requeue=False" not in logs
            resent = logs.count("sending it again")
            # Finalize every result while Redis is up (see ``keep``).
            keep.clear()
            handles.clear()
            load.handles.clear()
            gc.collect()
            client.close()
    finally:
        srv.stop()
    # Acknowledged writes survived every restart (a write whose reply was lost may or may
    # not have been applied).
    restarted = start_redis_server(port=port, extra_args=aof, data_dir=data)
    try:
        store = SessionStore.from_url(restarted.url, prefix=settings.key_prefix)
        writes = store.get_variable(sid, "writes")
        assert load.acked <= writes.value <= load.attempted, (writes, load.acked)
        # A write whose reply was lost is sent again: the version may run ahead.
        assert writes.version >= writes.value + 1
        # Each task wrote exactly once: a write and its task's done record are one atomic
        # step, so the versions must equal 1 + the number of tasks with a write on record.
        # (A task whose submit raised during an outage may still have been sent and run:
        # it counts too, once.)
        done = store.redis.hgetall(store.keys.done(sid))
        wrote = {
            tid
            for tid, rec in done.items()
            if rec.startswith("done:") and '"count":' in rec.split(":", 2)[2]
        }
        n_tasks = len(handles)
        assert {h.id for _, h in handles} <= wrote
        assert store.get_variable(sid, "answer").version == 1 + len(wrote)
        assert store.get_variable(sid, "count").version == 1 + len(wrote)
        store.close()
    finally:
        restarted.stop()
    client.close()
    assert load.write_errors > 0 and load.submit_errors > 0  # the outages were felt
    reliability.record(
        "redis_restart",
        cases=rounds,
        passed=rounds,
        lost=f"0 of {load.acked} acknowledged writes; 0 of {n_tasks} tasks",
        figures=(
            f"{n_tasks} tasks, {load.acked} acknowledged writes; workers consume again "
            f"{summary(resume)} after Redis is up; store_unavailable after "
            f"{max(to_error) * 1000:.0f} ms at most (Redis down), {hung:.1f} s (Redis hung, "
            f"socket timeout 1 s; consuming again {hang_resume:.1f} s after); "
            f"{resent} task(s) resent from the ledger"
        ),
    )


# --- SIGTERM ------------------------------------------------------------------------------


def test_sigterm_with_tasks_in_flight(
    dedicated_redis: RedisProc, tmp_path: Path, reliability: Recorder
) -> None:
    lm_log = tmp_path / "lm.log"
    env = fault_env(dedicated_redis.url, lm_log)
    client = Client(settings=Settings.from_env(env))
    sid = writing_session(client.store)
    sent: dict[str, Any] = {}

    def send(marker: str, sleep: float) -> None:
        sent[marker] = client.app.send_task(
            PREDICT_TASK, args=[sid, SIGNATURE, question(marker, sleep), STORE_BOTH]
        )

    def running_on(w: Proc) -> list[str]:
        events = parse_log(lm_log)
        ended = {m for e, m, pid in events if e == "end" and pid == w.pid}
        return [m for e, m, pid in events if e == "start" and pid == w.pid and m not in ended]

    with stopping(start_worker(env, tmp_path)) as workers:
        first = workers[0]
        first.wait_log(" ready.", 30)
        # Warm shutdown (SIGTERM): the two running tasks finish on the stopping worker,
        # the queued ones wait for the next worker.
        warm = [f"t{n}" for n in range(6)]
        for m in warm:
            send(m, 2)
        in_flight = wait_until(lambda: len(running_on(first)) == 2 and running_on(first), 20)
        first.signal(signal.SIGTERM)
        t0 = time.monotonic()
        warm_rc = first.proc.wait(timeout=20)
        warm_exit = time.monotonic() - t0
        second = start_worker(env, tmp_path)
        workers.append(second)
        for m in warm:
            sent[m].get(timeout=40)
        # SIGTERM, then SIGKILL when the grace period is over (what an orchestrator does
        # to a worker whose tasks outlast it): the abandoned tasks go back to the queue.
        killed = [f"g{n}" for n in range(4)]
        for m in killed:
            send(m, 2)
        abandoned = wait_until(lambda: len(running_on(second)) == 2 and running_on(second), 20)
        second.signal(signal.SIGTERM)
        time.sleep(0.5)  # the grace period
        second.kill()
        t1 = time.monotonic()
        workers.append(start_worker(env, tmp_path))
        for m in killed:
            sent[m].get(timeout=60)
        requeued_in = time.monotonic() - t1
        logs = worker_logs(workers)

    assert warm_rc == 0, logs
    ended_on_first = {m for e, m, pid in parse_log(lm_log) if e == "end" and pid == first.pid}
    assert set(in_flight) <= ended_on_first  # finished before the worker exited
    for m in warm + killed:
        expected = 2 if m in abandoned else 1  # only the abandoned ones ran again
        assert len(calls(lm_log, m)) == expected, (m, parse_log(lm_log))
    # Ten tasks, each written exactly once.
    assert client.store.get_variable(sid, "answer").version == 1 + 10
    assert client.store.get_variable(sid, "count").version == 1 + 10
    client.close()
    reliability.record(
        "sigterm",
        cases=2,
        passed=2,
        lost="0 tasks (all 4 completed)",
        figures=(
            f"SIGTERM: 2 running tasks finished, exit in {warm_exit:.1f} s; SIGTERM + SIGKILL "
            f"after 0.5 s: 2 abandoned tasks rerun, all done {requeued_in:.1f} s after the kill"
        ),
    )


# --- two beats ----------------------------------------------------------------------------


def test_two_beats_expire_exactly(
    dedicated_redis: RedisProc, tmp_path: Path, reliability: Recorder
) -> None:
    lm_log = tmp_path / "lm.log"
    env = fault_env(dedicated_redis.url, lm_log, DSPEX_EXPIRY_INTERVAL_S="0.3")
    store = SessionStore.from_settings(Settings.from_env(env))
    doomed = [f"doomed-{n}" for n in range(30)]
    kept = [f"kept-{n}" for n in range(3)]
    lasting = [f"lasting-{n}" for n in range(5)]
    for sid in doomed + kept:
        store.create_session(sid, ttl_s=1.5)
    for sid in lasting:
        store.create_session(sid, ttl_s=600)
    store.register_variable(doomed[0], "temperature", "float", 0.5)
    store.store_program(doomed[1], "qa", {"module": "predict", "signature": "q -> a"})
    stop = threading.Event()

    def touch_kept() -> None:
        while not stop.is_set():
            for sid in kept:
                store.touch(sid)
            stop.wait(0.3)

    toucher = threading.Thread(target=touch_kept, daemon=True)
    toucher.start()
    r = store.redis

    def gone(sid: str) -> bool:
        keys = store.keys.session_keys(sid)
        return not r.exists(*keys) and r.zscore(store.keys.sessions, sid) is None

    try:
        with stopping(
            start_worker(env, tmp_path),
            start_beat(env, tmp_path, "beat-a"),
            start_beat(env, tmp_path, "beat-b"),
        ) as procs:
            procs[0].wait_log(" ready.", 30)
            wait_until(
                lambda: all(gone(s) for s in doomed),
                20,
                what="expiry",
                diagnose=lambda: str(store.stats()),
            )
            sweeps = store.stats()["sweeps"]
            # More sweeps from both beats must not count anything again.
            wait_until(lambda: store.stats()["sweeps"] >= sweeps + 8, 20, what="more sweeps")
            stats = store.stats()
            beat_logs = [p.log() for p in procs[1:]]
    finally:
        stop.set()
        toucher.join(timeout=5)
    for log in beat_logs:
        assert "Sending due task dspex-expire-sessions" in log, log
    assert stats["expired"] == len(doomed), stats
    assert stats["deleted"] == 0, stats
    assert stats["created"] == len(doomed) + len(kept) + len(lasting), stats
    assert stats["sessions"] == len(kept) + len(lasting), stats
    assert all(store.exists(s) for s in kept + lasting)
    store.close()
    reliability.record(
        "two_beats",
        cases=len(doomed) + len(kept) + len(lasting),
        passed=len(doomed) + len(kept) + len(lasting),
        lost="0 sessions expired twice or kept (counted)",
        figures=f"{stats['sweeps']} sweeps from 2 beats; expired == {stats['expired']} exactly",
    )


# --- compare-and-set ----------------------------------------------------------------------


def test_fifty_threads_compare_and_set(redis_url: str, reliability: Recorder) -> None:
    store = SessionStore.from_url(redis_url, prefix=f"cas{uuid.uuid4().hex[:6]}")
    sid = "cas"
    store.create_session(sid)
    store.register_variable(sid, "counter", "integer", 0)
    threads, per_thread = 50, 100
    conflicts = [0] * threads
    errors: list[BaseException] = []
    go = threading.Barrier(threads)

    def work(n: int) -> None:
        try:
            go.wait()
            for _ in range(per_thread):
                tries = 0
                while True:
                    current = store.get_variable(sid, "counter", touch=False)
                    try:
                        store.update_variable(
                            sid, "counter", current.value + 1, expected_version=current.version
                        )
                        break
                    except VersionConflict:
                        conflicts[n] += 1
                        tries += 1
                        # Exponential backoff with full jitter, as a real producer would.
                        time.sleep(random.uniform(0, min(0.05, 0.001 * 2**tries)))
        except BaseException as e:
            errors.append(e)

    started = time.monotonic()
    pool = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=120)
    elapsed = time.monotonic() - started
    assert not errors, errors[:3]
    final = store.get_variable(sid, "counter")
    assert final.value == threads * per_thread
    assert final.version == 1 + threads * per_thread
    store.close()
    reliability.record(
        "cas",
        cases=threads * per_thread,
        passed=final.value,
        lost=f"{threads * per_thread - final.value} increments",
        figures=f"final value {final.value}; {sum(conflicts)} conflicts retried; {elapsed:.1f} s",
    )


# --- a task sent through Flower, lost by the broker -------------------------------------


def test_flower_task_lost_by_the_broker_is_sent_again(
    dedicated_redis: RedisProc, tmp_path: Path, reliability: Recorder
) -> None:
    """Flower's API puts the task in the ledger as the Client does: when the broker loses
    the message, beat sends it again under the same id and it runs once."""
    lm_log = tmp_path / "lm.log"
    user, password = "ops", f"pw-{uuid.uuid4().hex[:8]}"
    env = fault_env(
        dedicated_redis.url,
        lm_log,
        DSPEX_EXPIRY_INTERVAL_S="0.5",
        DSPEX_RESEND_AFTER_S="2",
        DSPEX_FLOWER_USER=user,
        DSPEX_FLOWER_PASSWORD=password,
    )
    client = Client(settings=Settings.from_env(env))
    store = client.store
    sid = writing_session(store)
    args = [sid, SIGNATURE, question("fl", 0), STORE_BOTH]
    port = free_port()
    flower = flower_proc(env, tmp_path, port, f"{user}:{password}")
    with contextlib.closing(client), stopping(flower) as procs:
        flower.wait_log("Visit me at", 30)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/task/async-apply/{PREDICT_TASK}",
            data=json.dumps({"args": args}).encode(),
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Authorization": "Basic "
                + base64.b64encode(f"{user}:{password}".encode()).decode(),
            },
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            task_id = json.loads(response.read())["task-id"]
        recorded = store.redis.hget(store.keys.ledger, task_id)
        assert recorded is not None, "Flower's task is not in the ledger"
        assert json.loads(recorded) == {"task": PREDICT_TASK, "args": args, "kwargs": {}}
        # The broker loses the message (as a Redis crash between a worker's BRPOP and its
        # unacked record does): nothing in the queue remembers it.
        assert store.redis.delete(LM_QUEUE) == 1
        started = time.monotonic()
        procs.append(start_worker(env, tmp_path))
        procs.append(start_beat(env, tmp_path, "beat"))
        result = client.app.AsyncResult(task_id).get(timeout=60)
        recovered = time.monotonic() - started
        assert "MARK[fl]" in result["outputs"]["answer"], result
        assert store.get_value(sid, "answer") == result["outputs"]["answer"]
        assert store.get_variable(sid, "answer").version == 2  # written once
        assert len(calls(lm_log, "fl")) == 1
        wait_until(lambda: store.pending_sent() == 0, 10, what="the ledger to empty")
    reliability.record(
        "flower_lost",
        cases=1,
        passed=1,
        lost="0 tasks (the lost message was sent again)",
        figures=f"sent again and ran once, result {recovered:.1f} s after the loss",
    )


# --- runs: enqueue across worker processes, and a killed worker --------------------------


def test_enqueue_fifo_across_two_workers_survives_a_killed_worker(
    dedicated_redis: RedisProc, tmp_path: Path
) -> None:
    """Runs of an ``enqueue`` session go one at a time, in order, whichever of two worker
    processes takes them; killing the worker in the middle of the current run delays the
    queue (the run comes back after the visibility timeout) but never blocks it, and no
    run writes twice."""
    lm_log = tmp_path / "lm.log"
    env = fault_env(dedicated_redis.url, lm_log)
    client = Client(settings=Settings.from_env(env))
    sid = writing_session(client.store)
    s = client.session(sid)
    s.configure(multitask="enqueue")
    markers = [f"q{n}" for n in range(12)]
    with stopping(*(start_worker(env, tmp_path) for _ in range(2))) as workers:
        for w in workers:
            w.wait_log(" ready.", 30)
        handles = [
            s.predict(SIGNATURE, options=STORE_BOTH, **question(m, 1.5 if m == "q3" else 0.05))
            for m in markers
        ]
        pid = wait_until(lambda: calls(lm_log, "q3"), 60, what="run q3 in its LM call")[0]
        victim = next(w for w in workers if w.pid == pid)
        victim.kill()
        workers.remove(victim)
        workers.append(start_worker(env, tmp_path))
        for h in handles:
            h.get(timeout=90)
    log = parse_log(lm_log)  # in time order: one O_APPEND write per line

    def first_start(marker: str) -> int:
        return min(i for i, (kind, m, _) in enumerate(log) if m == marker and kind == "start")

    def last_end(marker: str) -> int:
        return max(i for i, (kind, m, _) in enumerate(log) if m == marker and kind == "end")

    # One at a time, in submission order: a run's first LM call starts after the previous
    # run's last call ended (q3's first, killed call never ended; its second did).
    for prev, nxt in itertools.pairwise(markers):
        assert last_end(prev) < first_start(nxt), (prev, nxt, log)
    runs = sorted(s.runs(limit=50), key=lambda r: r.seq)
    assert [r.status for r in runs] == ["succeeded"] * len(markers)
    for prev_run, nxt_run in itertools.pairwise(runs):
        assert prev_run.finished_at is not None and nxt_run.started_at is not None
        assert nxt_run.started_at >= prev_run.finished_at
    # Every run wrote exactly once (q3 ran twice: killed, then completed).
    assert client.store.get_variable(sid, "answer").version == 1 + len(markers)
    assert len(calls(lm_log, "q3")) == 2
    client.close()


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_cancel_stops_a_run_mid_lm_call_on_each_pool(
    dedicated_redis: RedisProc, tmp_path: Path, pool: str
) -> None:
    """A run in a 30 s LM call is cancelled: it stops within a second on the threads pool
    and on prefork, its worker takes the next task, and the call was abandoned."""
    from dspex_tasks.errors import RunCancelled

    lm_log = tmp_path / "lm.log"
    env = fault_env(dedicated_redis.url, lm_log, DSPEX_TASK_TIME_LIMIT_S="60")
    client = Client(settings=Settings.from_env(env))
    sid = writing_session(client.store)
    with stopping(start_worker(env, tmp_path, concurrency=1, pool=pool)) as workers:
        workers[0].wait_log(" ready.", 30)
        h = client.session(sid).predict(SIGNATURE, options=STORE_BOTH, **question("slow", 30))
        wait_until(lambda: calls(lm_log, "slow"), 30, what="the run in its LM call")
        started = time.monotonic()
        assert h.cancel() == "signalled"
        with pytest.raises(RunCancelled):
            h.get(timeout=10)
        assert time.monotonic() - started < 1.5
        assert client.store.get_run(sid, h.id).status == "cancelled"
        # Nothing was written, and the worker's one slot serves the next run at once.
        assert client.store.get_variable(sid, "answer").version == 1
        nxt = client.session(sid).predict(SIGNATURE, options=STORE_BOTH, **question("next", 0))
        assert "MARK[next]" in nxt.get(timeout=20)["answer"]
    client.close()
