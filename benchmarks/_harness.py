"""Shared plumbing of the benchmarks (not a benchmark: ``make bench`` skips ``_*.py``).

Processes are started with their PID recorded and stopped by that PID (SIGTERM, then
SIGKILL after a grace period); CPU and RSS are read from ``/proc`` for a process and all
its descendants, so a prefork pool or several worker processes are counted whole.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson
import redis

ROOT = Path(__file__).resolve().parents[1]
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def redis_url() -> str:
    url = os.environ.get("DSPEX_TEST_REDIS_URL")
    if not url:
        raise SystemExit("DSPEX_TEST_REDIS_URL is not set: run under scripts/with-redis.sh")
    return url


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default


def env_ints(name: str, default: Sequence[int]) -> list[int]:
    raw = os.environ.get(name)
    return [int(x) for x in raw.split(",")] if raw else list(default)


# --- statistics ----------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def med_spread(values: Sequence[float], fmt: str = ".1f") -> str:
    """``median [min-max]`` of repeated measurements."""
    if len(values) == 1:
        return format(values[0], fmt)
    lo, hi = min(values), max(values)
    return f"{format(statistics.median(values), fmt)} [{format(lo, fmt)}-{format(hi, fmt)}]"


# --- processes -----------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tids = [p.name for p in task_dir.iterdir()]
    except OSError:
        return out
    for tid in tids:
        try:
            out.extend(int(c) for c in (task_dir / tid / "children").read_text().split())
        except OSError:
            continue
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and every descendant."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(_children(p))
    return tree


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU of these processes (threads included)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / _TICKS_PER_S


def rss_bytes(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_BYTES
        except OSError:
            continue
    return total


class Proc:
    """A background process with its output in a temp log (kept if something fails)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        fd, self.log_path = tempfile.mkstemp(prefix=f"dspex-bench-{name}-", suffix=".log")
        with os.fdopen(fd, "wb") as log:
            self.popen = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self.popen.pid
        self.name = name

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[int]:
        return process_tree(self.pid)

    def stop(self, *, keep_log: bool = False, timeout_s: float = 30) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                # Only the group this process leads (start_new_session): its own children.
                os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        if keep_log:
            print(f"{self.name} log kept: {self.log_path}", file=sys.stderr)
        else:
            with_suppress_unlink(self.log_path)


def with_suppress_unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise SystemExit(f"timed out after {timeout_s} s waiting for {what}")


def start_fake_lm(delay_ms: float) -> tuple[Proc, int]:
    """The fake OpenAI-compatible endpoint in its own process; returns (proc, port)."""
    fd, port_file = tempfile.mkstemp(prefix="dspex-bench-port-")
    os.close(fd)
    os.unlink(port_file)
    proc = Proc(
        "fake-lm",
        [
            sys.executable,
            str(ROOT / "tests" / "fake_openai.py"),
            "--delay-ms",
            str(delay_ms),
            "--port-file",
            port_file,
        ],
    )
    wait_until(lambda: os.path.exists(port_file) or not proc.alive(), "the fake LM server")
    if not proc.alive():
        proc.stop(keep_log=True)
        raise SystemExit("the fake LM server exited during start-up")
    port = int(Path(port_file).read_text())
    os.unlink(port_file)
    return proc, port


# --- results -------------------------------------------------------------------------


class ResultListener:
    """Task results as the Redis result backend publishes them (one PSUBSCRIBE).

    Celery's Redis backend SETs each state and PUBLISHes it on the key's channel; this
    sees every final state the moment it is stored, for almost no producer CPU.
    """

    FINAL = frozenset({"SUCCESS", "FAILURE", "REVOKED"})

    def __init__(self, url: str, key_prefix: str = "celery-task-meta-") -> None:
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(key_prefix + "*")
        self._prefix_len = len(key_prefix)

    def wait(self, ids: set[str], timeout_s: float) -> dict[str, tuple[float, Any]]:
        """Block until every id in ``ids`` has a final state: ``id -> (seen_at, meta)``."""
        done: dict[str, tuple[float, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(done) < len(ids):
            left = deadline - time.monotonic()
            if left <= 0:
                raise SystemExit(f"only {len(done)}/{len(ids)} results after {timeout_s} s")
            message = self.pubsub.get_message(timeout=min(left, 1.0))
            if message is None or message["type"] != "pmessage":
                continue
            task_id = message["channel"][self._prefix_len :].decode()
            if task_id not in ids:
                continue
            meta = orjson.loads(message["data"])
            if meta.get("status") in self.FINAL:
                done[task_id] = (time.perf_counter(), meta)
        return done

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


#: Ten small typed variables, as a session typically holds (expiry and memory benchmarks).
SMALL_VARIABLES: list[tuple[str, str, Any, dict[str, Any] | None]] = [
    ("temperature", "float", 0.7, {"min": 0, "max": 2}),
    ("max_tokens", "integer", 256, {"min": 1}),
    ("style", "string", "concise", {"max_length": 64}),
    ("verbose", "boolean", False, None),
    ("mode", "choice", "fast", {"choices": ["fast", "careful"]}),
    ("top_p", "float", 0.9, {"min": 0, "max": 1}),
    ("language", "string", "en", None),
    ("retries", "integer", 2, {"min": 0, "max": 5}),
    ("persona", "string", "helpful assistant", None),
    ("threshold", "float", 0.25, None),
]
