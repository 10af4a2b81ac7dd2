"""Real processes for the tests: Celery workers, beat and Flower as subprocesses,
session snapshots, secret scanning.

Every process is started in its own session (process group) and stopped by its pid;
nothing here kills by name.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from dspex_tasks.store import SessionStore
from support.dbs import with_db
from support.polling import wait_until

__all__ = [
    "ROOT",
    "TESTS",
    "Proc",
    "base_env",
    "find_secret",
    "flower_conf_proc",
    "flower_proc",
    "session_snapshot",
    "start_api",
    "start_beat",
    "start_worker",
    "stopping",
]

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"


def base_env(redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    """Environment for a child process: no inherited DSPEX_/FLOWER_ settings, the test
    engine importable, litellm offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSPEX_", "FLOWER_"))}
    env.update(
        DSPEX_REDIS_URL=redis_url,
        DSPEX_KEY_PREFIX=prefix,
        PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]),
        PYTHONUNBUFFERED="1",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_OFFLINE_MODE="true",
    )
    env.update(extra)
    return env


@dataclass
class Proc:
    """A child process with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float) -> float:
        """Wait until ``text`` appears in the log; returns seconds since start."""

        def seen() -> bool:
            if not self.alive():
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n{self.log()}")
            return text in self.log()

        wait_until(seen, timeout, what=f"{text!r} in {self.name}'s log", diagnose=self.log)
        return time.monotonic() - self.started

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the process (and anything left in its process group)."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._kill_group()

    def _kill_group(self) -> None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._kill_group()
        return int(self.proc.returncode)


def _spawn(name: str, argv: list[str], env: Mapping[str, str], log_path: Path) -> Proc:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Proc(name, proc, log_path)


def start_worker(
    env: Mapping[str, str],
    log_dir: Path,
    *,
    app: str = "fault_worker",
    concurrency: int = 2,
    name: str | None = None,
    queues: str = "dspex,dspex.maintenance",
    loglevel: str = "INFO",
    pool: str = "threads",
) -> Proc:
    """``celery -A fault_worker worker`` (threads pool by default) in the background; not
    waited for."""
    node = name or f"w{uuid.uuid4().hex[:6]}"
    argv = [
        *(sys.executable, "-m", "celery", "-A", app, "worker"),
        *("--pool", pool, "-c", str(concurrency), "-Q", queues),
        *("--without-mingle", "--without-gossip", "-n", f"{node}@%h", "-l", loglevel),
    ]
    return _spawn(node, argv, env, log_dir / f"{node}.log")


def start_beat(env: Mapping[str, str], log_dir: Path, name: str) -> Proc:
    argv = [
        *(sys.executable, "-m", "celery", "-A", "workers.beat", "beat"),
        *("-s", str(log_dir / f"{name}-schedule"), "--pidfile=", "-l", "INFO"),
    ]
    return _spawn(name, argv, env, log_dir / f"{name}.log")


def start_api(env: Mapping[str, str], log_dir: Path, port: int, *extra: str) -> Proc:
    """``dspex-tasks api`` (this interpreter, this tree) in the background; not waited for."""
    argv = [sys.executable, "-m", "dspex_tasks.cli", "api", "--port", str(port), *extra]
    return _spawn(f"api-{port}", argv, env, log_dir / f"api-{port}.log")


def flower_proc(env: Mapping[str, str], log_dir: Path, port: int, basic_auth: str) -> Proc:
    argv = [
        *(sys.executable, "-m", "celery", "-A", "workers.monitor", "flower"),
        *("--address=127.0.0.1", f"--port={port}", f"--basic-auth={basic_auth}"),
    ]
    return _spawn(f"flower-{port}", argv, env, log_dir / f"flower-{port}.log")


def flower_conf_proc(env: Mapping[str, str], log_dir: Path) -> Proc:
    """Flower as ``dspex-tasks flower`` runs it: ``--conf=workers/flowerconfig.py``, so
    address, port and auth come from ``DSPEX_FLOWER_*`` in ``env``."""
    from dspex_tasks.cli.launch import flower_argv

    port = env.get("DSPEX_FLOWER_PORT", "5555")
    return _spawn(f"flower-{port}", flower_argv(), env, log_dir / f"flower-{port}.log")


@contextmanager
def stopping(*procs: Proc) -> Iterator[list[Proc]]:
    """Stop every process (SIGTERM, then SIGKILL) on exit, including ones appended later."""
    running = list(procs)
    try:
        yield running
    finally:
        for p in running:
            p.stop(timeout=10)


# --- state snapshots ---------------------------------------------------------------------

#: Session record fields that a touch legitimately changes.
TOUCH_FIELDS = frozenset({"accessed_ms", "deadline_ms"})
#: Session record fields of the run registry (store/runs.py).
RUN_FIELDS = frozenset({"runs_active", "run_current", "run_seq"})


def session_snapshot(raw: redis.Redis, store: SessionStore, sid: str) -> dict[str, Any]:
    """Every key of one session: the record hash minus touch fields, and DUMP of the rest.

    The run registry is not the session's state: a run that failed is still recorded as
    a run (its record, its run.* events, the session's count of active runs), so those
    are left out; every other event must be byte-identical, in order.

    ``raw`` must return bytes (``decode_responses=False``) so values compare byte for byte.
    """
    snap: dict[str, Any] = {}
    session_key = store.keys.session(sid)
    skipped = {store.keys.runs(sid), store.keys.run_queue(sid)}
    for key in sorted(raw.scan_iter(match=store.keys.session_pattern(sid), count=1000)):
        name = key.decode()
        if name in skipped:
            continue
        if name == session_key:
            record = raw.hgetall(key)
            snap[name] = {
                k: v for k, v in record.items() if k.decode() not in TOUCH_FIELDS | RUN_FIELDS
            }
        elif name == store.keys.events(sid):
            snap[name] = [
                (entry_id, fields)
                for entry_id, fields in raw.xrange(key)
                if not fields.get(b"t", b"").startswith(b"run.")
            ]
        else:
            snap[name] = raw.dump(key)
    return snap


# --- secret scanning ---------------------------------------------------------------------


def _decoded_forms(data: bytes, depth: int = 0) -> Iterator[bytes]:
    """``data`` and what hides inside it: base64 (kombu message bodies) and JSON strings."""
    yield data
    if depth > 3:
        return
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if doc is not None:
        stack = [doc]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
            elif isinstance(item, str) and len(item) >= 8:
                raw = item.encode()
                try:
                    decoded = base64.b64decode(raw, validate=True)
                except (binascii.Error, ValueError):
                    continue
                yield from _decoded_forms(decoded, depth + 1)


def _values(r: redis.Redis, key: bytes) -> list[bytes]:
    kind = r.type(key)
    if kind == b"string":
        value = r.get(key)
        return [value] if value is not None else []
    if kind == b"hash":
        return [x for kv in r.hgetall(key).items() for x in kv]
    if kind == b"list":
        return list(r.lrange(key, 0, -1))
    if kind == b"set":
        return list(r.smembers(key))
    if kind == b"zset":
        return [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
    if kind == b"stream":
        return [x for _, fields in r.xrange(key) for kv in fields.items() for x in kv]
    return []


def find_secret(url: str, secret: str, dbs: range = range(16)) -> tuple[int, list[str]]:
    """Scan every key of every db for ``secret`` (raw, base64-decoded and JSON-nested
    forms). Returns (keys scanned, places found)."""
    needle = secret.encode()
    found: list[str] = []
    scanned = 0
    for db in dbs:
        r = redis.Redis.from_url(with_db(url, db))
        try:
            for key in r.scan_iter(count=1000):
                scanned += 1
                if needle in key:
                    found.append(f"db{db} key name {key!r}")
                for value in _values(r, key):
                    if any(needle in form for form in _decoded_forms(value)):
                        found.append(f"db{db} {key!r}")
                        break
        finally:
            r.close()
    return scanned, found
