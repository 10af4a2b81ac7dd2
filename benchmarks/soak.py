"""Soak: mixed load for SOAK_S seconds, then everything must be flat, finished and gone.

    SOAK_S=1800 scripts/with-redis.sh .venv/bin/python benchmarks/soak.py   (make bench: 90 s)

The stack is the real one: two worker processes on the stock entry point
(``celery -A workers.worker worker``, threads pool), beat sweeping expired sessions every
``DSPEX_EXPIRY_INTERVAL_S`` (2 s), and the fake OpenAI-compatible endpoint
(``tests/fake_openai.py``, 50 ms per answer, SSE when asked to stream). The producer runs
these actors at once, each in its own thread, each on sessions with a short TTL (8 s)
that it drops for a new one every few tasks, so sessions expire all along:

  predict    ``dspex.predict``, the answer checked against its own question (the fake
             LM names the question's ``MARK[...]`` in its answer)
  stream     ``options={"stream": True}``, read token by token until ``done``
  limited    ``dspex.predict`` on a session whose LM profile has a cluster-wide limit
             (``limits.rpm``), so some runs wait for a slot
  watcher    ``watch()`` of a predict session's events, a few seconds at a time
  cas        compare-and-set writers on one shared variable (conflicts are expected:
             the loser reads and tries again; a lost update is a failure)

Sampled every ``SOAK_SAMPLE_S`` (5 s): each worker's RSS (its process tree) and Redis
``used_memory``. Task results are kept 20 s (``DSPEX_RESULT_EXPIRES_S``; a day by
default) so that Redis reaches its steady state within the warm-up (the first quarter, at
least 30 s). After warm-up, the verdicts are:

  - worker RSS: growth from the end of warm-up to the end <= 10 % (each worker);
  - Redis memory: the same <= 10 %;
  - failed tasks: 0 (an error a task returns, or a task not done in time);
  - leaked keys: once the actors stop and every session's TTL has passed, no key of a
    session is left (``<prefix>:s:*``), the expiry index is empty and no task is left
    in the task ledger.

Environment: SOAK_S (90), SOAK_SAMPLE_S (5), SOAK_DELAY_MS (50), SOAK_ACTORS
("predict=6,stream=2,limited=2,watcher=2,cas=2"), SOAK_CONCURRENCY (16 per worker).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Proc, env_int, redis_url, rss_bytes, start_fake_lm, wait_until

from dspex_tasks.client import Client, SessionHandle
from dspex_tasks.errors import DspexError, VersionConflict
from dspex_tasks.settings import Settings

SIG = "question -> answer"
SESSION_TTL_S = 8
TASKS_PER_SESSION = 12
WARMUP_FRACTION = 0.25
RESULT_KEEP_S = 20
#: Warm-up lasts at least this long: every result stored in it has expired by its end.
WARMUP_MIN_S = RESULT_KEEP_S + 10
DEFAULT_ACTORS = "predict=6,stream=2,limited=2,watcher=2,cas=2"


def _profiles(port: int) -> str:
    base: dict[str, Any] = {"model": "openai/soak", "api_base": f"http://127.0.0.1:{port}/v1"}
    base |= {"api_key_env": "SOAK_LM_KEY", "params": {"cache": False}}
    return json.dumps({"default": base, "limited": {**base, "limits": {"rpm": 600}}})


class Soak:
    def __init__(self, url: str, port: int, seconds: float) -> None:
        self.url, self.port, self.seconds = url, port, seconds
        self.prefix = f"soak{uuid.uuid4().hex[:6]}"
        self.env = {
            "DSPEX_REDIS_URL": url,
            "DSPEX_KEY_PREFIX": self.prefix,
            "DSPEX_LM_PROFILES": _profiles(port),
            "DSPEX_EXPIRY_INTERVAL_S": "2",
            # Results are kept RESULT_KEEP_S (a day by default): long enough to read them,
            # short enough that Redis reaches its steady state inside the warm-up.
            "DSPEX_RESULT_EXPIRES_S": str(RESULT_KEEP_S),
            "SOAK_LM_KEY": "x",
        }
        self.settings = Settings.from_env(environ=self.env)
        self.client = Client(settings=self.settings)
        self.stop = threading.Event()
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.ids = itertools.count()
        self.watch_targets: list[str] = []

    # --- bookkeeping -------------------------------------------------------------------

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] += n

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)
            self.counts["failed"] += 1

    def new_session(self, kind: str) -> SessionHandle:
        s = self.client.create_session(f"{kind}-{next(self.ids)}", ttl_s=SESSION_TTL_S)
        if kind == "limited":
            s.configure_lm("limited")
        self.count("sessions")
        return s

    # --- actors ------------------------------------------------------------------------

    def _tasks(self, kind: str, one: Callable[[SessionHandle, str], None]) -> None:
        while not self.stop.is_set():
            s = self.new_session(kind)
            if kind == "predict":
                with self.lock:
                    self.watch_targets = [*self.watch_targets[-7:], s.id]
            for _ in range(TASKS_PER_SESSION):
                if self.stop.is_set():
                    break
                marker = f"q{next(self.ids)}"
                try:
                    one(s, marker)
                    self.count(kind)
                except DspexError as e:
                    self.fail(f"{kind}: {e.code}: {e}")
            # The session is left to expire: beat's sweep (or the backstop) removes it.

    def predict(self, s: SessionHandle, marker: str) -> None:
        answer = s.predict(SIG, question=f"MARK[{marker}] who answers?").get(timeout=120)["answer"]
        if marker not in answer:
            self.fail(f"predict: someone else's answer {answer!r}")

    def stream(self, s: SessionHandle, marker: str) -> None:
        handle = s.predict(SIG, options={"stream": True}, question=f"MARK[{marker}] who?")
        kinds = [event.type for event in handle.stream(block_s=120)]
        if kinds[-1:] != ["done"] or "token" not in kinds:
            self.fail(f"stream: ended {kinds[-3:]}")
        if marker not in handle.get(timeout=120)["answer"]:
            self.fail("stream: someone else's answer")

    def watcher(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                targets = list(self.watch_targets)
            if not targets:
                self.stop.wait(0.5)
                continue
            try:
                seen = sum(1 for _ in self.client.store.watch(targets[-1], block_s=1.0))
                self.count("watched events", seen)
            except DspexError as e:  # the session expired under the watch: expected
                self.count(f"watch ended: {e.code}")
                with self.lock:
                    if targets[-1] in self.watch_targets:
                        self.watch_targets.remove(targets[-1])

    def cas(self) -> None:
        while not self.stop.is_set():
            s = self.new_session("cas")
            s.register_variable("counter", "integer", 0)
            mine = 0
            for _ in range(TASKS_PER_SESSION * 4):
                if self.stop.is_set():
                    break
                var = s.variable("counter")
                try:
                    s.set("counter", var.value + 1, expected_version=var.version)
                    mine += 1
                    self.count("cas writes")
                except VersionConflict:
                    self.count("cas conflicts")
                # Paced (<= 50 writes/s per writer): the load is the mix, not a CAS flood.
                self.stop.wait(0.02)
            if s.get("counter") != mine:
                self.fail(f"cas: counter {s.get('counter')} after {mine} writes")

    # --- the run -----------------------------------------------------------------------

    def run(self, actors: dict[str, int], workers: list[Proc], raw: redis.Redis) -> int:
        one = {"predict": self.predict, "stream": self.stream, "limited": self.predict}
        threads = []
        for kind, n in actors.items():
            for _ in range(n):
                target: Callable[[], None]
                if kind in one:
                    target = functools.partial(self._tasks, kind, one[kind])
                else:
                    target = getattr(self, kind)
                threads.append(threading.Thread(target=self._guard(target), daemon=True))
        for t in threads:
            t.start()
        samples: list[tuple[float, list[int], int]] = []
        started = time.monotonic()
        step = env_int("SOAK_SAMPLE_S", 5)
        while (elapsed := time.monotonic() - started) < self.seconds:
            samples.append(
                (
                    elapsed,
                    [rss_bytes(w.tree()) for w in workers],
                    int(raw.info("memory")["used_memory"]),
                )
            )
            for w in workers:
                if not w.alive():
                    self.fail(f"worker {w.name} died: {w.log_path}")
                    self.stop.set()
            if self.stop.wait(min(step, max(0.0, self.seconds - elapsed))):
                break
        self.stop.set()
        for t in threads:
            t.join(timeout=180)
        return self.report(samples, workers, raw)

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def guarded() -> None:
            try:
                fn()
            except Exception as e:  # an actor must not die silently
                name = getattr(fn, "args", (getattr(fn, "__name__", "?"),))[0]
                self.fail(f"actor {name} crashed: {type(e).__name__}: {e}")

        return guarded

    def report(
        self, samples: list[tuple[float, list[int], int]], workers: list[Proc], raw: redis.Redis
    ) -> int:
        ok = True
        warmup_s = max(self.seconds * WARMUP_FRACTION, WARMUP_MIN_S)
        warm = [s for s in samples if s[0] >= warmup_s]
        print(f"soak: {self.seconds:.0f} s, {len(samples)} samples; counts:")
        for what, n in sorted(self.counts.items()):
            print(f"   {what:<24} {n:>10,}")
        tasks = sum(self.counts[k] for k in ("predict", "stream", "limited"))
        print(f"   tasks/s                  {tasks / self.seconds:10.1f}")
        if len(warm) >= 2:
            for k in range(len(workers)):
                # Medians of the first and last few samples: one sample is one GC away.
                first = statistics.median(s[1][k] for s in warm[:3])
                last = statistics.median(s[1][k] for s in warm[-3:])
                growth = (last - first) / first
                ok &= growth <= 0.10
                print(
                    f"   worker {k} RSS            {first / 2**20:7.1f} MB -> "
                    f"{last / 2**20:7.1f} MB"
                    f"  ({growth:+.1%}; target <= +10%)" + ("" if growth <= 0.10 else "  MISSED")
                )
            first = statistics.median(s[2] for s in warm[:3])
            last = statistics.median(s[2] for s in warm[-3:])
            growth = (last - first) / first
            ok &= growth <= 0.10
            print(
                f"   Redis used_memory        {first / 2**20:7.1f} MB -> {last / 2**20:7.1f} MB"
                f"  ({growth:+.1%}; target <= +10%)" + ("" if growth <= 0.10 else "  MISSED")
            )
        # Every session's TTL passes, beat sweeps: nothing of a session may be left.
        keys = self.client.store.keys
        pattern = f"{self.prefix}:s:*"

        def gone() -> bool:
            # No key of a session, an empty expiry index, and no task left in the ledger.
            left = any(True for _ in raw.scan_iter(pattern, count=1000))
            return not left and raw.zcard(keys.sessions) == 0 and raw.hlen(keys.ledger) == 0

        try:
            wait_until(gone, "every session to expire", timeout_s=SESSION_TTL_S + 60)
            print("   leaked session keys             0  (target 0)")
        except SystemExit:
            left = sum(1 for _ in raw.scan_iter(pattern, count=1000))
            print(f"   leaked session keys      {left:>10,}  (target 0)  MISSED")
            ok = False
        print(f"   failed                   {len(self.failures):>10,}  (target 0)")
        for line in self.failures[:10]:
            print(f"      {line}")
        return 0 if ok and not self.failures else 1


def _actors() -> dict[str, int]:
    spec = os.environ.get("SOAK_ACTORS", DEFAULT_ACTORS)
    out = {}
    for item in spec.split(","):
        kind, _, n = item.partition("=")
        out[kind.strip()] = int(n)
    return out


def main() -> int:
    argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0]).parse_args()
    url, seconds = redis_url(), float(os.environ.get("SOAK_S", "90"))
    lm, port = start_fake_lm(env_int("SOAK_DELAY_MS", 50))
    soak = Soak(url, port, seconds)
    raw = redis.Redis.from_url(url)
    procs: list[Proc] = []
    try:
        concurrency = str(env_int("SOAK_CONCURRENCY", 16))
        for k in range(2):
            argv = [sys.executable, "-m", "celery", "-A", "workers.worker", "worker"]
            argv += ["--loglevel=WARNING", "--without-mingle", "--without-gossip", "-E"]
            argv += [f"--hostname=soak{k}@%h"]
            env = {**soak.env, "DSPEX_WORKER_CONCURRENCY": concurrency}
            procs.append(Proc(f"soak-worker{k}", argv, env))
        beat_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"soak-beat-{soak.prefix}"
        beat_dir.mkdir(parents=True, exist_ok=True)
        procs.append(
            Proc(
                "soak-beat",
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "workers.beat",
                    "beat",
                    "--pidfile=",
                    f"--schedule={beat_dir / 'schedule'}",
                    "--loglevel=WARNING",
                ],
                soak.env,
            )
        )
        wait_until(
            lambda: len(soak.client.app.control.ping(timeout=0.5)) >= 2, "two soak workers", 90
        )
        return soak.run(_actors(), procs[:2], raw)
    finally:
        soak.stop.set()
        for p in procs:
            p.stop(keep_log=bool(soak.failures))
        lm.stop()
        soak.client.close()
        raw.close()


if __name__ == "__main__":
    sys.exit(main())
