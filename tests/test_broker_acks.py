"""The worker's batched acknowledgements (``workers/fix_ack_per_message.py``) on a real
worker and a dedicated redis-server: every message still leaves the broker's unacked
index while the worker runs and at its warm shutdown, and a burst of tasks shares round
trips."""

from __future__ import annotations

import contextlib
import fcntl
import json
import threading
import uuid
from pathlib import Path

import redis
from slow_lm import MODEL, parse_log
from support.polling import wait_until
from support.procs import base_env, start_worker, stopping
from support.redis_server import RedisProc

from dspex_tasks.app import PREDICT_TASK
from dspex_tasks.client import Client
from dspex_tasks.settings import Settings


def _env(url: str, tmp_path: Path) -> dict[str, str]:
    return base_env(
        url,
        f"a{uuid.uuid4().hex[:6]}",
        DSPEX_LM_PROFILES=json.dumps({"default": {"model": MODEL}}),
        DSPEX_TEST_LM_LOG=str(tmp_path / "lm.log"),
    )


class AckCounter:
    """Counts the commands that remove messages from the unacked index (Redis MONITOR)."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.calls = 0
        self.removed = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self._monitor = self.client.monitor()
        self._conn = self._monitor.__enter__()
        self.thread.start()

    def _read(self) -> None:
        with contextlib.suppress(Exception):  # ends when the connection closes
            for command in self._conn.listen():
                words = command["command"].split()
                if words[:2] == ["ZREM", "unacked_index"]:
                    self.calls += 1
                    self.removed += len(words) - 2

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._monitor.__exit__(None, None, None)
        self.client.close()


def test_acks_leave_the_unacked_index_in_shared_round_trips(
    dedicated_redis: RedisProc, tmp_path: Path
) -> None:
    env = _env(dedicated_redis.url, tmp_path)
    client = Client(settings=Settings.from_env(env))
    r = client.store.redis
    sid = client.create_session().id
    n = 48
    with stopping(start_worker(env, tmp_path, concurrency=16)) as (worker,):
        worker.wait_log(" ready.", 30)
        counter = AckCounter(dedicated_redis.url)
        handles = []
        # Three waves of 16 (the worker's concurrency): each wave's LM calls wait on a
        # gate (a file this test holds locked) opened once all 16 have started, so the
        # 16 tasks end together.
        for wave in range(n // 16):
            gate = tmp_path / f"gate-{wave}"
            first = len(handles)
            wave_marks = {f"k{i}" for i in range(first, first + 16)}

            def started(marks: set[str] = wave_marks) -> bool:
                log = parse_log(tmp_path / "lm.log")
                return {m for event, m, _ in log if event == "start"} >= marks

            with gate.open("w") as held:
                fcntl.flock(held, fcntl.LOCK_EX)
                handles += [
                    client.app.send_task(
                        PREDICT_TASK,
                        args=[sid, "question -> answer", {"question": f"MARK[k{i}] GATE[{gate}]"}],
                    )
                    for i in range(first, first + 16)
                ]
                wait_until(started, 30, what=f"wave {wave}'s 16 LM calls to start")
            # Closing the file let go of the lock: the gate is open.
        for i, h in enumerate(handles):
            assert f"MARK[k{i}]" in h.get(timeout=60)["outputs"]["answer"]
        # While the worker runs on: every acknowledgement reaches Redis.
        wait_until(lambda: r.zcard("unacked_index") == 0, 10, what="every message acked")
        assert r.hlen("unacked") == 0
        # 16 tasks ended together, three times over: their acknowledgements share round
        # trips (one ZREM per message without batching).
        wait_until(lambda: counter.removed >= n, 10, what="the monitor to see every ack")
        counter.close()
        assert counter.removed == n
        assert counter.calls < n, counter.calls
        # A warm shutdown right after a burst leaves nothing to redeliver either.
        burst = [
            client.app.send_task(
                PREDICT_TASK,
                args=[sid, "question -> answer", {"question": f"MARK[b{i}] SLEEP[0.2]"}],
            )
            for i in range(16)
        ]
        for h in burst:
            h.get(timeout=60)
    assert r.zcard("unacked_index") == 0 and r.hlen("unacked") == 0
    assert r.llen("dspex") == 0
    client.close()
