"""``dspex-tasks watch``: a real subprocess prints each event of a session as it happens
and exits cleanly on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import orjson
import pytest

from dspex_tasks.store import SessionStore

_SCRIPT = Path(sys.executable).with_name("dspex-tasks")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "dspex_tasks.cli"]


@pytest.fixture
def prefix() -> str:
    return f"w{uuid.uuid4().hex[:8]}"


@pytest.fixture
def env(redis_url: str, prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPEX_")}
    env.update(DSPEX_REDIS_URL=redis_url, DSPEX_KEY_PREFIX=prefix, PYTHONUNBUFFERED="1")
    return env


@pytest.fixture
def store(redis_url: str, prefix: str) -> Iterator[SessionStore]:
    store = SessionStore.from_url(redis_url, prefix=prefix)
    yield store
    store.close()


def _lines(stream: IO[str], n: int) -> list[str]:
    # readline blocks until the watcher prints: the real condition, no sleep.
    return [stream.readline().rstrip("\n") for _ in range(n)]


def test_watch_json_prints_each_event_and_ctrl_c_exits_0(
    env: dict[str, str], store: SessionStore
) -> None:
    store.create_session("cw")
    # --after 0: from the oldest kept event, so nothing written before it started is lost.
    proc = subprocess.Popen(
        [*CLI, "watch", "cw", "--after", "0", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        store.register_variable("cw", "t", "float", 0.5)
        store.update_variable("cw", "t", 0.25)
        events = [orjson.loads(line) for line in _lines(proc.stdout, 3)]
        assert [e["type"] for e in events] == [
            "session.created",
            "variable.registered",
            "variable.updated",
        ]
        assert events[2]["data"]["value"] == 0.25 and events[2]["data"]["version"] == 2
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()  # and close its pipes
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_watch_names_filter_and_human_lines(env: dict[str, str], store: SessionStore) -> None:
    store.create_session("ch")
    store.register_variable("ch", "a", "integer", 1)
    store.register_variable("ch", "b", "integer", 1)
    store.update_variable("ch", "b", 2)
    store.update_variable("ch", "a", 2)
    proc = subprocess.run(
        [*CLI, "watch", "ch", "--after", "0", "--names", "a", "--timeout", "0.5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    assert "variable.registered  a=1 (v1)" in lines[0]
    assert "variable.updated  a=2 (v2)" in lines[1]


def test_watch_unknown_session_is_an_error(env: dict[str, str]) -> None:
    proc = subprocess.run(
        [*CLI, "watch", "nobody", "--timeout", "0.2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "session_not_found" in proc.stderr
