"""The ``dspex-tasks`` command through its entry point, against the test Redis (db 5) and a
real ``celery worker`` subprocess running the offline echo LM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from support.dbs import db_url
from support.store import wait_expired

from dspex_tasks.cli import build_parser, main
from dspex_tasks.client import Client
from dspex_tasks.settings import Settings
from dspex_tasks.store import SessionStore

_SCRIPT = Path(sys.executable).with_name("dspex-tasks")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "dspex_tasks.cli"]
ECHO_PROFILES = '{"default": {"model": "dspex/echo"}}'


def base_env(redis_url: str, prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSPEX_", "FLOWER_"))}
    env.update(
        DSPEX_REDIS_URL=redis_url,
        DSPEX_KEY_PREFIX=prefix,
        DSPEX_LM_PROFILES=ECHO_PROFILES,
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_OFFLINE_MODE="true",
    )
    return env


@pytest.fixture(scope="module")
def env(redis_url: str) -> dict[str, str]:
    return base_env(db_url(redis_url, "cli"), f"cli{uuid.uuid4().hex[:8]}")


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def cli_json(env: dict[str, str], *args: str, rc: int = 0) -> Any:
    proc = cli(env, "--json", *args)
    assert proc.returncode == rc, proc.stderr + proc.stdout
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout  # exactly one JSON document
    return orjson.loads(lines[0])


def sid() -> str:
    return f"cli-{uuid.uuid4().hex[:10]}"


# --- parser -------------------------------------------------------------------------------


def _all_commands() -> list[list[str]]:
    commands = []
    for action in build_parser()._subparsers._group_actions:  # type: ignore[union-attr]
        for name, sub in action.choices.items():
            commands.append([name])
            for inner in sub._subparsers._group_actions if sub._subparsers else ():
                commands.extend([name, child] for child in inner.choices)
    return commands


@pytest.mark.parametrize("command", _all_commands(), ids=" ".join)
def test_every_subcommand_help_exits_0(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*command, "--help"]) == 0
    assert "usage: dspex-tasks" in capsys.readouterr().out


def test_help_through_the_entry_point(env: dict[str, str]) -> None:
    proc = cli(env, "--help")
    assert proc.returncode == 0
    for name in ("dev", "worker", "beat", "flower", "session", "var", "predict", "doctor"):
        assert name in proc.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["session", "create", "--ttl", "soon"],
        ["nonsense"],
        ["predict", "s", "question -> answer", "no-equals-sign"],
        ["var", "set", "s", "x", "1", "--type", "float", "--constraints", "{bad"],
        ["session", "list", "--", "extra"],
    ],
)
def test_usage_errors_exit_64(env: dict[str, str], args: list[str]) -> None:
    proc = cli(env, *args)
    assert proc.returncode == 64, proc.stderr
    assert "usage:" in proc.stderr and proc.stdout == ""


# --- state commands -------------------------------------------------------------------------


def test_session_create_show_list_delete(env: dict[str, str]) -> None:
    s = sid()
    created = cli_json(env, "session", "create", s, "--ttl", "120", "--metadata", '{"user": 7}')
    assert (created["id"], created["ttl_s"], created["metadata"]) == (s, 120, {"user": 7})
    cli_json(env, "var", "set", s, "n", "3", "--type", "integer")
    shown = cli_json(env, "session", "show", s)
    assert shown["id"] == s and shown["variables"] == {"n": 3} and shown["programs"] == []
    assert s in cli_json(env, "session", "list")["sessions"]
    human = cli(env, "session", "show", s)
    assert human.returncode == 0 and f"session {s}" in human.stdout and "n=3" in human.stdout
    assert cli_json(env, "session", "delete", s) == {"session_id": s, "deleted": True}
    assert cli_json(env, "session", "delete", s) == {"session_id": s, "deleted": False}
    gone = cli_json(env, "session", "show", s, rc=2)
    assert gone["error"]["code"] == "session_not_found"


def test_json_flag_before_or_after_the_subcommand(env: dict[str, str]) -> None:
    s = sid()
    assert cli_json(env, "session", "create", s)["id"] == s
    proc = cli(env, "session", "list", "--json")
    assert s in orjson.loads(proc.stdout)["sessions"]


def test_var_set_get_list(env: dict[str, str]) -> None:
    s = sid()
    cli_json(env, "session", "create", s)
    temp = cli_json(
        env,
        "var",
        "set",
        s,
        "temperature",
        "0.7",
        "--type",
        "float",
        "--constraints",
        '{"min": 0, "max": 2}',
    )
    assert (temp["value"], temp["version"], temp["constraints"]) == (0.7, 1, {"min": 0, "max": 2})
    # Text types take the argument as text: 42 stays "42"; JSON values parse for the rest.
    assert cli_json(env, "var", "set", s, "label", "42", "--type", "string")["value"] == "42"
    emb = cli_json(env, "var", "set", s, "emb", "[1, 2.5]", "--type", "embedding")
    assert emb["value"] == [1.0, 2.5]
    updated = cli_json(env, "var", "set", s, "temperature", "1.5", "--expected-version", "1")
    assert (updated["value"], updated["version"]) == (1.5, 2)
    conflict = cli_json(env, "var", "set", s, "temperature", "0.1", "--expected-version", "1", rc=2)
    assert conflict["error"]["code"] == "version_conflict"
    got = cli_json(env, "var", "get", s, "temperature")
    assert (got["name"], got["type"], got["value"], got["version"]) == (
        "temperature",
        "float",
        1.5,
        2,
    )
    listed = cli_json(env, "var", "list", s)["variables"]
    assert [v["name"] for v in listed] == ["temperature", "label", "emb"]
    assert [v["name"] for v in cli_json(env, "var", "list", s, "t*")["variables"]] == [
        "temperature"
    ]
    human = cli(env, "var", "get", s, "label")
    assert human.stdout.strip() == 'label = "42"  (string, version 1)'


def test_validation_error_is_one_line_and_leaves_the_value(env: dict[str, str]) -> None:
    s = sid()
    cli_json(env, "session", "create", s)
    cli_json(env, "var", "set", s, "t", "0.5", "--type", "float", "--constraints", '{"max": 1}')
    proc = cli(env, "var", "set", s, "t", "5")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: validation_failed: "), proc.stderr
    as_json = cli_json(env, "var", "set", s, "t", "5", rc=2)
    assert as_json["error"]["code"] == "validation_failed"
    assert as_json["error"]["details"]["rule"] == "max"
    assert cli_json(env, "var", "get", s, "t")["value"] == 0.5


def test_stats_and_expire(env: dict[str, str]) -> None:
    s = sid()
    cli_json(env, "session", "create", s, "--ttl", "0.2")
    before = cli_json(env, "stats")
    assert {"sessions", "created", "expired", "sweeps", "last_sweep_at"} <= set(before)
    settings = Settings.from_env(env)
    store = SessionStore.from_settings(settings)
    try:
        wait_expired(store.redis, store, s)
    finally:
        store.close()
    assert cli_json(env, "expire")["expired"] >= 1
    after = cli_json(env, "stats")
    assert after["expired"] >= before["expired"] + 1
    assert after["sweeps"] == before["sweeps"] + 1
    assert after["last_sweep_at"] is not None


def test_redis_down_is_store_unavailable(env: dict[str, str], tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = {**env, "DSPEX_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    proc = cli(down, "session", "list")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: store_unavailable: ")


# --- process commands ------------------------------------------------------------------------


def test_worker_command_defaults_and_passthrough(env: dict[str, str]) -> None:
    argv = cli_json(env, "worker", "--print-command", "--", "--max-tasks-per-child=50")["argv"]
    assert argv[1:5] == ["-m", "celery", "-A", "workers.worker"]
    for flag in (
        "--pool=threads",
        "--concurrency=32",
        "--queues=dspex,dspex.maintenance",
        "--task-events",
        "--loglevel=WARNING",
    ):
        assert flag in argv
    assert argv[-1] == "--max-tasks-per-child=50"
    assert "--without-mingle" not in argv
    argv = cli_json(env, "worker", "--print-command", "--without-mingle", "--no-events")["argv"]
    assert "--without-mingle" in argv and "--task-events" not in argv


def test_beat_command(env: dict[str, str], tmp_path: Path) -> None:
    argv = cli_json(env, "beat", "--print-command", "--state-dir", str(tmp_path))["argv"]
    assert argv[3:6] == ["-A", "workers.beat", "beat"]
    assert f"--schedule={tmp_path / 'beat-schedule'}" in argv and "--pidfile=" in argv


def test_flower_refuses_to_start_without_a_password(env: dict[str, str]) -> None:
    proc = cli(env, "flower")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: invalid_settings: refusing to start Flower")
    allowed = cli_json(env, "flower", "--print-command", "--allow-no-auth")["argv"]
    assert allowed[3:6] == ["-A", "workers.monitor", "flower"]
    assert allowed[-1].startswith("--conf=") and allowed[-1].endswith("flowerconfig.py")
    with_pw = cli_json({**env, "DSPEX_FLOWER_PASSWORD": "pw"}, "flower", "--print-command")
    assert with_pw["argv"] == allowed


def test_flowerconfig_builds_basic_auth_and_fails_loudly(env: dict[str, str]) -> None:
    from dspex_tasks.cli.launch import flowerconfig_path

    code = (
        "import runpy, sys; ns = runpy.run_path(sys.argv[1]);"
        "print(ns['address'], ns['port'], ns['basic_auth'], ns['persistent'])"
    )
    good = {**env, "DSPEX_FLOWER_PASSWORD": "s3cret", "DSPEX_FLOWER_PORT": "5999"}
    proc = subprocess.run(
        [sys.executable, "-c", code, flowerconfig_path()],
        env=good,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.stdout.strip() == "127.0.0.1 5999 ['admin:s3cret'] False", proc.stderr
    proc = subprocess.run(
        [sys.executable, "-c", code, flowerconfig_path()],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1 and "refusing to start Flower" in proc.stderr


# --- tasks through a real worker ------------------------------------------------------------


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def worker(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A ``celery worker`` subprocess (threads x4, echo LM) on the CLI's db and prefix."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    name = f"cli-{uuid.uuid4().hex[:6]}@%h"
    argv = [
        *(sys.executable, "-m", "celery", "-A", "workers.worker", "worker"),
        *("--pool", "threads", "-c", "4", "-Q", "dspex,dspex.maintenance"),
        *("--without-mingle", "--without-gossip", "-n", name, "--loglevel", "WARNING"),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    client = Client(settings=Settings.from_env(env))
    try:
        deadline = time.monotonic() + 60
        while not client.workers(0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc)
                pytest.fail(f"worker did not come up:\n{log.read_text()}")
        yield name.replace("%h", "")
    finally:
        client.close()
        _stop(proc)


@pytest.mark.slow
def test_predict_and_cot(env: dict[str, str], worker: str) -> None:
    s = sid()
    cli_json(env, "session", "create", s)
    result = cli_json(env, "predict", s, "question -> answer", "question=What is 2+2?")
    assert result["session_id"] == s and result["task_id"]
    assert result["lm"]["model"] == "dspex/echo"
    assert isinstance(result["outputs"]["answer"], str) and result["outputs"]["answer"]
    # Typed fields: n parses as JSON (int), text stays text; --inputs merges underneath.
    result = cli_json(
        env, "predict", s, "text, n: int -> total: int", "n=3", "--inputs", '{"text": "7"}'
    )
    assert isinstance(result["outputs"]["total"], int)
    human = cli(env, "cot", s, "question -> answer", "question=Why?")
    assert human.returncode == 0, human.stderr
    assert "reasoning: " in human.stdout and "answer: " in human.stdout
    assert "(model dspex/echo" in human.stdout


def test_stream_prints_tokens_then_the_result(env: dict[str, str], worker: str) -> None:
    s = sid()
    cli_json(env, "session", "create", s)
    out = cli(env, "cot", s, "question -> answer", "question=Why is it so?", "--stream")
    assert out.returncode == 0, out.stderr
    streamed = {
        line.split(": ", 1)[0]: line.split(": ", 1)[1]
        for line in out.stderr.splitlines()
        if ": " in line and not line.startswith("[")
    }
    printed = dict(
        line.split(": ", 1) for line in out.stdout.splitlines() if not line.startswith("(")
    )
    assert streamed["reasoning"] == printed["reasoning"]
    assert streamed["answer"] == printed["answer"]
    assert "[start ChainOfThought]" in out.stderr
    result = cli_json(env, "predict", s, "question -> answer", "question=Hi", "--stream")
    assert result["outputs"]["answer"]  # --json: stdout holds one document


@pytest.mark.slow
def test_predict_errors_and_no_wait(env: dict[str, str], worker: str) -> None:
    s = sid()
    cli_json(env, "session", "create", s)
    missing = cli_json(env, "predict", s, "question -> answer", "other=1", rc=2)
    assert missing["error"]["code"] == "invalid_inputs"
    queued = cli_json(env, "predict", s, "question -> answer", "question=hi", "--no-wait")
    assert set(queued) == {"task_id", "status"}
    with Client(settings=Settings.from_env(env)) as client:
        assert client.result(queued["task_id"]).get(timeout=30)["answer"]
    gone = cli_json(env, "predict", "no-such-session", "q -> a", "q=x", rc=2)
    assert gone["error"]["code"] == "session_not_found"


@pytest.mark.slow
def test_run_program_with_store_outputs(env: dict[str, str], worker: str) -> None:
    s = sid()
    with Client(settings=Settings.from_env(env)) as client:
        session = client.create_session(s)
        session.create_program("qa", "predict", "question -> answer")
        session.register_variable("last", "string", "")
    result = cli_json(env, "run", s, "qa", "question=hello", "--store-outputs", "answer=last")
    stored = cli_json(env, "var", "get", s, "last")
    assert stored["value"] == result["outputs"]["answer"] and stored["version"] == 2


@pytest.mark.slow
def test_batch_from_jsonl_with_progress(env: dict[str, str], worker: str, tmp_path: Path) -> None:
    s = sid()
    cli_json(env, "session", "create", s)
    batch = tmp_path / "inputs.jsonl"
    batch.write_text("".join(f'{{"question": "q{n}"}}\n' for n in range(12)) + "\n")
    proc = cli(env, "--json", "predict", s, "question -> answer", "--batch", str(batch))
    assert proc.returncode == 0, proc.stderr
    doc = orjson.loads(proc.stdout)
    assert (doc["tasks"], doc["succeeded"], doc["failed"]) == (12, 12, 0)
    assert all(r["outputs"]["answer"] for r in doc["results"])
    assert "12/12 tasks" in proc.stderr.splitlines()[-1]  # the progress bar, on stderr
    # A bad line is refused before anything is enqueued, naming the item.
    batch.write_text('{"question": "ok"}\n{"wrong": 1}\n')
    proc = cli(env, "predict", s, "question -> answer", "--batch", str(batch))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: invalid_inputs: ") and "(batch item 2)" in proc.stderr


@pytest.mark.slow
def test_doctor_reports_redis_and_the_worker(env: dict[str, str], worker: str) -> None:
    doc = cli_json(env, "doctor", "--skip", "local_model")
    checks = doc["checks"]
    assert doc["ok"] is True
    assert checks["redis"]["status"] == "ok" and checks["redis"]["version"]
    assert checks["workers"]["status"] == "ok" and checks["workers"]["count"] == 1
    assert checks["workers"]["queued"] == {"dspex": 0, "dspex.maintenance": 0}
    # The echo LM answers, but doctor flags it: it is a placeholder, not a model.
    assert checks["lm"]["status"] == "warn" and checks["lm"]["model"] == "dspex/echo"
    assert checks["local_model"]["status"] == "skip"
    assert checks["beat"]["status"] in {"ok", "warn"}
    # The temporary session is gone again.
    assert not [x for x in cli_json(env, "session", "list")["sessions"] if x.startswith("doctor-")]
    human = cli(env, "doctor", "--skip", "local_model", "--skip", "lm")
    assert human.returncode == 0
    assert [line.split()[1] for line in human.stdout.splitlines()] == [
        "redis",
        "workers",
        "lm",
        "lm_traffic",
        "local_model",
        "beat",
    ]


def test_doctor_without_workers_fails(redis_url: str) -> None:
    lonely = base_env(db_url(redis_url, "cli.lonely"), f"lonely{uuid.uuid4().hex[:6]}")
    doc = cli_json(lonely, "doctor", "--skip", "local_model", rc=1)
    assert doc["ok"] is False
    assert doc["checks"]["redis"]["status"] == "ok"
    assert doc["checks"]["workers"]["status"] == "fail"
    assert doc["checks"]["lm"]["status"] == "skip"
