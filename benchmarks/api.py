"""The HTTP API (``dspex-tasks api``): start-run latency under 50 clients, SSE token
delivery, and requests/s against a bare FastAPI endpoint, all in one run.

Servers run in their own processes (uvicorn, loopback, bearer tokens on for the API);
the load comes from this process through a minimal HTTP/1.1 client on raw asyncio
sockets (keep-alive, one connection per client), so the client's own cost stays small
next to the servers'. No worker runs: runs stay queued, which is what the 202 measures.

1. ``POST /v1/sessions/{sid}/runs`` -> 202 with ``BENCH_API_CLIENTS`` (50) clients, each
   on its own session and connection:
   - paced: every client sends 1, then ``BENCH_API_RATE`` (4) requests/s at random
     (Poisson) times (an open loop: the latency of a request, not of a queue the
     benchmark builds); target p99 <= 10 ms;
   - saturated: every client sends its next request as soon as the last one is answered
     (a closed loop: throughput, and latency = clients / throughput).
2. SSE delivery: tokens appended to a run's stream (``store.append_run_stream``, as a
   worker does) one at a time, ``BENCH_API_TOKENS`` (300) of them, read by
   ``BENCH_API_STREAMS`` (1, then 20) clients of ``GET /v1/runs/{id}/stream``; the time
   from the append's start to the event at each reader. Target p99 <= 10 ms.
3. Requests/s, saturated, of the start-run route against a bare FastAPI endpoint doing
   one Redis call (``_bare_api.py``, same uvicorn options), ``BENCH_ROUNDS`` (3) rounds
   alternating the order; the ratio of the medians is printed last.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (
    ROOT,
    Proc,
    cpu_seconds,
    env_int,
    med_spread,
    percentile,
    redis_url,
    wait_until,
)

from dspex_tasks.settings import Settings
from dspex_tasks.store import SessionStore

SIG = "question -> answer"
TOKEN = "bench-token-" + uuid.uuid4().hex


class Conn:
    """One keep-alive HTTP/1.1 connection: request bytes in, (status, body) out."""

    def __init__(
        self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.port, self.reader, self.writer = port, reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(port, reader, writer)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise
            # The server closed the connection while it was idle (uvicorn's keep-alive
            # timeout, 5 s: a paced client's gap can be longer): reconnect, send again,
            # as any HTTP client does; the reconnect counts in this request's latency.
            self.writer.close()
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.writer.write(raw)
            head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def post(path: str, body: Any, *, auth: bool) -> bytes:
    data = orjson.dumps(body)
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
    ]
    if auth:
        lines.append(f"Authorization: Bearer {TOKEN}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def start_run_request(sid: str) -> bytes:
    body = {"task": "predict", "signature": SIG, "inputs": {"question": "q"}}
    return post(f"/v1/sessions/{sid}/runs", body, auth=True)


async def _clients(
    port: int, requests: list[bytes], *, rate: float | None, seconds: float, expect: int
) -> tuple[list[float], float]:
    """Each request in ``requests`` is one client's (sent again and again). Returns the
    latencies (ms) and the wall time."""
    conns = [await Conn.open(port) for _ in requests]
    latencies: list[float] = []
    start = time.perf_counter()
    deadline = start + seconds

    async def client(conn: Conn, raw: bytes) -> None:
        rng = random.Random()
        next_at = time.perf_counter() + (rng.random() / rate if rate else 0)
        while next_at < deadline:
            if rate:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            t0 = time.perf_counter()
            status, body = await conn.request(raw)
            latencies.append((time.perf_counter() - t0) * 1000)
            if status != expect:
                raise SystemExit(f"unexpected {status}: {body[:300]!r}")
            next_at = (next_at + rng.expovariate(rate)) if rate else time.perf_counter()

    try:
        await asyncio.gather(*(client(c, r) for c, r in zip(conns, requests, strict=True)))
    finally:
        for c in conns:
            c.close()
    return latencies, time.perf_counter() - start


def load(
    port: int, requests: list[bytes], *, rate: float | None, seconds: float, expect: int
) -> tuple[list[float], float]:
    return asyncio.run(_clients(port, requests, rate=rate, seconds=seconds, expect=expect))


# --- SSE delivery ----------------------------------------------------------------------


async def _sse_delivery(
    port: int, store: SessionStore, sid: str, streams: int, tokens: int
) -> list[float]:
    run_id = str(uuid.uuid4())
    store.index_run(run_id, sid, keep_s=600)
    store.append_run_stream(sid, run_id, [("status", b'{"step":"start"}')], keep_s=600)
    request = (
        f"GET /v1/runs/{run_id}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {TOKEN}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()
    sent: dict[int, float] = {}
    delays: list[float] = []
    ready = 0
    all_ready = asyncio.Event()

    async def reader() -> None:
        nonlocal ready
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(request)
        await r.readuntil(b"\r\n\r\n")
        counted = False
        try:
            while True:
                line = await r.readline()
                if line.startswith(b"event: status") and not counted:
                    counted = True
                    ready += 1
                    if ready == streams:
                        all_ready.set()
                elif line.startswith(b'data: {"field"'):
                    at = time.perf_counter()
                    n = orjson.loads(line[6:])["n"]
                    delays.append((at - sent[n]) * 1000)
                elif line.startswith(b"event: done"):
                    return
        finally:
            w.close()

    tasks = [asyncio.create_task(reader()) for _ in range(streams)]
    await asyncio.wait_for(all_ready.wait(), 30)
    loop = asyncio.get_running_loop()
    for n in range(tokens):
        data = orjson.dumps({"field": "answer", "delta": f"w{n} ", "n": n})
        sent[n] = time.perf_counter()
        # The writer is a worker elsewhere: in a thread, so this loop keeps reading.
        await loop.run_in_executor(
            None, lambda d=data: store.append_run_stream(sid, run_id, [("token", d)], keep_s=600)
        )
        await asyncio.sleep(0.005 + random.random() * 0.01)
    store.append_run_stream(sid, run_id, [("done", b"{}")], keep_s=600)
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    return delays


# --- processes ---------------------------------------------------------------------------


def healthy(port: int) -> bool:
    async def probe() -> bool:
        try:
            conn = await Conn.open(port)
        except OSError:
            return False
        try:
            status, _ = await conn.request(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            return status == 200
        finally:
            conn.close()

    return asyncio.run(probe())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    url = redis_url()
    clients = env_int("BENCH_API_CLIENTS", 50)
    rate = float(os.environ.get("BENCH_API_RATE", "4"))
    seconds = float(env_int("BENCH_API_SECONDS", 10))
    rounds = env_int("BENCH_ROUNDS", 3)
    tokens = env_int("BENCH_API_TOKENS", 300)
    prefix = f"ba{uuid.uuid4().hex[:6]}"
    env = {
        "DSPEX_REDIS_URL": url,
        "DSPEX_KEY_PREFIX": prefix,
        "DSPEX_API_TOKENS": hashlib.sha256(TOKEN.encode()).hexdigest(),
    }
    api_port, bare_port = free_port(), free_port()
    api = Proc(
        "api",
        [sys.executable, "-m", "dspex_tasks.cli", "api", "--port", str(api_port)],
        env={**env, "PYTHONPATH": str(ROOT)},
    )
    bare = Proc(
        "bare", [sys.executable, str(ROOT / "benchmarks" / "_bare_api.py"), url, str(bare_port)]
    )
    store = SessionStore.from_settings(Settings.from_env(env))
    ok = False
    try:
        wait_until(lambda: healthy(api_port), "the API")
        wait_until(lambda: healthy(bare_port), "the bare endpoint")
        sids = [f"bench-{i}" for i in range(clients)]
        for sid in sids:
            store.create_session(sid)
        runs = [start_run_request(sid) for sid in sids]
        bare_requests = [post("/bare", {"k": i}, auth=False) for i in range(clients)]
        load(api_port, runs[:5], rate=None, seconds=1, expect=202)  # warm-up
        load(bare_port, bare_requests[:5], rate=None, seconds=1, expect=200)

        print(f"api benchmark: {clients} clients on loopback, {seconds:g} s per measure")
        for each in sorted({1.0, rate}):
            paced, _ = load(api_port, runs, rate=each, seconds=seconds, expect=202)
            print(
                f"  POST runs -> 202, paced ({clients} x {each:g}/s, {len(paced)} requests): "
                f"p50 {percentile(paced, 50):.2f} ms, p99 {percentile(paced, 99):.2f} ms, "
                f"max {max(paced):.1f} ms  (target p99 <= 10 ms)"
            )

        for streams in (1, 20):
            delays = asyncio.run(_sse_delivery(api_port, store, sids[0], streams, tokens))
            print(
                f"  SSE token delivery, {streams} stream(s), {len(delays)} events: "
                f"p50 {percentile(delays, 50):.2f} ms, p99 {percentile(delays, 99):.2f} ms, "
                f"max {max(delays):.1f} ms  (target p99 <= 10 ms)"
            )

        ours: list[float] = []
        base: list[float] = []
        cpu: dict[str, list[float]] = {"api": [], "bare": []}
        closed_p50: list[float] = []
        closed_p99: list[float] = []
        procs = {"api": api, "bare": bare}
        for r in range(rounds):
            order = [("api", api_port, runs, 202), ("bare", bare_port, bare_requests, 200)]
            for name, port, requests, expect in order if r % 2 == 0 else order[::-1]:
                cpu_before = cpu_seconds(procs[name].tree())
                lat, wall = load(port, requests, rate=None, seconds=seconds, expect=expect)
                cpu[name].append((cpu_seconds(procs[name].tree()) - cpu_before) / len(lat) * 1000)
                (ours if name == "api" else base).append(len(lat) / wall)
                if name == "api":
                    closed_p50.append(percentile(lat, 50))
                    closed_p99.append(percentile(lat, 99))
        print(
            f"  POST runs, saturated: {med_spread(ours)} req/s, "
            f"p50 {med_spread(closed_p50, '.1f')} ms, p99 {med_spread(closed_p99, '.1f')} ms, "
            f"server CPU {med_spread(cpu['api'], '.2f')} ms/request"
        )
        print(
            f"  bare FastAPI + one Redis call, saturated: {med_spread(base)} req/s, "
            f"server CPU {med_spread(cpu['bare'], '.2f')} ms/request"
        )
        ratio = statistics.median(ours) / statistics.median(base)
        print(f"  start-run / bare throughput: {ratio:.2f}x  ({rounds} rounds, medians)")
        ok = True
    finally:
        store.close()
        api.stop(keep_log=not ok)
        bare.stop(keep_log=not ok)


if __name__ == "__main__":
    main()
