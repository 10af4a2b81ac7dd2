"""``dspex-tasks dev``: the whole stack in a subprocess, used through the Client and
Flower's HTTP API, then stopped by SIGINT with nothing left running."""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import requests
from support.dbs import db_url
from support.redis_server import free_port

from dspex_tasks.client import Client

_SCRIPT = Path(sys.executable).with_name("dspex-tasks")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "dspex_tasks.cli"]
READY_TIMEOUT_S = 90.0


def dev_env(**extra: str) -> dict[str, str]:
    """No DSPEX_REDIS_URL: dev starts its own Redis. Echo LM, 1 s sweeps, a free port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSPEX_", "FLOWER_"))}
    env.update(
        DSPEX_LM_PROFILES='{"default": {"model": "dspex/echo"}}',
        DSPEX_EXPIRY_INTERVAL_S="1",
        DSPEX_WORKER_CONCURRENCY="4",
        DSPEX_FLOWER_PORT=str(free_port()),
        DSPEX_API_PORT=str(free_port()),
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_OFFLINE_MODE="true",
    )
    env.update(extra)
    return env


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc: ppid is field 4 of /proc/N/stat)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead


def read_line(proc: subprocess.Popen[bytes], timeout_s: float) -> bytes:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            break
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
    return buf


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any], Path]]:
    errors = tmp_path / "dev.stderr"
    with errors.open("wb") as err:
        proc = subprocess.Popen(
            [*CLI, "--json", "dev", "--state-dir", str(tmp_path / "state")],
            env=dev_env(),
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        line = read_line(proc, READY_TIMEOUT_S)
        if not line:
            stop(proc)
            pytest.fail(f"dev did not come up:\n{errors.read_text()}")
        yield proc, orjson.loads(line), errors
    finally:
        stop(proc, signal.SIGKILL if proc.poll() is None else signal.SIGINT)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.slow
def test_dev_stack_serves_client_and_flower_and_stops_cleanly(
    dev: tuple[subprocess.Popen[bytes], dict[str, Any], Path], tmp_path: Path
) -> None:
    proc, info, errors = dev
    assert info["status"] == "ready" and info["redis_started"] is True
    assert set(info["pids"]) == {"redis", "worker", "beat", "flower", "api"}
    assert info["exports"] == [
        f"export DSPEX_REDIS_URL={info['redis_url']}",
        f"export DSPEX_FLOWER_PORT={info['flower_port']}",
        f"export DSPEX_FLOWER_USER={info['flower_user']}",
        f"export DSPEX_FLOWER_PASSWORD={info['flower_password']}",
    ]
    assert info["env"] == "\n".join(info["exports"])
    state = tmp_path / "state"
    assert {p.name for p in (state / "logs").iterdir()} == {
        "redis.log",
        "worker.log",
        "beat.log",
        "flower.log",
        "api.log",
    }
    assert (state / "redis" / "appendonlydir").is_dir()  # --appendonly yes, project-local
    children = descendants(proc.pid)
    assert set(info["pids"].values()) <= children

    # A producer with only the printed URL.
    with Client(redis_url=info["redis_url"]) as client:
        session = client.create_session(f"dev-{uuid.uuid4().hex[:8]}")
        assert session.predict("question -> answer", question="hi").get(timeout=30)["answer"]
        sid = session.id
        gc.collect()  # finalize result handles while Redis is still up

    # Flower: the API needs the printed credentials; /healthcheck does not.
    flower = info["flower_url"]
    assert flower.startswith("http://127.0.0.1:")
    auth = (info["flower_user"], info["flower_password"])
    assert requests.get(f"{flower}/api/workers", timeout=10).status_code == 401
    assert (
        requests.get(f"{flower}/api/workers", auth=("admin", "wrong"), timeout=10).status_code
        == 401
    )
    assert requests.get(f"{flower}/healthcheck", timeout=10).status_code == 200
    reply = requests.post(
        f"{flower}/api/task/async-apply/dspex.predict",
        json={"args": [sid, "question -> answer", {"question": "hi"}]},
        auth=auth,
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    task_id = reply.json()["task-id"]
    # Poll without ?timeout=: with it, Flower 2.2 reports the state read *before* waiting
    # (e.g. PENDING next to the final result).
    deadline = time.monotonic() + 30
    while True:
        result = requests.get(f"{flower}/api/task/result/{task_id}", auth=auth, timeout=10).json()
        if result["state"] in {"SUCCESS", "FAILURE"} or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert result["state"] == "SUCCESS", result
    assert result["result"]["session_id"] == sid and result["result"]["outputs"]["answer"]
    assert result["result"]["lm"]["model"] == "dspex/echo"

    # The HTTP API and its console, with only the printed URL (loopback: no token).
    api = info["api_url"]
    assert api == f"http://127.0.0.1:{info['api_port']}" and info["api_auth"] == "no auth"
    assert requests.get(f"{api}/healthz", timeout=10).json() == {"status": "ok"}
    assert requests.get(f"{api}/v1/sessions/{sid}", timeout=10).json()["id"] == sid
    assert "dspex-tasks" in requests.get(f"{api}/", timeout=10).text

    # Beat runs the expiry sweep every second here: doctor sees it alive.
    doctor_env = {**dev_env(), "DSPEX_REDIS_URL": info["redis_url"]}
    deadline = time.monotonic() + 20
    while True:
        out = subprocess.run(
            [*CLI, "--json", "doctor", "--skip", "local_model", "--skip", "lm"],
            env=doctor_env,
            capture_output=True,
            check=False,
        )
        checks = orjson.loads(out.stdout)["checks"]
        if checks["beat"]["status"] == "ok" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert checks["beat"]["status"] == "ok", checks["beat"]
    assert checks["workers"]["count"] == 1

    children = descendants(proc.pid) | children
    assert stop(proc, signal.SIGINT) == 0
    assert not [pid for pid in children if alive(pid)]
    stderr = errors.read_text()
    assert "dev: stopped redis, worker, beat, flower, api" in stderr
    assert info["flower_password"] not in stderr
    port = urlsplit(info["redis_url"]).port
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # Redis is down


@pytest.mark.slow
def test_dev_demo_on_a_given_redis(redis_url: str, tmp_path: Path) -> None:
    """With DSPEX_REDIS_URL set, dev starts no Redis; --demo runs the tour and exits."""
    url = db_url(redis_url, "dev")
    # Default sweep interval: the short session then expires lazily (session_expired).
    env = dev_env(
        DSPEX_REDIS_URL=url,
        DSPEX_KEY_PREFIX=f"demo{uuid.uuid4().hex[:6]}",
        DSPEX_EXPIRY_INTERVAL_S="30",
    )
    proc = subprocess.run(
        [*CLI, "dev", "--demo", "--state-dir", str(tmp_path / "state")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "AOF on" not in out and f"export DSPEX_REDIS_URL={url}" in out
    for expected in (
        "validation_failed",
        "temperature is still 0.7",
        "answered by dspex/echo",
        "reasoning: ",
        "variable last_answer is now v2",
        "session_expired",
        "dspex.predict, dspex.chain_of_thought, dspex.run_program",
        "demo finished",
    ):
        assert expected in out, f"{expected!r} missing from:\n{out}"
    assert "dev: stopped worker, beat, flower, api" in proc.stderr
    assert not (tmp_path / "state" / "logs" / "redis.log").exists()


def read_until(proc: subprocess.Popen[bytes], end: bytes, timeout_s: float) -> str:
    """stdout up to and including the line holding ``end`` (or what came before EOF)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    buf = b""
    while end not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
    return buf.decode()


BANNER_LABELS = ("Redis", "Flower", "API", "Worker", "Logs")


@pytest.mark.slow
def test_dev_banner_is_whole_on_every_start_and_its_exports_work(tmp_path: Path) -> None:
    """Three starts: every banner line filled (the Worker line was empty about half the
    time), the export lines work pasted into a shell, Flower lists the worker at once."""
    given = {"DSPEX_FLOWER_USER": "ops", "DSPEX_FLOWER_PASSWORD": "given-pw-21"}
    for start in range(3):
        extra = given if start == 0 else {}
        errors = tmp_path / f"dev{start}.stderr"
        with errors.open("wb") as err:
            proc = subprocess.Popen(
                [*CLI, "dev", "--state-dir", str(tmp_path / "state")],
                env=dev_env(**extra),
                stdout=subprocess.PIPE,
                stderr=err,
            )
        try:
            banner = read_until(proc, b"Ctrl-C stops everything.", READY_TIMEOUT_S)
            assert "Ctrl-C stops everything." in banner, banner + errors.read_text()
            lines = banner.splitlines()
            for label in BANNER_LABELS:
                line = next((x for x in lines if x.startswith(f"  {label} ")), None)
                assert line is not None and line.split(None, 1)[1].strip(), (label, banner)
            worker = next(x for x in lines if x.startswith("  Worker "))
            assert "dspex-dev-" in worker, banner
            exports = [x.strip() for x in lines if x.strip().startswith("export DSPEX_")]
            names = [x.split("=", 1)[0].split()[1] for x in exports]
            assert names == [
                "DSPEX_REDIS_URL",
                "DSPEX_FLOWER_PORT",
                "DSPEX_FLOWER_USER",
                "DSPEX_FLOWER_PASSWORD",
            ]
            if start == 0:
                assert "export DSPEX_FLOWER_USER=ops" in exports
                assert "export DSPEX_FLOWER_PASSWORD=given-pw-21" in exports
                assert "given-pw-21" not in worker and "from DSPEX_FLOWER_PASSWORD" in banner
            # Pasted into a shell, the exports are all the README's curl line needs; and
            # Flower, started after the worker answered, lists it without ?refresh=1.
            curl = (
                "curl -sf -u $DSPEX_FLOWER_USER:$DSPEX_FLOWER_PASSWORD "
                "http://127.0.0.1:$DSPEX_FLOWER_PORT/api/workers"
            )
            shell = subprocess.run(
                ["bash", "-c", "\n".join([*exports, curl])],
                env={"PATH": os.environ["PATH"]},
                capture_output=True,
                timeout=30,
                check=False,
            )
            assert shell.returncode == 0, shell
            listed = orjson.loads(shell.stdout)
            assert [n for n in listed if n.startswith("dspex-dev-")], listed
        finally:
            assert stop(proc, signal.SIGINT) == 0, errors.read_text()
            if proc.stdout is not None:
                proc.stdout.close()


def test_port_probe_takes_a_port_in_time_wait_as_free() -> None:
    """Flower (Tornado) binds with SO_REUSEADDR: a port the last run left in TIME_WAIT is
    free for it, so dev must not move Flower off it."""
    from dspex_tasks.cli.devstack import port_free

    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Tornado does
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()  # the side that closes first keeps the TIME_WAIT
        assert client.recv(1) == b""
        client.close()
    # Without SO_REUSEADDR the port still looks taken.
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))
    assert port_free("127.0.0.1", port)


@pytest.mark.slow
def test_dev_refuses_a_taken_flower_port_it_was_given(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [*CLI, "dev", "--state-dir", str(tmp_path / "state")],
            env=dev_env(DSPEX_FLOWER_PORT=str(port)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"DSPEX_FLOWER_PORT={port} is taken" in proc.stderr
    assert "Ctrl-C" not in proc.stdout
