"""Redis memory per session: 10 small variables, and one 768-float embedding.

    scripts/with-redis.sh .venv/bin/python benchmarks/memory.py   (or: make bench)

Each case creates BENCH_SESSIONS sessions (default 2,000) through the public API and
divides the growth of Redis ``used_memory`` by their number, so every byte a session
costs counts: its record, its variables hash, its expiry-index entry, key and expiry
overhead. Baselines in the same run, same method: the same values written raw -- one
Redis hash per session holding ``name -> JSON value`` (10 small variables), or one
string per session holding the embedding as a JSON list -- i.e. what the data costs with
no types, versions, timestamps or index. ``MEMORY USAGE`` of one session's keys is
shown too.

Targets: <= 2 KB per session with 10 small variables; the embedding case is reported
(the store packs embeddings as base64 float32 / float64 inside its JSON).
"""

from __future__ import annotations

import random
import struct
import sys
import time
import uuid
from collections.abc import Callable

import orjson
import redis
from _harness import SMALL_VARIABLES, env_int, redis_url

from dspex_tasks.store import SessionStore, redis_client


def embedding(seed: int) -> list[float]:
    """768 model-like numbers: float32 values, as an embedding API returns them."""
    rng = random.Random(seed)
    return [float(struct.unpack("f", struct.pack("f", rng.gauss(0, 0.05)))[0]) for _ in range(768)]


def used(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


def per_item(
    r: redis.Redis, n: int, write: Callable[[int], None], cleanup: Callable[[], None]
) -> float:
    """Bytes of used_memory per item written by ``write(i)`` for i < n."""
    cleanup()
    time.sleep(0.2)
    before = used(r)
    for i in range(n):
        write(i)
    after = used(r)
    return (after - before) / n


def main() -> int:
    n = env_int("BENCH_SESSIONS", 2000)
    url = redis_url()
    r = redis.Redis.from_url(url)
    prefix = f"mem{uuid.uuid4().hex[:6]}"
    # The variable layout alone: the event log and history are measured in events.py.
    store = SessionStore(
        redis_client(url),
        prefix=prefix,
        default_ttl_s=3600,
        events_maxlen=0,
        variable_history=0,
    )
    run = uuid.uuid4().hex[:6]
    document = {
        "variables": [
            {"name": name, "type": kind, "value": value, "constraints": cons}
            for name, kind, value, cons in SMALL_VARIABLES
        ]
    }
    vectors = [embedding(i) for i in range(min(n, 50))]

    def wipe() -> None:
        for pattern in (f"{prefix}:*", f"raw{run}:*"):
            keys = list(r.scan_iter(match=pattern, count=1000))
            for at in range(0, len(keys), 1000):
                r.delete(*keys[at : at + 1000])

    def small(i: int) -> None:
        sid = f"m-{run}-{i}"
        store.create_session(sid)
        store.import_variables(sid, document)

    def small_raw(i: int) -> None:
        r.hset(
            f"raw{run}:{i}",
            mapping={name: orjson.dumps(value) for name, _, value, _ in SMALL_VARIABLES},
        )

    def emb(i: int) -> None:
        sid = f"e-{run}-{i}"
        store.create_session(sid)
        store.register_variable(sid, "embedding", "embedding", vectors[i % len(vectors)])

    def emb_raw(i: int) -> None:
        r.set(f"raw{run}:{i}", orjson.dumps(vectors[i % len(vectors)]))

    rows = [
        ("10 small variables", per_item(r, n, small, wipe), per_item(r, n, small_raw, wipe)),
        ("1 embedding (768 floats)", per_item(r, n, emb, wipe), per_item(r, n, emb_raw, wipe)),
    ]
    wipe()
    sample = f"s-{run}"
    small_sample = sample + "-small"
    store.create_session(small_sample)
    store.import_variables(small_sample, document)
    breakdown = {
        key.split(":s:")[-1]: (r.memory_usage(key, samples=0), r.object("encoding", key))
        for key in store.keys.session_keys(small_sample)
        if r.exists(key)
    }
    store.delete_session(small_sample)
    store.close()
    r.close()

    print(f"Redis memory per session, {n:,} sessions per case (used_memory growth / n)")
    print(f"{'case':28} {'dspex B':>9} {'raw B':>9} {'ratio':>7}")
    for label, dspex_b, raw_b in rows:
        print(f"{label:28} {dspex_b:9,.0f} {raw_b:9,.0f} {dspex_b / raw_b:6.2f}x")
    print(
        "one session with 10 small variables, MEMORY USAGE: "
        + ", ".join(
            f"{name} {size} B ({(enc or b'').decode()})" for name, (size, enc) in breakdown.items()
        )
    )
    small_b = rows[0][1]
    print(
        f"bytes per session: 10 small variables {small_b:,.0f} B (target <= 2,048), "
        f"1 embedding {rows[1][1]:,.0f} B ({rows[1][1] / rows[1][2]:.2f}x its JSON list)"
        + ("  (targets met)" if small_b <= 2048 else "  (TARGET MISSED)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
