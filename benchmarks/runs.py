"""What runs (DESIGN.md §9) cost, and how fast cancel and the enqueue hand-off are.

1. Registry cost of a ``parallel`` run on the worker. A run starts in the script that
   claims its task (TASK_CONTEXT) and ends in the one that records its result
   (FINISH_TASK), so its cost is the difference between a task's two scripts with the
   run and without it, timed alone, CPU and wall per task; the standalone START_RUN +
   FINISH_RUN pair (what a run cost before they were folded in, and what a run still
   pays on paths that write variables) is shown beside it. Target: <= 0.1 ms worker CPU.
2. Cancel latency: a run waiting on a slow LM (the fake OpenAI server, 30 s) is cancelled;
   time from ``cancel()`` to ``get()`` raising ``RunCancelled`` at the producer, and whether
   the LM server saw the request abandoned. Target p99 <= 1 s.
3. Enqueue hand-off: ``BENCH_RUNS`` (50) runs on one ``enqueue`` session against a 20 ms
   LM; the gap between one run finishing and the next starting, from the registry's
   server-clock stamps. Target p50 <= 5 ms.

The worker is a real Celery worker (threads pool) in a subprocess: this script run with
``--worker``. Run: ``make bench BENCH=runs``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Proc, env_int, percentile, redis_url, start_fake_lm, wait_until

from dspex_tasks.client import Client
from dspex_tasks.errors import RunCancelled
from dspex_tasks.settings import Settings
from dspex_tasks.store import SessionStore
from dspex_tasks.store.connection import redis_client
from dspex_tasks.store.runs import RunTicket

SIG = "question -> answer"


def _registry_cost(url: str, n: int) -> None:
    store = SessionStore(redis_client(url), prefix=f"rc{uuid.uuid4().hex[:6]}")
    store.create_session("r")
    message = {"task": "dspex.predict", "args": ["r", SIG, {"question": "q"}], "kwargs": {}}
    result = orjson.dumps({"session_id": "r", "outputs": {"answer": "a"}})

    ids = itertools.count()  # every call a fresh task id, across rounds

    def task_only(_: int) -> None:
        tid = f"t-{next(ids)}"
        store.begin_task("r", task_id=tid, lease_s=60, variables=["temperature"])
        store.finish_task("r", tid, result)

    def task_with_run(_: int) -> None:
        tid, ticket = f"r-{next(ids)}", RunTicket("dspex.predict", None, lambda: message)
        store.begin_task("r", task_id=tid, lease_s=60, variables=["temperature"], run=ticket)
        store.finish_task("r", tid, result, run=ticket)
        assert ticket.finished is not None and ticket.finished.verdict == "succeeded"

    def standalone(_: int) -> None:
        rid = f"s-{next(ids)}"
        store.start_run("r", rid, "dspex.predict", message)
        store.finish_run("r", rid, "succeeded")

    def timed(fn: Callable[[int], None]) -> tuple[float, float]:
        for i in range(100):
            fn(-i - 1)
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(n):
            fn(i)
        return (
            (time.perf_counter() - wall) / n * 1e6,
            (time.process_time() - cpu) / n * 1e6,
        )

    rounds = [(timed(task_only), timed(task_with_run), timed(standalone)) for _ in range(3)]

    def med(which: int, what: int) -> float:
        return statistics.median(r[which][what] for r in rounds)

    extra_cpu, extra_wall = med(1, 1) - med(0, 1), med(1, 0) - med(0, 0)
    print(f"1. run registry, {n:,} parallel runs x 3 rounds (median per task)")
    print(f"   task scripts, no run     wall {med(0, 0):6.1f} us   client CPU {med(0, 1):6.1f} us")
    print(f"   task scripts with run    wall {med(1, 0):6.1f} us   client CPU {med(1, 1):6.1f} us")
    print(
        f"   the run's cost           wall {extra_wall:+6.1f} us   client CPU {extra_cpu:+6.1f} us"
        "  (target <= 100 us)" + ("" if extra_cpu <= 100 else "  TARGET MISSED")
    )
    print(f"   standalone start+finish  wall {med(2, 0):6.1f} us   client CPU {med(2, 1):6.1f} us")
    store.delete_session("r")
    store.close()


def _profiles(lm_port: int) -> str:
    return json.dumps(
        {
            "default": {
                "model": "openai/fake",
                "api_base": f"http://127.0.0.1:{lm_port}/v1",
                "api_key_env": "BENCH_FAKE_KEY",
                "params": {"num_retries": 0},
            }
        }
    )


def _settings(url: str, prefix: str, lm_port: int) -> Settings:
    return Settings.from_env(
        environ={"DSPEX_LM_PROFILES": _profiles(lm_port)}, redis_url=url, key_prefix=prefix
    )


def _start_worker(url: str, prefix: str, lm_port: int) -> Proc:
    env = {
        **os.environ,
        "DSPEX_REDIS_URL": url,
        "DSPEX_KEY_PREFIX": prefix,
        "BENCH_FAKE_KEY": "sk-fake",
        "DSPEX_LM_PROFILES": _profiles(lm_port),
    }
    return Proc(
        "worker",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.worker",
            "worker",
            "--pool=threads",
            "--concurrency=8",
            "--without-mingle",
            "--without-gossip",
            "--loglevel=WARNING",
        ],
        env=env,
    )


def _cancel_latency(url: str, n: int) -> None:
    lm, port = start_fake_lm(30_000)
    prefix = f"cl{uuid.uuid4().hex[:6]}"
    worker = _start_worker(url, prefix, port)
    client = Client(settings=_settings(url, prefix, port))
    try:
        wait_until(lambda: bool(client.workers()), "the worker to answer a ping")
        latencies: list[float] = []
        for i in range(n):
            sid = f"c{i}"
            client.create_session(sid)
            h = client.session(sid).predict(SIG, question=f"slow {i}")
            wait_until(
                lambda h=h, sid=sid: client.store.get_run(sid, h.id).status == "running",
                "the run to start",
            )
            t0 = time.perf_counter()
            h.cancel()
            try:
                h.get(timeout=10)
            except RunCancelled:
                latencies.append((time.perf_counter() - t0) * 1000)
        p99 = percentile(latencies, 99)
        print(
            f"2. cancel -> RunCancelled at the producer, {len(latencies)} runs mid-LM-call: "
            f"p50 {percentile(latencies, 50):.0f} ms, p99 {p99:.0f} ms (target p99 <= 1,000 ms)"
            + ("" if p99 <= 1000 else "  TARGET MISSED")
        )
    finally:
        client.close()
        worker.stop()
        lm.stop()


def _enqueue_handoff(url: str, n: int) -> None:
    lm, port = start_fake_lm(20)
    prefix = f"eq{uuid.uuid4().hex[:6]}"
    worker = _start_worker(url, prefix, port)
    client = Client(settings=_settings(url, prefix, port))
    try:
        wait_until(lambda: bool(client.workers()), "the worker to answer a ping")
        s = client.create_session("q")
        s.configure(multitask="enqueue")
        handles = [s.predict(SIG, question=f"q{i}") for i in range(n)]
        for h in handles:
            h.get(timeout=120)
        runs = sorted(s.runs(limit=n), key=lambda r: r.seq)
        gaps = [
            (nxt.started_at - prev.finished_at).total_seconds() * 1000
            for prev, nxt in itertools.pairwise(runs)
            if prev.finished_at and nxt.started_at
        ]
        p50 = percentile(gaps, 50)
        print(
            f"3. enqueue hand-off, {n} runs on one session: run ends -> next starts "
            f"p50 {p50:.1f} ms, p99 {percentile(gaps, 99):.1f} ms (target p50 <= 5 ms)"
            + ("" if p50 <= 5 else "  TARGET MISSED")
        )
    finally:
        client.close()
        worker.stop()
        lm.stop()


def main() -> int:
    argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0]).parse_args()
    url = redis_url()
    _registry_cost(url, env_int("BENCH_REGISTRY_RUNS", 3000))
    _cancel_latency(url, env_int("BENCH_CANCELS", 20))
    _enqueue_handoff(url, env_int("BENCH_RUNS", 50))
    return 0


if __name__ == "__main__":
    sys.exit(main())
