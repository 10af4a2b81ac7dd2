"""Expiry at scale: 100,000 sessions (10 variables and 1 program each) expire and are swept.

    scripts/with-redis.sh .venv/bin/python benchmarks/expiry.py   (or: make bench)

Seeds BENCH_SESSIONS sessions (default 100,000) with a 1 s TTL: each gets 10 typed
variables and one stored program. Seeding sends the store's own Lua scripts
(CREATE_SESSION, REGISTER_VARIABLES, PROGRAM_OP) with the arguments the public API
builds, pipelined 500 sessions at a time, so the data is byte-for-byte what
``create_session`` / ``import_variables`` / ``store_program`` write (checked against a
session made through the API), only faster to produce. Then, once every deadline has
passed, ``SessionStore.expire_sessions()`` -- the function the beat task
``dspex.expire_sessions`` runs -- sweeps them all.

Reported: sessions expired per second by the sweep; keys left under the prefix and the
expiry index size afterwards; Redis ``used_memory`` after the sweep against the baseline
taken before seeding (after one warm-up create + sweep cycle, with idle client buffers
dropped; Redis shrinks its emptied key tables from its cron, so each reading waits until
used_memory stops falling, up to 20 s). Baseline in the same run: the same sessions
seeded again and deleted with raw pipelined ``DEL`` of their four keys plus ``ZREM``
from the index, in batches of 500 -- what deleting them costs with no deadline re-check
and no counting.

Targets: >= 20,000 sessions/s swept; 0 keys left; used_memory within 5 % of baseline.
BENCH_SESSIONS sets the size (BENCH_BASELINE=0 skips the raw-DEL baseline).
"""

from __future__ import annotations

import sys
import time
import uuid
from typing import Any

import redis
from _harness import SMALL_VARIABLES, env_int, redis_url

from dspex_tasks.store import SessionStore, redis_client

BATCH = 500
TTL_S = 1.0
PROGRAM = {"module": "predict", "signature": "question, context -> answer", "config": {}}


def used_memory(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


class Seeder:
    """Writes sessions with the store's scripts and the API's own argument builders."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store
        prepared = [
            store._prepare_registration(name, kind, value, cons, None, None)
            for name, kind, value, cons in SMALL_VARIABLES
        ]
        self.register_args: list[Any] = [len(prepared)]
        for item in prepared:
            self.register_args.extend(item)
        self.program = store._spec_json("qa", PROGRAM)
        self.scripts = store._scripts

    def seed(self, sids: list[str]) -> None:
        s, keys = self.store, self.store.keys
        ttl_ms = int(TTL_S * 1000)
        for start in range(0, len(sids), BATCH):
            pipe = s.redis.pipeline(transaction=False)
            for sid in sids[start : start + BATCH]:
                session_keys = keys.session_keys(sid)
                self.scripts["CREATE_SESSION"](
                    keys=[*session_keys, keys.sessions, keys.stats],
                    args=[s.grace_ms, "0", sid, ttl_ms, b"{}", "0", s.max_sessions or 0],
                    client=pipe,
                )
                self.scripts["REGISTER_VARIABLES"](
                    keys=session_keys, args=[s.grace_ms, "1", *self.register_args], client=pipe
                )
                self.scripts["PROGRAM_OP"](
                    keys=session_keys,
                    args=[s.grace_ms, "1", "put", "qa", self.program],
                    client=pipe,
                )
            for reply in pipe.execute():
                if reply[0] != "ok":
                    raise SystemExit(f"seeding failed: {reply}")


def key_count(r: redis.Redis, prefix: str) -> int:
    return sum(1 for _ in r.scan_iter(match=f"{prefix}:s:*", count=1000))


def check_same_as_api(store: SessionStore, seeder: Seeder, raw: redis.Redis) -> None:
    """A seeded session holds exactly the keys and fields of one made through the API."""
    api, seeded = f"api-{uuid.uuid4().hex[:6]}", f"seeded-{uuid.uuid4().hex[:6]}"
    store.create_session(api, ttl_s=TTL_S)
    store.import_variables(
        api,
        {
            "variables": [
                {"name": n, "type": t, "value": v, "constraints": c}
                for n, t, v, c in SMALL_VARIABLES
            ]
        },
    )
    store.store_program(api, "qa", PROGRAM)
    seeder.seed([seeded])

    def shape(sid: str) -> list[Any]:
        out = []
        for key in store.keys.session_keys(sid):
            kind = raw.type(key)
            fields = sorted(raw.hkeys(key)) if kind == b"hash" else []
            out.append((kind, len(fields), [f.split(b":")[0] for f in fields]))
        return out

    if shape(api) != shape(seeded):
        raise SystemExit(f"seeded session differs from the API's: {shape(api)} != {shape(seeded)}")
    store.delete_session(api)
    store.delete_session(seeded)


def settle(r: redis.Redis, timeout_s: float = 20) -> int:
    """used_memory once it stops falling (Redis shrinks emptied tables from its cron).

    Stable means no drop over the last 2 s; gives up after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    samples = [used_memory(r)]
    while time.monotonic() < deadline:
        time.sleep(0.5)
        samples.append(used_memory(r))
        if len(samples) >= 5 and min(samples[-4:]) >= samples[-5]:
            break
    return min(samples[-4:])


def main() -> int:
    n = env_int("BENCH_SESSIONS", 100_000)
    with_baseline = env_int("BENCH_BASELINE", 1) != 0
    url = redis_url()
    raw = redis.Redis.from_url(url)
    prefix = f"exp{uuid.uuid4().hex[:6]}"
    store = SessionStore(redis_client(url), prefix=prefix, default_ttl_s=3600)
    seeder = Seeder(store)
    check_same_as_api(store, seeder, raw)
    store.expire_sessions()  # loads the sweep's scripts and creates the stats hash
    run = uuid.uuid4().hex[:6]

    results: dict[str, Any] = {}
    if with_baseline:
        sids = [f"b-{run}-{i}" for i in range(n)]
        started = time.perf_counter()
        seeder.seed(sids)
        seeded_s = time.perf_counter() - started
        time.sleep(TTL_S + 0.1)
        started = time.perf_counter()
        for at in range(0, n, BATCH):
            pipe = raw.pipeline(transaction=False)
            chunk = sids[at : at + BATCH]
            for sid in chunk:
                pipe.delete(*store.keys.session_keys(sid))
            pipe.zrem(store.keys.sessions, *chunk)
            pipe.execute()
        results["raw"] = n / (time.perf_counter() - started)
        print(f"baseline: seeded {n} in {seeded_s:.1f} s; raw DEL {results['raw']:,.0f}/s")

    # Warm-up cycle, so the baseline is a Redis that has expired sessions before. (A mass
    # create + sweep still leaves ~50 KB of used_memory that is not data -- the only key
    # left is the stats hash -- and that does not grow on later cycles.)
    warm = [f"w-{run}-{i}" for i in range(2000)]
    seeder.seed(warm)
    time.sleep(TTL_S + 0.1)
    store.expire_sessions()
    # Idle connections keep the buffers of their last big pipeline: drop them so that
    # used_memory shows the data (the same before and after).
    store.redis.connection_pool.disconnect()
    raw.connection_pool.disconnect()
    baseline_memory = settle(raw)
    sids = [f"s-{run}-{i}" for i in range(n)]
    started = time.perf_counter()
    seeder.seed(sids)
    seeded_s = time.perf_counter() - started
    peak = used_memory(raw)
    print(
        f"seeded {n:,} sessions (10 variables + 1 program each) in {seeded_s:.1f} s "
        f"({n / seeded_s:,.0f}/s); used_memory {baseline_memory / 2**20:.1f} MB -> "
        f"{peak / 2**20:.1f} MB",
        flush=True,
    )
    time.sleep(TTL_S + 0.1)  # every deadline has passed; native expiry is 300 s later
    started = time.perf_counter()
    expired = store.expire_sessions()
    swept_s = time.perf_counter() - started
    rate = expired / swept_s
    left = key_count(raw, prefix)
    indexed = raw.zcard(store.keys.sessions)
    store.redis.connection_pool.disconnect()
    raw.connection_pool.disconnect()
    after = settle(raw)
    drift = (after - baseline_memory) / baseline_memory
    store.close()
    raw.close()

    print()
    print(f"sweep: {expired:,} sessions expired in {swept_s:.2f} s = {rate:,.0f} sessions/s")
    print(f"left: {left} keys under {prefix}:s:*, {indexed} index entries")
    print(
        f"used_memory: baseline {baseline_memory:,} B, peak {peak:,} B, after sweep "
        f"{after:,} B ({drift:+.1%})"
    )
    met = rate >= 20_000 and left == 0 and indexed == 0 and abs(drift) <= 0.05 and expired == n
    ratio = f"; ratio sweep / raw DEL: {rate / results['raw']:.2f}x" if "raw" in results else ""
    print(
        f"expired/s {rate:,.0f} (target >= 20,000), keys left {left} (target 0), memory "
        f"{drift:+.1%} (target within 5%){ratio}"
        + ("  (targets met)" if met else "  (TARGET MISSED)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
