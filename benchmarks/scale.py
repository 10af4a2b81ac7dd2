"""Scale-out on one host: the LM-bound workload with 1, 2, 3 and 4 worker processes.

    scripts/with-redis.sh .venv/bin/python benchmarks/scale.py   (or: make bench)

The workload and method of ``benchmarks/lm_concurrency.py`` (fake OpenAI-compatible
endpoint, 200 ms per call, real ``dspy.LM`` client path, a parked queue drained at
steady state), with ``dspex.predict`` on 1, 2 and 4 stock worker processes of
concurrency 64 each. Workers hold no session state (DESIGN.md section 7), so throughput
should grow with processes until the host's cores are full: this machine has 2 cores
shared with Redis, the fake LM and the producer, so expect the curve to flatten past 2.
Each point runs ROUNDS times (order reversed every round); median [min-max].

Environment: BENCH_SCALE ("1,2,3,4"), BENCH_SCALE_CONCURRENCY (64 per process),
BENCH_WAVES (8), BENCH_ROUNDS (2), BENCH_DELAY_MS (200).
Prints the throughput ratio of each process count to 1 process last. The 3-to-1 ratio is
the figure tests/test_multihost.py used to assert (>= 2.7x across three network
namespaces); the test now only reports it, and this benchmark is where it is tracked.
"""

from __future__ import annotations

import statistics
import sys

from _harness import env_int, env_ints, redis_url, start_fake_lm
from lm_concurrency import DELAY_S, Bench, Point, run_points, table


def main() -> int:
    counts = env_ints("BENCH_SCALE", [1, 2, 3, 4])
    per_process = env_int("BENCH_SCALE_CONCURRENCY", 64)
    waves = env_int("BENCH_WAVES", 8)
    rounds = env_int("BENCH_ROUNDS", 2)
    points = [Point("dspex", per_process * k, k) for k in counts]
    server, port = start_fake_lm(DELAY_S * 1000)
    bench = Bench(redis_url(), port)
    ok = False
    try:
        print(f"fake LM: {DELAY_S * 1000:.0f} ms per call; {per_process} per process", flush=True)
        run_points(bench, points, rounds, waves)
        ok = True
    finally:
        bench.close()
        server.stop(keep_log=not ok)
    print()
    print(f"dspex.predict, worker processes x concurrency {per_process}; median of {rounds}")
    table(points)
    base = statistics.median(points[0].throughput)
    if counts[0] != 1:
        print(f"(ratios are to {counts[0]} processes, the first of BENCH_SCALE)")
    print(
        "scale ratio to 1 process: "
        + ", ".join(
            f"{p.processes} processes = {statistics.median(p.throughput) / base:.2f}x"
            for p in points
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
