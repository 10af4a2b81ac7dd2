"""LM-bound concurrency: ``dspex.predict`` against hand-rolled Celery glue, same run.

    scripts/with-redis.sh .venv/bin/python benchmarks/lm_concurrency.py   (or: make bench)

The workload that matters: every LM call takes 200 ms. A fake OpenAI-compatible endpoint
(``tests/fake_openai.py``, its own process, loopback) answers each
``/v1/chat/completions`` after a fixed delay; both sides call it through the real client
path, ``dspy.LM("openai/bench", api_base="http://127.0.0.1:PORT/v1", api_key="x",
cache=False)``.

Two baselines, both a Celery task on a threads-pool worker (concurrency C) running
``dspy.Predict("question -> answer")`` under ``dspy.context(lm=...)``:

  plain  the glue a user writes: ``Celery(broker=URL, backend=URL)`` with Celery's
         defaults plus ``worker_send_task_events`` (Flower needs events), stock DSPy.
  tuned  the same worker, plus every process-wide DSPy fix the service applies:
         ``configure_dspy_once()`` (history off, no disk cache),
         ``memoize_model_metadata()`` (DSPy's per-call price-map scan made O(1)) and
         ``snapshot_proxy_environment()`` (its per-request proxy lookup read once).
  sleep  (C=64 only) a task on the plain worker that sleeps 200 ms and returns: no DSPy,
         no LM -- what Celery itself costs with that configuration.
  dspex  ``dspex.predict`` on the stock worker entry point (``celery -A workers.worker
         worker``, the default pool, concurrency C), the LM given as a profile in
         ``DSPEX_LM_PROFILES``; tasks spread over 64 sessions.

Method, per point: start the worker(s), warm up, then park N = C x WAVES tasks in a queue
nobody consumes, tell the workers to consume it (``add_consumer``) and record when each
result is stored (seen through the result backend's pub/sub, so the producer spends
almost no CPU while the workers run). Throughput is the steady state: results after the
first wave over the time from the end of the first wave to the last result. The ideal
is C / 0.2 s; "of ideal" is throughput / ideal. Worker CPU per task is the worker
processes' user+system CPU over the drain divided by N; RSS is read after the drain.
Every answer is checked against its own question. Each point runs ROUNDS times (the
order reverses every round) and is reported as median [min-max].

"dspex xP" is the same total concurrency split over P worker processes on this host
(P = BENCH_HOST_PROCESSES; off by default, ``scale.py`` measures it): a Python process
runs on one core at a time (the GIL), so once the task CPU of one process fills a core,
more processes are how one host scales (DESIGN.md section 7).

Both glue workers and the service's run with Celery task events on (Flower), and with
litellm's bundled price map (``scripts/with-redis.sh`` sets it; it only spares a
network fetch at start-up). The service's own Celery configuration (late acks,
extended results, STARTED, its event batching) is part of what is measured.

Environment: BENCH_CONCURRENCY (default "16,64,256"), BENCH_WAVES (8), BENCH_ROUNDS (3),
BENCH_DELAY_MS (200), BENCH_HOST_PROCESSES (1: no xP rows; 2 adds them at C >= 64),
BENCH_KINDS (default "plain,tuned,dspex,sleep": the kinds measured), BENCH_PROFILE_DIR
(every worker runs under ``benchmarks/_profile.py``, which writes per-thread CPU
profiles of the timed drain there),
BENCH_COMPARE ("label=/path/to/checkout,...": adds a "dspex@label" row per checkout, its
worker run from that tree's ``dspex_tasks`` and ``workers``, so two versions of the
service are compared in the same run, interleaved).
Targets: at C=64 and C=256, dspex >= 1.0x the tuned glue's throughput and <= 1.0x its
worker CPU per task.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from _harness import (
    Proc,
    ResultListener,
    cpu_seconds,
    env_int,
    env_ints,
    med_spread,
    redis_url,
    rss_bytes,
    start_fake_lm,
    wait_until,
)
from celery import Celery

from dspex_tasks.app import PREDICT_TASK, make_celery
from dspex_tasks.settings import Settings
from dspex_tasks.store import SessionStore

SIGNATURE = "question -> answer"
GLUE_TASK = "bench.glue_predict"
SLEEP_TASK = "bench.sleep"
N_SESSIONS = 64


def lm_profiles(port: int) -> str:
    return json.dumps(
        {
            "default": {
                "model": "openai/bench",
                "api_base": f"http://127.0.0.1:{port}/v1",
                "api_key_env": "BENCH_LM_KEY",
                "params": {"cache": False},
            }
        }
    )


def settings_for(url: str, prefix: str, port: int) -> Settings:
    environ = {"DSPEX_LM_PROFILES": lm_profiles(port), "BENCH_LM_KEY": "x"}
    return Settings.from_env(environ=environ, redis_url=url, key_prefix=prefix)


# --- the baseline workers (this script re-executed) ----------------------------------

GLUE_KINDS = ("plain", "tuned", "sleep")


def run_glue_worker(url: str, port: int, concurrency: int, name: str, *, tuned: bool) -> None:
    """The glue a user writes: Celery's defaults, events on for Flower, ``dspy.Predict``."""
    import dspy

    app = Celery("glue", broker=url, backend=url)
    app.conf.worker_send_task_events = True  # Flower needs them
    if tuned:
        # Every process-wide DSPy fix the service applies (runtime.py, lm/profiles.py).
        from dspex_tasks.lm import memoize_model_metadata, snapshot_proxy_environment
        from dspex_tasks.runtime import configure_dspy_once

        configure_dspy_once()
        if not memoize_model_metadata():
            raise SystemExit("memoize_model_metadata() found nothing to patch")
        if not snapshot_proxy_environment():
            raise SystemExit("snapshot_proxy_environment() found nothing to patch")
    lm = dspy.LM("openai/bench", api_base=f"http://127.0.0.1:{port}/v1", api_key="x", cache=False)
    predict = dspy.Predict(SIGNATURE)

    @app.task(name=GLUE_TASK, shared=False)  # type: ignore[untyped-decorator]
    def glue_predict(question: str) -> dict[str, Any]:
        with dspy.context(lm=lm):
            return {"answer": predict(question=question).answer}

    @app.task(name=SLEEP_TASK, shared=False)  # type: ignore[untyped-decorator]
    def sleep(marker: str) -> dict[str, Any]:
        time.sleep(DELAY_S)  # the LM wait with no LM: what Celery alone costs
        return {"answer": marker}

    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={concurrency}",
            "--loglevel=WARNING",
            "--without-mingle",
            "--without-gossip",
            f"--hostname={name}@%h",
        ]
    )


# --- the producer side ---------------------------------------------------------------


@dataclass
class Point:
    """One configuration: ``kind`` at total concurrency ``concurrency`` over ``processes``."""

    kind: str
    concurrency: int
    processes: int = 1
    throughput: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)

    #: Another checkout whose worker runs this point (``BENCH_COMPARE``); None: this one.
    tree: str | None = None

    @property
    def label(self) -> str:
        return self.kind if self.processes == 1 else f"{self.kind} x{self.processes}"

    @property
    def ideal(self) -> float:
        return self.concurrency / DELAY_S

    def fraction(self) -> list[float]:
        return [t / self.ideal for t in self.throughput]


DELAY_S = env_int("BENCH_DELAY_MS", 200) / 1000


#: BENCH_PROFILE_DIR: run every worker under benchmarks/_profile.py (per-thread CPU
#: profiles of the timed drain, written there as <worker>.prof).
PROFILE_DIR = os.environ.get("BENCH_PROFILE_DIR", "")
PROFILER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_profile.py")


def spawn(name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
    if PROFILE_DIR:
        out = os.path.join(PROFILE_DIR, f"{name}.prof")
        argv = [argv[0], PROFILER, "--out", out, "--", *argv[1:]]
    return Proc(name, argv, env)


class Bench:
    """The producer: sessions, the result listener, worker start-up and timed drains."""

    def __init__(self, url: str, port: int) -> None:
        self.url = url
        self.port = port
        self.prefix = f"bench{uuid.uuid4().hex[:6]}"
        self.run = uuid.uuid4().hex[:6]
        self.settings = settings_for(url, self.prefix, port)
        self.app: Celery = make_celery(self.settings)
        self.store = SessionStore.from_settings(self.settings)
        self.sessions = [f"lmb-{self.run}-{k}" for k in range(N_SESSIONS)]
        for sid in self.sessions:
            self.store.create_session(sid)
        self.listener = ResultListener(url)
        self.counter = 0

    def close(self) -> None:
        for sid in self.sessions:
            self.store.delete_session(sid)
        self.store.close()
        self.listener.close()
        self.app.close()

    def start_workers(
        self, kind: str, concurrency: int, count: int, tree: str | None = None
    ) -> list[Proc]:
        """``count`` worker processes of ``kind``, each with ``concurrency`` threads."""
        procs = []
        for k in range(count):
            name = f"{kind}{k}-{uuid.uuid4().hex[:4]}"
            if kind in GLUE_KINDS:
                argv = [sys.executable, __file__, "--worker", "--url", self.url]
                argv += ["--port", str(self.port), "--concurrency", str(concurrency)]
                argv += ["--name", name] + (["--tuned"] if kind == "tuned" else [])
                procs.append(spawn(name, argv))
            else:
                # The stock entry point, configured the way a deployment configures it.
                argv = [sys.executable, "-m", "celery", "-A", "workers.worker"]
                if tree is not None:
                    argv += ["--workdir", tree]  # Celery puts --workdir first on sys.path
                argv += ["worker", "--loglevel=WARNING", "--without-mingle", "--without-gossip"]
                argv += [f"--hostname={name}@%h"]
                env = {
                    "DSPEX_REDIS_URL": self.url,
                    "DSPEX_KEY_PREFIX": self.prefix,
                    "DSPEX_LM_PROFILES": lm_profiles(self.port),
                    "DSPEX_WORKER_CONCURRENCY": str(concurrency),
                    "BENCH_LM_KEY": "x",
                }
                if tree is not None:
                    # Ahead of this checkout (the working directory, the editable install).
                    env.update(PYTHONPATH=tree, PYTHONSAFEPATH="1")
                procs.append(spawn(name, argv, env))
        names = {p.name for p in procs}

        def ready() -> bool:
            for p in procs:
                if not p.alive():
                    raise SystemExit(f"worker {p.name} exited during start-up: {p.log_path}")
            replies = self.app.control.ping(timeout=0.5)
            seen = {next(iter(r)).split("@")[0] for r in replies}
            return names <= seen

        wait_until(ready, f"{count} {kind} worker(s)", timeout_s=90)
        return procs

    def send(self, kind: str, queue: str) -> tuple[str, str]:
        i = self.counter
        self.counter += 1
        marker = f"#{self.run}-{i}"
        # The fake LM names the question's MARK[...] in its answer.
        question = f"MARK[{marker}] What is {i} plus {i * 7 % 101}?"
        if kind in ("plain", "tuned"):
            handle = self.app.send_task(GLUE_TASK, args=[question], queue=queue)
        elif kind == "sleep":
            handle = self.app.send_task(SLEEP_TASK, args=[marker], queue=queue)
        else:
            sid = self.sessions[i % len(self.sessions)]
            args = [sid, SIGNATURE, {"question": question}]
            handle = self.app.send_task(PREDICT_TASK, args=args, queue=queue)
        return handle.id, marker

    def check(self, kind: str, sent: dict[str, str], done: dict[str, tuple[float, Any]]) -> None:
        for task_id, marker in sent.items():
            meta = done[task_id][1]
            if meta["status"] != "SUCCESS":
                raise SystemExit(f"{kind} task failed: {meta.get('result')}")
            result = meta["result"]
            answer = result["outputs"]["answer"] if kind == "dspex" else result["answer"]
            if marker not in answer:
                raise SystemExit(f"{kind} task {task_id} got someone else's answer: {answer!r}")

    def drain(
        self, kind: str, procs: list[Proc], n: int, slots: int, queue: str
    ) -> tuple[float, float, float]:
        """Park ``n`` tasks in ``queue``, let the workers consume it, time the drain.

        Returns (tasks/s, worker CPU ms per task, worker RSS MB).
        """
        sent = dict(self.send(kind, queue) for _ in range(n))
        pids = [pid for p in procs for pid in p.tree()]
        cpu0 = cpu_seconds(pids)
        replies = self.app.control.add_consumer(queue, reply=True, timeout=5, limit=len(procs))
        if len(replies) < len(procs):
            raise SystemExit(f"only {len(replies)}/{len(procs)} workers took queue {queue}")
        done = self.listener.wait(set(sent), timeout_s=60 + n * DELAY_S)
        cpu1 = cpu_seconds(pids)
        self.app.control.cancel_consumer(queue, reply=True, timeout=5, limit=len(procs))
        self.check(kind, sent, done)
        # Steady state: from the end of the first wave (the slots-th result) to the last
        # result, so the remote-control round trip that starts the drain and the ramp-up
        # count for neither kind.
        times = sorted(at for at, _ in done.values())
        throughput = (n - slots) / (times[-1] - times[slots - 1])
        return throughput, (cpu1 - cpu0) * 1000 / n, rss_bytes(pids) / 2**20

    def measure(self, point: Point, waves: int) -> None:
        per_process = point.concurrency // point.processes
        kind = point.kind.split("@")[0]
        procs = self.start_workers(kind, per_process, point.processes, point.tree)
        ok = False
        try:
            slots = per_process * point.processes
            self.drain(kind, procs, slots * 2, slots, f"bench-warm-{uuid.uuid4().hex[:6]}")
            hold = f"bench-hold-{uuid.uuid4().hex[:6]}"
            if PROFILE_DIR:
                for p in procs:
                    os.kill(p.pid, signal.SIGUSR2)  # profile from here on
            tps, cpu_ms, rss_mb = self.drain(kind, procs, slots * waves, slots, hold)
            point.throughput.append(tps)
            point.cpu_ms.append(cpu_ms)
            point.rss_mb.append(rss_mb)
            ok = True
            print(
                f"  {point.label:12} C={point.concurrency:<3}: {tps:6.1f} tasks/s "
                f"({tps / point.ideal:5.1%} of ideal), {cpu_ms:5.2f} ms worker CPU/task, "
                f"RSS {rss_mb:.0f} MB",
                flush=True,
            )
        finally:
            for p in procs:
                p.stop(keep_log=not ok)


def table(points: list[Point]) -> None:
    w = max(10, *(len(p.label) for p in points))
    print(
        f"{'kind':{w}} {'C':>4} {'tasks/s':>22} {'of ideal':>20} {'CPU ms/task':>20} {'RSS MB':>8}"
    )
    for p in points:
        fraction = [100 * f for f in p.fraction()]
        print(
            f"{p.label:{w}} {p.concurrency:>4} {med_spread(p.throughput):>22} "
            f"{med_spread(fraction) + '%':>20} {med_spread(p.cpu_ms, '.2f'):>20} "
            f"{statistics.median(p.rss_mb):8.0f}"
        )


def run_points(bench: Bench, points: list[Point], rounds: int, waves: int) -> None:
    """Measure every point ``rounds`` times, alternating the order each round."""
    for r in range(rounds):
        for point in points if r % 2 == 0 else points[::-1]:
            bench.measure(point, waves)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tuned", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_glue_worker(args.url, args.port, args.concurrency, args.name, tuned=args.tuned)
        return 0

    levels = env_ints("BENCH_CONCURRENCY", [16, 64, 256])
    waves = env_int("BENCH_WAVES", 8)
    rounds = env_int("BENCH_ROUNDS", 3)
    host_processes = env_int("BENCH_HOST_PROCESSES", 1)
    compare = [
        item.split("=", 1) for item in os.environ.get("BENCH_COMPARE", "").split(",") if item
    ]

    points: list[Point] = []
    for c in levels:
        points += [Point("plain", c), Point("tuned", c), Point("dspex", c)]
        points += [Point(f"dspex@{label}", c, tree=path) for label, path in compare]
        if c == 64:
            points.append(Point("sleep", c))
        if host_processes > 1 and c >= 64:
            points.append(Point("dspex", c, host_processes))
    kinds = os.environ.get("BENCH_KINDS")
    if kinds:
        points = [p for p in points if p.kind.split("@")[0] in kinds.split(",")]
    server, port = start_fake_lm(DELAY_S * 1000)
    bench = Bench(redis_url(), port)
    ok = False
    try:
        print(
            f"fake LM: {DELAY_S * 1000:.0f} ms per call; N = C x {waves} tasks per point; "
            f"{rounds} rounds",
            flush=True,
        )
        run_points(bench, points, rounds, waves)
        ok = True
    finally:
        bench.close()
        server.stop(keep_log=not ok)

    print()
    print(
        f"LM-bound tasks ({DELAY_S * 1000:.0f} ms per LM call), one worker host; "
        f"median [min-max] of {rounds}; 'x{host_processes}': {host_processes} worker "
        "processes sharing the concurrency"
    )
    table(points)
    print()

    def get(kind: str, c: int, processes: int = 1) -> Point | None:
        return next(
            (p for p in points if (p.kind, p.concurrency, p.processes) == (kind, c, processes)),
            None,
        )

    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    for label, _ in compare:
        for c in levels:
            other = get(f"dspex@{label}", c)
            if other is not None:
                print(f"dspex@{label} worker CPU per task at C={c}: {med(other.cpu_ms):.2f} ms")
    print("dspex (1 process) against each baseline: throughput ratio, worker CPU/task ratio")
    verdicts = []
    for c in levels:
        dspex = get("dspex", c)
        if dspex is None:
            continue
        parts = []
        for base in ("plain", "tuned"):
            glue = get(base, c)
            if glue is None:
                continue
            tps = med(dspex.throughput) / med(glue.throughput)
            cpu = med(dspex.cpu_ms) / med(glue.cpu_ms)
            parts.append(f"/ {base} {tps:.2f}x throughput, {cpu:.2f}x CPU")
            if base == "tuned" and c in (64, 256):
                verdicts.append((c, tps, cpu))
        print(f"  C={c:<3}: " + "; ".join(parts))
    for c, tps, cpu in verdicts:
        print(
            f"target at C={c}: dspex / tuned throughput {tps:.2f}x (>= 1.0: "
            + ("met" if tps >= 1 else "MISSED")
            + f"), worker CPU per task {cpu:.2f}x (<= 1.0: "
            + ("met" if cpu <= 1 else "MISSED")
            + ")"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
