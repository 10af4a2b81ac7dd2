"""What the session event log costs (DESIGN.md §8), measured in one run.

1. Write cost: ``update_variable`` with events on (the default, with the default history)
   against the same store with events off and no history, and against a raw redis-py
   ``HSET`` of the same value (the floor). Targets: events on <= 1.15x events off.
2. Watch latency: ``BENCH_WATCHERS`` (100) sessions, each watched by its own asyncio
   watcher (``SessionStore.awatch``) in a separate process; the writer stamps each value
   with the wall clock and the watcher measures write -> delivery. Target p99 <= 5 ms.
3. Memory: a session of the ten small variables, each registered and updated once, with
   its events and default history, by ``used_memory`` growth over ``BENCH_SESSIONS``
   sessions. Target <= 3 KB.

Run: ``make bench BENCH=events`` (or ``scripts/with-redis.sh .venv/bin/python
benchmarks/events.py``). Sizes: ``BENCH_WRITES`` (5000), ``BENCH_WATCHERS`` (100),
``BENCH_WATCH_WRITES`` (2000), ``BENCH_SESSIONS`` (2000).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import orjson
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import SMALL_VARIABLES, env_int, percentile, redis_url, wait_until

from dspex_tasks.store import SessionStore
from dspex_tasks.store.connection import redis_client


def _write_cost(url: str, n: int) -> None:
    raw = redis.Redis.from_url(url, decode_responses=True)
    configs = {  # (events_maxlen, variable_history)
        "events off, no history": (0, 0),
        "events on, no history": (1000, 0),
        "events off, history 10": (0, 10),
        "events on, history 10": (1000, 10),
    }
    stores = {
        label: SessionStore(
            redis_client(url),
            prefix=f"w{uuid.uuid4().hex[:6]}",
            events_maxlen=events,
            variable_history=history,
        )
        for label, (events, history) in configs.items()
    }
    for store in stores.values():
        store.create_session("w")
        store.register_variable("w", "t", "float", 0.0)
    raw_key = f"raw{uuid.uuid4().hex[:6]}"

    def timed(write: Callable[[int], object]) -> float:
        for i in range(200):  # warm the script cache and connections
            write(i)
        start = time.perf_counter()
        for i in range(n):
            write(i)
        return (time.perf_counter() - start) / n * 1e6

    rounds: dict[str, list[float]] = {"raw HSET": [], **{label: [] for label in stores}}
    for _ in range(3):  # interleaved, so drift hits every case alike
        rounds["raw HSET"].append(timed(lambda i: raw.hset(raw_key, "t", orjson.dumps(i * 0.001))))
        for label, store in stores.items():
            rounds[label].append(
                timed(lambda i, store=store: store.update_variable("w", "t", i * 0.001))
            )
    med = {k: statistics.median(v) for k, v in rounds.items()}
    print(f"1. variable write, {n:,} sequential writes x 3 rounds (median us per write)")
    for label, value in med.items():
        print(f"   {label:24} {value:7.1f} us")
    for history in ("no history", "history 10"):
        ratio = med[f"events on, {history}"] / med[f"events off, {history}"]
        print(
            f"   events on / off, {history}: {ratio:.3f}x (target <= 1.15x)"
            + ("" if ratio <= 1.15 else "  TARGET MISSED")
        )
    for store in stores.values():
        store.delete_session("w")
        store.close()
    raw.delete(raw_key)
    raw.close()


_WATCHER = r"""
import asyncio, json, sys, time
from dspex_tasks.store import SessionStore
url, prefix, n, expected = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
store = SessionStore.from_url(url, prefix=prefix)
lat = []
async def one(i, start):
    async for ev in store.awatch(f"s{i}", names=["stamp"], after=start, block_s=30):
        lat.append(time.time() - ev.data["value"])
        if len(lat) >= expected:
            return
async def main():
    starts = [store.last_event_id(f"s{i}") for i in range(n)]
    tasks = [asyncio.create_task(one(i, starts[i])) for i in range(n)]
    print("ready", flush=True)
    while len(lat) < expected:
        await asyncio.sleep(0.05)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
asyncio.run(main())
print(json.dumps(lat), flush=True)
"""


def _watch_latency(url: str, watchers: int, writes: int) -> None:
    prefix = f"wl{uuid.uuid4().hex[:6]}"
    store = SessionStore(redis_client(url), prefix=prefix)
    for i in range(watchers):
        store.create_session(f"s{i}")
        store.register_variable(f"s{i}", "stamp", "float", 0.0)
    proc = subprocess.Popen(
        [sys.executable, "-c", _WATCHER, url, prefix, str(watchers), str(writes)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    # Let every watcher reach its first blocking read: the store sees one XREAD client each.
    wait_until(
        lambda: sum(1 for c in store.redis.client_list() if c.get("cmd") == "xread") >= watchers,
        "every watcher blocking",
        timeout_s=30,
    )
    interval_s = 0.004  # ~250 writes/s over all sessions: latency, not throughput
    for k in range(writes):
        store.update_variable(f"s{k % watchers}", "stamp", time.time())
        time.sleep(interval_s)
    out, _ = proc.communicate(timeout=60)
    lat_ms = [x * 1000 for x in orjson.loads(out.strip().splitlines()[-1])]
    p99 = percentile(lat_ms, 99)
    print(
        f"2. watch latency, {watchers} sessions x 1 asyncio watcher, {len(lat_ms):,} writes: "
        f"p50 {percentile(lat_ms, 50):.2f} ms, p99 {p99:.2f} ms, max {max(lat_ms):.2f} ms "
        f"(target p99 <= 5 ms)" + ("" if p99 <= 5 else "  TARGET MISSED")
    )
    for i in range(watchers):
        store.delete_session(f"s{i}")
    store.close()


def _memory(url: str, n: int) -> None:
    r = redis.Redis.from_url(url)

    def per_session(events_maxlen: int, history: int) -> float:
        prefix = f"mem{uuid.uuid4().hex[:6]}"
        store = SessionStore(
            redis_client(url),
            prefix=prefix,
            events_maxlen=events_maxlen,
            variable_history=history,
        )
        time.sleep(0.2)
        before = int(r.info("memory")["used_memory"])
        for i in range(n):
            sid = f"m{i}"
            store.create_session(sid)
            for name, kind, value, cons in SMALL_VARIABLES:
                store.register_variable(sid, name, kind, value, constraints=cons)
            for name, _kind, value, _cons in SMALL_VARIABLES:
                store.update_variable(sid, name, value)
        after = int(r.info("memory")["used_memory"])
        for i in range(n):
            store.delete_session(f"m{i}")
        store.close()
        return (after - before) / n

    with_events = per_session(1000, 10)
    without = per_session(0, 0)
    print(
        f"3. memory per session (10 small variables, each registered and updated once), "
        f"{n:,} sessions: {with_events:,.0f} B with events + default history, "
        f"{without:,.0f} B with neither (target <= 3,072 B)"
        + ("" if with_events <= 3072 else "  TARGET MISSED")
    )
    r.close()


def main() -> int:
    url = redis_url()
    _write_cost(url, env_int("BENCH_WRITES", 5000))
    _watch_latency(url, env_int("BENCH_WATCHERS", 100), env_int("BENCH_WATCH_WRITES", 2000))
    _memory(url, env_int("BENCH_SESSIONS", 2000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
