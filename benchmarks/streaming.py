"""Streaming: time to first token at the producer, and the worker CPU a stream costs.

One run, against the fake OpenAI-compatible endpoint in its own process (SSE, one chunk
per word) and the test Redis:

* **Time to first token**: streamed Predict runs, one at a time, each watched by a
  reader (``store.watch_run_stream``, what ``TaskHandle.stream`` uses) in this process;
  the first ``token`` event's arrival at the reader minus the moment the fake LM wrote
  its first chunk (both wall clocks of this host). Target: p99 <= 50 ms.
* **Worker CPU**: the process CPU (every thread: the run's and the stream writer's) of
  ``Runtime.run`` for a 200-word answer, streamed vs not, interleaved. Target: <= 1.3x.
  Also measured: the streamed run with the chunk sink a no-op (DSPy's own streaming
  client, its SSE decoding and per-chunk objects, with nothing of ours per chunk): the
  floor any streaming built on DSPy's client pays.

Runs ``Runtime.run`` in-process (no broker hop, which is the same for both variants).
``DSPEX_BENCH_STREAM_RUNS`` (default 40) runs per measurement.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import env_int, percentile, redis_url, start_fake_lm

from dspex_tasks import streaming
from dspex_tasks.lm import LMRegistry
from dspex_tasks.runtime import Runtime
from dspex_tasks.settings import LMProfileConfig, Settings

KEY_ENV = "DSPEX_BENCH_FAKE_KEY"


def first_chunks(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_fake/calls") as reply:
        calls = orjson.loads(reply.read())["calls"]
    return {c["marker"]: c["first_chunk"] for c in calls if c["marker"] and c["first_chunk"]}


def main() -> None:
    runs = env_int("DSPEX_BENCH_STREAM_RUNS", 40)
    os.environ[KEY_ENV] = "sk-bench"
    proc, port = start_fake_lm(delay_ms=20)
    try:
        settings = Settings.from_env(
            environ={}, redis_url=redis_url(), key_prefix=f"bs{uuid.uuid4().hex[:6]}"
        )
        profile = LMProfileConfig(
            name="default",
            model="openai/fake-model",
            api_base=f"http://127.0.0.1:{port}/v1",
            api_key_env=KEY_ENV,
        )
        runtime = Runtime(settings, lms=LMRegistry({"default": profile}))
        store = runtime.store
        sid = f"bench-{uuid.uuid4().hex[:8]}"
        store.create_session(sid, ttl_s=3600)
        spec = runtime.spec_for("predict", "question -> answer")

        def run(marker: str, words: int, stream: bool) -> float:
            inputs = {"question": f"q WORDS[{words}] MARK[{marker}]"}
            started = time.process_time()
            runtime.run(uuid.uuid4().hex, sid, spec, inputs, {"stream": True} if stream else None)
            return time.process_time() - started

        for n in range(5):  # warm up: connections, caches, imports
            run(f"warm{n}", 200, True)
            run(f"warmu{n}", 200, False)

        # --- time to first token -----------------------------------------------------
        arrivals: dict[str, float] = {}
        for n in range(runs):
            marker, run_id = f"t{n}", uuid.uuid4().hex
            ready = threading.Event()

            def read(
                marker: str = marker, run_id: str = run_id, ready: threading.Event = ready
            ) -> None:
                events = store.watch_run_stream(sid, run_id, block_s=30)
                ready.set()
                for event in events:
                    if event.type == "token":
                        arrivals[marker] = time.time()
                        break

            reader = threading.Thread(target=read)
            reader.start()
            ready.wait()
            inputs = {"question": f"q WORDS[50] MARK[{marker}]"}
            runtime.run(run_id, sid, spec, inputs, {"stream": True})
            reader.join()
        chunks = first_chunks(port)
        ttft = [(arrivals[m] - chunks[m]) * 1000 for m in arrivals if m in chunks]

        # --- worker CPU, streamed vs not ---------------------------------------------
        plain, streamed, floor = [], [], []
        sink_send = streaming._ChunkSink.send

        async def no_op(self: streaming._ChunkSink, chunk: object) -> None:
            return None

        for n in range(runs):
            plain.append(run(f"cu{n}", 200, False))
            streamed.append(run(f"cs{n}", 200, True))
            streaming._ChunkSink.send = no_op  # type: ignore[method-assign]
            try:
                floor.append(run(f"cf{n}", 200, True))
            finally:
                streaming._ChunkSink.send = sink_send  # type: ignore[method-assign]
        ratio = statistics.median(streamed) / statistics.median(plain)
        floor_ms = statistics.median(floor) * 1000

        print(f"streaming benchmark ({runs} runs each; fake LM SSE, one chunk per word)")
        print(
            f"  time to first token after the LM's first chunk: p50 {percentile(ttft, 50):.1f} ms, "
            f"p99 {percentile(ttft, 99):.1f} ms, max {max(ttft):.1f} ms  (target p99 <= 50 ms)"
        )
        plain_ms, streamed_ms = statistics.median(plain) * 1000, statistics.median(streamed) * 1000
        print(
            f"  worker CPU per 200-word Predict: unstreamed {plain_ms:.1f} ms, "
            f"streamed {streamed_ms:.1f} ms: {ratio:.2f}x  (target <= 1.3x)"
        )
        print(
            f"  of which DSPy's streaming client alone (chunk sink a no-op): {floor_ms:.1f} ms "
            f"({floor_ms / plain_ms:.2f}x); ours per 200 chunks: {streamed_ms - floor_ms:.1f} ms"
        )
        store.delete_session(sid)
        store.close()
    finally:
        proc.stop()


if __name__ == "__main__":
    main()
