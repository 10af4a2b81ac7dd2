"""LM traffic control: the limiter's cost per call when not saturated, and a cache hit's
worker CPU against an uncached call, each against its baseline in the same run.

    scripts/with-redis.sh .venv/bin/python benchmarks/lm_traffic.py

The fake OpenAI endpoint (``tests/fake_openai.py``, 0 ms delay) runs in its own process,
so its CPU is not counted. Both measurements go through the real client path
(``dspy.LM("openai/bench", api_base=...)`` built by the worker's LMRegistry).

  limiter   N x ROUNDS sequential LM calls, alternating call by call between a profile
            without limits (the baseline) and the same profile with limits far from
            saturation (rpm 10^6, tpm 10^9, concurrency 1000): overhead = the difference
            of the median call times; the two Redis round trips (reserve, settle) are
            also timed alone. Target <= 0.3 ms. The call waits for the reserve only:
            the settle goes out from a background thread (``lm/limits.py`` Settler); a
            third side, rotated with the other two, waits for the settle on the call
            path (as before the settler) for comparison.
  cache     ``Runtime.run`` of a predict task (the worker's whole task body: claim,
            session, LM, result, finish record) on a profile with a cache: process CPU
            per task of cache misses (fresh questions, the LM is called) against hits
            (questions answered before). Target <= 0.5x.

Rounds alternate the two sides; figures are medians over ROUNDS.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
N = int(os.environ.get("BENCH_N", "300"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))


def start_fake() -> tuple[subprocess.Popen[bytes], str]:
    port_file = Path(tempfile.mkdtemp()) / "port"
    proc = subprocess.Popen(
        [
            *(sys.executable, str(ROOT / "tests" / "fake_openai.py")),
            *("--delay-ms", "0", "--port-file", str(port_file)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while not port_file.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("the fake LM did not start")
        time.sleep(0.02)
    return proc, f"http://127.0.0.1:{port_file.read_text()}/v1"


def profiles(base_url: str) -> dict[str, Any]:
    common = {
        "model": "openai/bench",
        "api_base": base_url,
        "api_key_env": "BENCH_KEY",
        "params": {"max_tokens": 16},
    }
    return {
        "plain": common,
        "limited": {
            **common,
            "limits": {"rpm": 1_000_000, "tpm": 1_000_000_000, "concurrency": 1000},
        },
        "cached": {**common, "cache": {"ttl_s": 600}},
    }


def main() -> None:
    from dspex_tasks.runtime import Runtime
    from dspex_tasks.settings import Settings

    url = os.environ.get("DSPEX_TEST_REDIS_URL")
    if not url:
        raise SystemExit("DSPEX_TEST_REDIS_URL is not set: run under scripts/with-redis.sh")
    os.environ["BENCH_KEY"] = "bench-key"
    fake, base_url = start_fake()
    try:
        settings = Settings.from_env(
            environ={"DSPEX_LM_PROFILES": json.dumps(profiles(base_url))},
            redis_url=url,
            key_prefix=f"bench{uuid.uuid4().hex[:6]}",
        )
        rt = Runtime(settings)
        limiter_figures(rt)
        cache_figures(rt)
        rt.store.close()
    finally:
        fake.terminate()
        fake.wait(10)


def _call_times(lm: Any, n: int) -> list[float]:
    times = []
    for _ in range(n):
        text = f"q {uuid.uuid4().hex}"  # fresh: DSPy's process cache never answers
        t = time.perf_counter()
        lm(messages=[{"role": "user", "content": text}])
        times.append(time.perf_counter() - t)
    return times


def limiter_figures(rt: Any) -> None:
    plain = rt.lms.resolve({"profile": "plain"}, {})
    limited = rt.lms.resolve({"profile": "limited"}, {})
    limiter = rt.lms.traffic.limiters["limited"]
    settler = limiter.settler
    _call_times(plain, 20)
    _call_times(limited, 20)
    base: list[float] = []
    lim: list[float] = []
    waited: list[float] = []  # the settle waited for on the call path (before the settler)

    def sync_settle(n: int) -> list[float]:
        limiter.settler = None
        try:
            return _call_times(limited, n)
        finally:
            limiter.settler = settler

    sides: list[tuple[Any, list[float]]] = [
        (lambda: _call_times(plain, 1), base),
        (lambda: _call_times(limited, 1), lim),
        (lambda: sync_settle(1), waited),
    ]
    for i in range(N * ROUNDS):  # call by call, rotating: noise hits every side alike
        for k in range(3):
            run, out = sides[(i + k) % 3]
            out.extend(run())
    trips = []
    for _ in range(N):
        t = time.perf_counter()
        turn = limiter.reserve(10, time.monotonic() + 5)
        # The settle as the settler thread sends it, but waited for here.
        limiter._settle(keys=limiter.keys, args=[turn.lease_id, 10**9, 0, 0])
        limiter.renewer.drop(turn.lease_id)
        trips.append(time.perf_counter() - t)
    ping = []
    client: redis.Redis = rt.store.redis
    for _ in range(N):
        t = time.perf_counter()
        client.ping()
        ping.append(time.perf_counter() - t)
    idle_ping = []  # what one round trip costs between LM calls: Redis was idle a while
    for _ in range(N):
        time.sleep(0.001)
        t = time.perf_counter()
        client.ping()
        idle_ping.append(time.perf_counter() - t)
    b, m = statistics.median(base), statistics.median(lim)
    print(f"limiter, not saturated ({N * ROUNDS} alternating calls per side, medians)")
    print(f"  call without limits   {b * 1000:7.3f} ms")
    print(f"  call with limits      {m * 1000:7.3f} ms")
    print(f"  overhead per call     {(m - b) * 1000:7.3f} ms   (target <= 0.3 ms)")
    w = statistics.median(waited)
    print(f"  ... settle waited for {(w - b) * 1000:7.3f} ms   (the call path before the settler)")
    print(
        f"  reserve + settle      {statistics.median(trips) * 1000:7.3f} ms   "
        f"(2 round trips in a tight loop; one PING: {statistics.median(ping) * 1000:.3f} ms)"
    )
    print(
        f"  one PING after 1 ms idle {statistics.median(idle_ping) * 1000:5.3f} ms   "
        "(a round trip between LM calls costs this, not the tight-loop figure)"
    )
    print("  (the settle is sent by a background thread: a call waits for the reserve only)")


def _task_cpu(rt: Any, sid: str, spec: Any, questions: list[str]) -> float:
    cpu = time.process_time()
    for q in questions:
        rt.run(str(uuid.uuid4()), sid, spec, {"question": q})
    return (time.process_time() - cpu) / len(questions)


def cache_figures(rt: Any) -> None:
    sid = f"bench-{uuid.uuid4().hex[:8]}"
    rt.store.create_session(sid)
    rt.store.set_session_lm(sid, profile="cached")
    spec = rt.spec_for("predict", "question -> answer")
    answered = [f"hot {i} {uuid.uuid4().hex}" for i in range(N)]
    _task_cpu(rt, sid, spec, answered)  # now cached
    _task_cpu(rt, sid, spec, [f"warm {uuid.uuid4().hex}" for _ in range(20)])
    miss: list[float] = []
    hit: list[float] = []
    for r in range(ROUNDS):
        fresh = [f"cold {uuid.uuid4().hex}" for _ in range(N)]
        sides = [(fresh, miss), (answered, hit)]
        for qs, out in sides if r % 2 == 0 else reversed(sides):
            out.append(_task_cpu(rt, sid, spec, qs))
    m, h = statistics.median(miss), statistics.median(hit)
    print(f"cache (Runtime.run of dspex.predict, {N} tasks x {ROUNDS} rounds, medians)")
    print(f"  worker CPU, uncached  {m * 1000:7.3f} ms/task")
    print(f"  worker CPU, cache hit {h * 1000:7.3f} ms/task")
    print(f"  hit / uncached        {h / m:7.2f} x      (target <= 0.5x)")
    usage = rt.store.usage(sid)
    print(f"  session usage         {usage}")


if __name__ == "__main__":
    main()
