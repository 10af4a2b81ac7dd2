"""Per-thread CPU profiles of a benchmark's worker processes (a helper, not a benchmark).

    BENCH_PROFILE_DIR=/tmp/prof BENCH_KINDS=tuned,dspex BENCH_CONCURRENCY=64 \\
        BENCH_ROUNDS=1 BENCH_HOST_PROCESSES=1 \\
        scripts/with-redis.sh .venv/bin/python benchmarks/lm_concurrency.py
    .venv/bin/python benchmarks/_profile.py /tmp/prof/*.prof

With ``BENCH_PROFILE_DIR`` set, ``lm_concurrency.py`` starts each worker through
``_profile.py --out DIR/<worker>.prof -- <worker command>`` and, after the warm-up, sends
it SIGUSR2: from then on every thread of the worker (the consumer loop, the pool
threads, any thread a task starts) gets its own
``cProfile`` profiler timed by that thread's CPU clock (``time.thread_time_ns``), so a
thread waiting on a socket costs nothing and the numbers are CPU, not wall time. The
merged stats are written when the worker exits. cProfile slows Python down (about 2x
here), so read the **shares**, and scale them to the CPU per task measured without it.

Given ``.prof`` files, prints the worker CPU per task in inclusive groups (frames that
contain others are listed before them) and the top functions by own time.
"""

from __future__ import annotations

import atexit
import cProfile
import pstats
import runpy
import signal
import sys
import threading
import time
from pathlib import Path

#: (label, substrings of "file:function"): CPU per task under the outermost matching frames.
#: Indented rows are inside the row above; DSPy runs inside the task function in both
#: (in dspex under ``run_bounded``, whose inline runs the watchdog thread watches).
GROUPS = [
    ("Celery trace_task (task, result backend, events)", ("trace.py:trace_task",)),
    ("  task function (dspex predict / glue_predict)", ("tasks.py:predict", "glue_predict")),
    ("    dspex begin_task", ("taskstate.py:begin_task",)),
    ("    dspex finish_task", ("taskstate.py:finish_task",)),
    ("    run_bounded: the run, bound (DSPy inside)", ("runtime.py:run_bounded",)),
    ("watchdog: deadlines and cancel polls", ("watchdog.py:_loop", "watchdog.py:_poll")),
    ("  result backend store_result", ("backends/base.py:store_result",)),
    ("  task events: send", ("dispatcher.py:send",)),
    ("      dspex result records (STARTED, SUCCESS)", ("resultbackend.py:state_record",)),
    ("  saferepr of the result", ("saferepr.py:saferepr", "fix_result_repr.py:result_repr")),
    ("DSPy Predict.__call__ (any thread)", ("predict.py:__call__",)),
    ("  environment proxy lookup", ("request.py:getproxies",)),
    ("  price lookup (model_info)", ("costs.py:model_info", "profiles.py:model_info")),
    ("consumer: BRPOP read", ("_brpop_read",)),
    ("consumer: ack", ("message.py:ack",)),
    ("task events: flush", ("dispatcher.py:flush",)),
]


class _Snapshot:
    """A profiler's stats so far, without disabling it (what ``pstats.Stats`` loads)."""

    def __init__(self, prof: cProfile.Profile) -> None:
        prof.snapshot_stats()  # type: ignore[attr-defined]
        self.stats = prof.stats  # type: ignore[attr-defined]

    def create_stats(self) -> None:
        pass


def install(out: str) -> None:
    """Profile every thread of this process once SIGUSR2 arrives; write the stats at exit.

    Until the signal, each thread runs a cheap hook that only checks a flag (so start-up
    and the warm-up -- imports, first-call caches -- stay out of the profile); at the
    first call event after it, the thread starts its own profiler, which replaces the hook.
    """
    profilers: list[cProfile.Profile] = []
    lock = threading.Lock()
    active = threading.Event()

    def hook(*_: object) -> None:
        if active.is_set():
            prof = cProfile.Profile(time.thread_time_ns, 1e-9)
            with lock:
                profilers.append(prof)
            prof.enable()

    def start(*_: object) -> None:
        active.set()

    signal.signal(signal.SIGUSR2, start)
    threading.setprofile(hook)
    sys.setprofile(hook)

    def dump() -> None:
        sys.setprofile(None)
        with lock:
            found = list(profilers)
        stats = None
        for prof in found:
            # Not prof.disable(): it would close the calls still open in other threads
            # (a pool thread waiting for work) with *this* thread's CPU clock.
            try:
                snap = _Snapshot(prof)
                stats = pstats.Stats(snap) if stats is None else stats.add(snap)  # type: ignore[arg-type]
            except TypeError:  # a profiler that saw nothing
                continue
        if stats is not None:
            stats.dump_stats(out)

    atexit.register(dump)


def run(argv: list[str]) -> None:
    sys.argv = argv
    if argv[0] == "-m":
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(argv[0], run_name="__main__")


def report(paths: list[str], tasks: int) -> None:
    for path in paths:
        stats = pstats.Stats(path)
        raw = stats.stats  # type: ignore[attr-defined]
        total = sum(tt for _, _, tt, _, _ in raw.values())
        print(f"{Path(path).name}: {total * 1000 / tasks:.2f} ms profiled CPU per task")
        for label, needles in GROUPS:
            cum = 0.0
            for (file, _line, func), (_cc, _nc, _tt, ct, callers) in raw.items():
                key = f"{file}:{func}"
                if any(n in key for n in needles):
                    # Count only outermost calls: skip calls made from another match.
                    outer = not any(
                        any(n in f"{cf}:{cfn}" for n in needles) for (cf, _cl, cfn) in callers
                    )
                    if outer:
                        cum += ct
            print(f"  {label:<52} {cum * 1000 / tasks:6.3f} ms  {cum / total:5.1%}")
        print("  top functions by own CPU:")
        rows = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:25]
        for (file, line, func), (_cc, nc, tt, _ct, _callers) in rows:
            where = "/".join(Path(file).parts[-2:])
            print(f"    {tt * 1000 / tasks:6.3f} ms {nc / tasks:7.1f} calls  {where}:{line} {func}")


def main() -> int:
    args = sys.argv[1:]
    if args[:1] == ["--out"] and "--" in args:
        out = args[1]
        install(out)
        run(args[args.index("--") + 1 :])
        return 0
    tasks = 512
    if args[:1] == ["--tasks"]:
        tasks, args = int(args[1]), args[2:]
    report(args, tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
