"""Dispatch latency: enqueue -> task start on an idle worker, p50 / p99.

    scripts/with-redis.sh .venv/bin/python benchmarks/dispatch.py   (or: make bench)

One worker (the stock entry point, ``celery -A workers.worker worker``, default pool and
concurrency, offline ``dspex/echo`` LM) sits idle; the producer sends one task at a time
and waits for it to finish before sending the next (BENCH_N of each kind, default 300,
after a warm-up). "Start" is the moment the task's ``STARTED`` state reaches the
producer through the result backend's pub/sub (``task_track_started``): the worker
publishes it right before the task body runs. Two kinds, alternating, same worker:

  dspex.predict       the service task (a session, Predict "question -> answer")
  bench.noop          a bare Celery task on the same worker: the queue's own latency

The ratio dspex / noop shows what dispatching a service task adds (it should be ~1: the
work happens after the start). The floor, for scale: a raw Redis LPUSH -> BRPOP hand-off
between two processes (what the broker transport cannot beat).
Targets (anchors, goal 16): p50 <= 5 ms, p99 <= 20 ms.
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from typing import Any

import orjson
import redis
from _harness import ROOT, Proc, env_int, percentile, redis_url, wait_until

from dspex_tasks.app import PREDICT_TASK, make_celery
from dspex_tasks.settings import Settings
from dspex_tasks.store import SessionStore

NOOP_TASK = "bench.noop"


def settings_for(url: str, prefix: str) -> Settings:
    return Settings.from_env(environ={"DSPEX_LM": "dspex/echo"}, redis_url=url, key_prefix=prefix)


def worker_main(url: str, prefix: str, name: str) -> None:
    """The stock worker app plus one bare task (this script re-executed)."""
    import os

    os.environ.update(
        {"DSPEX_REDIS_URL": url, "DSPEX_KEY_PREFIX": prefix, "DSPEX_LM": "dspex/echo"}
    )
    sys.path.insert(0, str(ROOT))
    from workers.worker import app

    @app.task(name=NOOP_TASK, shared=False)  # type: ignore[untyped-decorator]
    def noop() -> None:
        return None

    app.worker_main(
        [
            "worker",
            "--loglevel=WARNING",
            "--without-mingle",
            "--without-gossip",
            f"--hostname={name}@%h",
        ]
    )


def floor_main(url: str, inbox: str, outbox: str) -> None:
    """The raw hand-off floor: BRPOP a timestamp, LPUSH it back."""
    r = redis.Redis.from_url(url)
    while True:
        item = r.brpop([inbox], timeout=30)
        if item is None or item[1] == b"stop":
            return
        r.lpush(outbox, item[1])


class StartListener:
    """Sees each task's STARTED state the moment the worker publishes it."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe("celery-task-meta-*")

    def wait(self, task_id: str, states: set[str], timeout_s: float = 30) -> tuple[float, Any]:
        channel = f"celery-task-meta-{task_id}".encode()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=1.0)
            if message and message["type"] == "pmessage" and message["channel"] == channel:
                meta = orjson.loads(message["data"])
                if meta["status"] in states:
                    return time.perf_counter(), meta
        raise SystemExit(f"no {states} for task {task_id} within {timeout_s} s")

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], sys.argv[3], sys.argv[4])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--floor":
        floor_main(sys.argv[2], sys.argv[3], sys.argv[4])
        return 0
    n = env_int("BENCH_N", 300)
    url = redis_url()
    prefix = f"disp{uuid.uuid4().hex[:6]}"
    settings = settings_for(url, prefix)
    app = make_celery(settings)
    store = SessionStore.from_settings(settings)
    sid = f"disp-{uuid.uuid4().hex[:6]}"
    store.create_session(sid)
    listener = StartListener(url)
    name = f"disp-{uuid.uuid4().hex[:4]}"
    worker = Proc(name, [sys.executable, __file__, "--worker", url, prefix, name])
    ok = False
    latencies: dict[str, list[float]] = {"dspex.predict": [], "bench.noop": []}
    try:
        wait_until(lambda: bool(app.control.ping(timeout=0.5)), "the worker", timeout_s=90)

        def one(kind: str, i: int) -> float:
            sent = time.perf_counter()
            if kind == "dspex.predict":
                args = [sid, "question -> answer", {"question": f"q {i}"}]
                handle = app.send_task(PREDICT_TASK, args=args)
            else:
                handle = app.send_task(NOOP_TASK)
            started, _ = listener.wait(handle.id, {"STARTED"})
            _, meta = listener.wait(handle.id, {"SUCCESS", "FAILURE"})
            if meta["status"] != "SUCCESS":
                raise SystemExit(f"{kind} failed: {meta.get('result')}")
            return (started - sent) * 1000

        for i in range(30):  # warm-up: connections, module cache, LM
            one("dspex.predict", i)
            one("bench.noop", i)
        for i in range(n):
            for kind in latencies if i % 2 == 0 else list(latencies)[::-1]:
                latencies[kind].append(one(kind, i))
                time.sleep(0.002)  # idle between tasks
        ok = True
    finally:
        worker.stop(keep_log=not ok)
        store.delete_session(sid)
        store.close()
        listener.close()
        app.close()

    inbox, outbox = f"floor-in-{uuid.uuid4().hex[:6]}", f"floor-out-{uuid.uuid4().hex[:6]}"
    floor_proc = Proc("floor", [sys.executable, __file__, "--floor", url, inbox, outbox])
    r = redis.Redis.from_url(url)
    floor: list[float] = []
    try:
        for i in range(n + 30):
            sent = time.perf_counter()
            r.lpush(inbox, str(i))
            r.brpop([outbox], timeout=30)
            if i >= 30:
                floor.append((time.perf_counter() - sent) * 1000)
    finally:
        r.lpush(inbox, "stop")
        floor_proc.stop()
        r.close()

    print(f"enqueue -> start on an idle worker, {n} tasks each (ms)")
    print(f"{'kind':28} {'p50':>7} {'p90':>7} {'p99':>7}")
    rows = [*latencies.items(), ("raw LPUSH->BRPOP->LPUSH", floor)]
    for kind, values in rows:
        print(
            f"{kind:28} {statistics.median(values):7.2f} {percentile(values, 90):7.2f} "
            f"{percentile(values, 99):7.2f}"
        )
    dspex, noop = latencies["dspex.predict"], latencies["bench.noop"]
    p50, p99 = statistics.median(dspex), percentile(dspex, 99)
    met = p50 <= 5 and p99 <= 20
    print(
        f"dspex.predict dispatch p50 {p50:.2f} ms, p99 {p99:.2f} ms (targets <= 5 / <= 20); "
        f"ratio dspex / noop p50: {p50 / statistics.median(noop):.2f}x"
        + ("  (targets met)" if met else "  (TARGET MISSED)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
