"""Throughput and latency of ``dspex.predict`` against bare Celery tasks, same worker.

    scripts/with-redis.sh .venv/bin/python benchmarks/tasks.py [--n 600] [--seq 150] [--rounds 5]

Three task kinds run on one Celery app, one Redis broker / result backend, and one worker
process, in the same run:

  (a) ``dspex.predict``: the service path (session load + touch, LM resolution, module
      cache, ``dspy.Predict("question -> answer")``, result JSON), on the offline
      ``dspex/echo`` LM (pinned as the default profile: ``DSPEX_LM=dspex/echo``);
  (b) ``bench.bare_dspy``: a plain Celery task running the same ``dspy.Predict`` under
      ``dspy.context(lm=<the same LM object>)``, with no session store at all;
  (c) ``bench.noop``: a plain Celery task that does nothing (the queue's own cost).

The worker is a **subprocess** (this script re-executed with ``--worker``):
``--pool=threads --concurrency=8``, as deployed, so the producer loop does not share
the worker's GIL. Each kind gets a warm-up, then a bulk run (send N, then get N:
throughput) and a sequential run (send one, wait, repeat: round-trip p50 / p99). Every
question is distinct, so no cache can answer for the LM. Worker CPU per task (the worker
process's user + system CPU over the bulk run, / N) is shown as well: on a shared
machine it is steadier than throughput. The rounds rotate the order of the kinds; the
headline ratio is the median of the per-round predict / bare-dspy throughput ratios
(each pair ran back to back), printed last; the target is >= 0.8.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _harness import cpu_seconds, med_spread, process_tree
from celery import Celery

from dspex_tasks.app import PREDICT_TASK, make_celery
from dspex_tasks.lm import keep_litellm_offline
from dspex_tasks.settings import Settings
from dspex_tasks.store import SessionStore

ROOT = Path(__file__).resolve().parents[1]

SIGNATURE = "question -> answer"
BARE_DSPY_TASK = "bench.bare_dspy"
NOOP_TASK = "bench.noop"
CONCURRENCY = 8
N_SESSIONS = 8
WARMUP = 30


def settings_for(url: str, prefix: str) -> Settings:
    # The default profile is pinned to the offline deterministic dspex/echo LM (without
    # DSPEX_LM the worker would pick an embedded local model when one is installed).
    environ = {"DSPEX_LM": "dspex/echo"}
    return Settings.from_env(environ=environ, redis_url=url, key_prefix=prefix)


def worker_app(url: str, prefix: str) -> Celery:
    """The worker's app: the dspex tasks plus the two bare tasks, one shared LM."""
    import dspy

    from dspex_tasks.runtime import Runtime
    from dspex_tasks.tasks import register_tasks

    settings = settings_for(url, prefix)
    app = make_celery(settings)
    runtime = Runtime(settings)
    register_tasks(app, lambda: runtime)
    # The very LM object dspex.predict uses for a session with no LM settings.
    lm = runtime.lms.resolve({}, {})
    predict = dspy.Predict(SIGNATURE)

    @app.task(name=BARE_DSPY_TASK, shared=False)  # type: ignore[untyped-decorator]
    def bare_dspy(question: str) -> dict[str, Any]:
        with dspy.context(lm=lm):
            return {"answer": predict(question=question).answer}

    @app.task(name=NOOP_TASK, shared=False)  # type: ignore[untyped-decorator]
    def noop() -> None:
        return None

    return app


def run_worker(url: str, prefix: str) -> None:
    keep_litellm_offline()  # as the stock worker does at start
    app = worker_app(url, prefix)
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={CONCURRENCY}",
            "--loglevel=WARNING",
            "--without-mingle",
            "--without-gossip",
            "--hostname=dspex-bench@%h",
        ]
    )


@dataclass
class Measurement:
    label: str
    throughput: float
    enqueue_rate: float
    p50_ms: float
    p99_ms: float
    #: Worker CPU (user + system) per task over the bulk run: steadier than throughput
    #: on a shared machine, where other processes take the cores now and then.
    cpu_ms: float = 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


Sender = Callable[[int], Any]
Checker = Callable[[int, Any], None]


@dataclass
class Kind:
    label: str
    send: Sender
    check: Checker
    counter: Iterator[int]
    runs: list[Measurement]


def measure(kind: Kind, n: int, seq: int, worker_pid: int) -> Measurement:
    """Warm up, then bulk (send all, get all) and sequential round trips."""
    send, check, counter = kind.send, kind.check, kind.counter
    for _ in range(WARMUP):
        i = next(counter)
        check(i, send(i).get(timeout=60))

    ids = [next(counter) for _ in range(n)]
    pids = process_tree(worker_pid)
    cpu0 = cpu_seconds(pids)
    started = time.perf_counter()
    handles = [send(i) for i in ids]
    enqueued = time.perf_counter()
    results = [h.get(timeout=300) for h in handles]
    finished = time.perf_counter()
    cpu_ms = (cpu_seconds(pids) - cpu0) * 1000 / n
    for i, result in zip(ids, results, strict=True):
        check(i, result)

    latencies = []
    for _ in range(seq):
        i = next(counter)
        t0 = time.perf_counter()
        result = send(i).get(timeout=60)
        latencies.append((time.perf_counter() - t0) * 1000)
        check(i, result)
    return Measurement(
        kind.label,
        throughput=n / (finished - started),
        enqueue_rate=n / (enqueued - started),
        p50_ms=statistics.median(latencies),
        p99_ms=percentile(latencies, 99),
        cpu_ms=cpu_ms,
    )


def summary(kind: Kind) -> Measurement:
    """Median over the rounds of each figure."""
    runs = kind.runs
    return Measurement(
        kind.label,
        throughput=statistics.median(r.throughput for r in runs),
        enqueue_rate=statistics.median(r.enqueue_rate for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        cpu_ms=statistics.median(r.cpu_ms for r in runs),
    )


def question(kind: str, run: str, i: int) -> str:
    return f"[{kind} {run} #{i}] What is {i} plus {i * 7 % 101}?"


def wait_for_worker(app: Celery, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"worker exited during start-up (rc={proc.returncode})")
        if app.control.ping(timeout=0.5):
            return
    raise SystemExit(f"worker not ready after {timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # warm shutdown
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def run_all(
    app: Celery, run: str, sessions: list[str], n: int, seq: int, rounds: int, worker_pid: int
) -> list[Kind]:
    """Measure the three kinds, ``rounds`` times each, rotating which goes first."""

    def send_noop(i: int) -> Any:
        return app.send_task(NOOP_TASK)

    def check_noop(i: int, result: Any) -> None:
        assert result is None, result

    def send_bare(i: int) -> Any:
        return app.send_task(BARE_DSPY_TASK, args=[question("bare", run, i)])

    def check_bare(i: int, result: Any) -> None:
        assert f"#{i}]" in result["answer"], result

    def send_predict(i: int) -> Any:
        sid = sessions[i % len(sessions)]
        inputs = {"question": question("predict", run, i)}
        return app.send_task(PREDICT_TASK, args=[sid, SIGNATURE, inputs])

    def check_predict(i: int, result: Any) -> None:
        assert f"#{i}]" in result["outputs"]["answer"], result
        assert result["lm"]["model"] == "dspex/echo", result

    kinds = [
        Kind("(a) dspex.predict", send_predict, check_predict, itertools.count(), []),
        Kind("(b) bare dspy.Predict task", send_bare, check_bare, itertools.count(), []),
        Kind("(c) bare no-op task", send_noop, check_noop, itertools.count(), []),
    ]
    for r in range(rounds):
        # Rotate the order so no kind always runs first (cold) or last.
        for kind in kinds[r % 3 :] + kinds[: r % 3]:
            m = measure(kind, n, seq, worker_pid)
            kind.runs.append(m)
            print(
                f"round {r + 1}: {m.label:28} {m.throughput:7.1f} tasks/s  "
                f"p50 {m.p50_ms:.2f} ms  p99 {m.p99_ms:.2f} ms  worker CPU {m.cpu_ms:.2f} ms/task",
                flush=True,
            )
    return kinds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600, help="tasks per bulk run")
    parser.add_argument("--seq", type=int, default=150, help="sequential round trips")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (order rotates)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        run_worker(args.url, args.prefix)
        return 0

    url = os.environ.get("DSPEX_TEST_REDIS_URL")
    if not url:
        print("DSPEX_TEST_REDIS_URL is not set: run under scripts/with-redis.sh", file=sys.stderr)
        return 2
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    run = uuid.uuid4().hex[:6]
    settings = settings_for(url, prefix)
    app = make_celery(settings)  # the producer: sends by name, imports no DSPy
    store = SessionStore.from_settings(settings)
    sessions = [f"bench-{run}-{k}" for k in range(N_SESSIONS)]
    for sid in sessions:
        store.create_session(sid)

    fd, log_name = tempfile.mkstemp(prefix="dspex-bench-worker-", suffix=".log")
    ok = False
    try:
        with os.fdopen(fd, "wb") as log:
            worker = subprocess.Popen(
                [sys.executable, __file__, "--worker", "--url", url, "--prefix", prefix],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            print(f"worker pid {worker.pid}, log {log_name}", flush=True)
            try:
                wait_for_worker(app, worker)
                kinds = run_all(app, run, sessions, args.n, args.seq, args.rounds, worker.pid)
                ok = True
            finally:
                stop(worker)
    finally:
        for sid in sessions:
            store.delete_session(sid)
        store.close()
        app.close()
        if ok:
            os.unlink(log_name)
        else:
            print(f"worker log kept: {log_name}", file=sys.stderr)

    rows = [summary(kind) for kind in kinds]
    predict, bare, noop = rows
    print()
    print(
        f"worker: subprocess, threads pool, concurrency {CONCURRENCY}; LM dspex/echo; "
        f"bulk N={args.n}, sequential {args.seq}; {N_SESSIONS} sessions for (a); "
        f"median [min-max] of {args.rounds} rounds"
    )
    print(
        f"{'task':28} {'tasks/s':>22} {'enqueue/s':>10} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'CPU ms/task':>12}"
    )
    for kind, row in zip(kinds, rows, strict=True):
        print(
            f"{row.label:28} {med_spread([r.throughput for r in kind.runs]):>22} "
            f"{row.enqueue_rate:10.1f} {row.p50_ms:7.2f} {row.p99_ms:7.2f} {row.cpu_ms:12.2f}"
        )
    # Ratios within each round (the kinds ran back to back), then their median: a slow
    # spell of the shared machine hits both sides of a ratio alike.
    paired = [
        p.throughput / b.throughput for p, b in zip(kinds[0].runs, kinds[1].runs, strict=True)
    ]
    print()
    print(f"ratio predict / bare-dspy p50 latency  : {predict.p50_ms / bare.p50_ms:.2f}")
    print(f"ratio bare-dspy / no-op throughput     : {bare.throughput / noop.throughput:.2f}")
    print(f"ratio predict / no-op throughput       : {predict.throughput / noop.throughput:.2f}")
    print(f"worker CPU per task predict / bare-dspy: {predict.cpu_ms / bare.cpu_ms:.2f}")
    ratio = statistics.median(paired)
    verdict = "meets" if ratio >= 0.8 else "BELOW"
    print(
        f"ratio predict / bare-dspy throughput   : {ratio:.2f} "
        f"[{min(paired):.2f}-{max(paired):.2f}] ({verdict} target >= 0.8)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
