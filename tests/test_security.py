"""Security, end to end against real processes: JSON-only messages and no unpickling,
LM keys that never leave the worker's environment, producers that cannot pick an LM
endpoint, a tool, a type or a class by name, forged results, session-id isolation,
size limits, Redis with a password and with an ACL user, and Flower's API auth.

The worker here is ``celery -A fault_worker worker`` whose default profile is a real
``openai/...`` model served by a loopback OpenAI-compatible server started by the test
(``fake_openai.py``, in a thread), with the key in the worker's environment only (``MY_KEY``).
"""

from __future__ import annotations

import ast
import base64
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dspy
import pytest
import redis
from celery.exceptions import SecurityError
from fake_openai import FakeOpenAI
from support.dbs import with_db
from support.polling import wait_until
from support.procs import (
    ROOT,
    Proc,
    base_env,
    find_secret,
    flower_proc,
    start_worker,
    stopping,
)
from support.redis_server import RedisProc, free_port, start_redis_server
from support.reliability import Recorder

from dspex_tasks.app import PREDICT_TASK, RUN_PROGRAM_TASK, make_celery
from dspex_tasks.client import Client
from dspex_tasks.errors import (
    ConfigError,
    DspexError,
    InvalidProgram,
    InvalidSessionId,
    LMError,
    PayloadTooLarge,
    ToolNotFound,
    UnknownLMProfile,
    ValidationFailed,
)
from dspex_tasks.settings import Settings
from dspex_tasks.store import SessionStore

pytestmark = pytest.mark.fault


QA = "question -> answer"
LIMIT_INPUTS, LIMIT_RESULT, LIMIT_VALUE = 1024, 2048, 1024


@dataclass
class Stack:
    redis: RedisProc
    env: dict[str, str]
    client: Client
    worker: Proc
    lm: FakeOpenAI
    attacker: FakeOpenAI
    key: str
    other_key: str
    tmp: Path

    @property
    def store(self) -> SessionStore:
        return self.client.store

    def session(self) -> str:
        sid = f"sec-{uuid.uuid4().hex[:10]}"
        self.store.create_session(sid)
        return sid

    def failure(self, task: str, *args: Any) -> DspexError:
        handle = self.client.app.send_task(task, args=list(args))
        with pytest.raises(DspexError) as info:
            handle.get(timeout=30)
        return info.value


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("security")
    srv = start_redis_server(data_dir=tmp / "redis")
    key = f"sk-dspex-{secrets.token_hex(16)}"
    other_key = f"sk-other-{secrets.token_hex(16)}"
    with FakeOpenAI() as lm, FakeOpenAI() as attacker:
        profiles = {
            "default": {
                "model": "openai/fake-model",
                "api_base": lm.base_url,
                "api_key_env": "MY_KEY",
                "params": {"max_tokens": 64},
            }
        }
        env = base_env(
            f"{srv.url}/0",
            f"sec{uuid.uuid4().hex[:6]}",
            DSPEX_LM_PROFILES=json.dumps(profiles),
            DSPEX_MAX_INPUTS_BYTES=str(LIMIT_INPUTS),
            DSPEX_MAX_RESULT_BYTES=str(LIMIT_RESULT),
            DSPEX_MAX_VALUE_BYTES=str(LIMIT_VALUE),
            MY_KEY=key,
            # A key a provider client would pick up by itself if asked to.
            OPENAI_API_KEY=other_key,
        )
        producer_env = {k: v for k, v in env.items() if k not in ("MY_KEY", "OPENAI_API_KEY")}
        client = Client(settings=Settings.from_env(producer_env))
        with stopping(start_worker(env, tmp, loglevel="DEBUG")) as procs:
            procs[0].wait_log(" ready.", 30)
            yield Stack(srv, env, client, procs[0], lm, attacker, key, other_key, tmp)
        client.close()
    srv.stop()


# --- JSON only ----------------------------------------------------------------------------


class _Mkdir:
    """Unpickling this creates a directory: proof that something was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


def test_pickle_message_is_refused(stack: Stack, reliability: Recorder) -> None:
    sid = stack.session()
    canary = stack.tmp / f"unpickled-{uuid.uuid4().hex[:6]}"
    tid = str(uuid.uuid4())
    body = ((sid, QA, {"question": _Mkdir(str(canary))}), {}, {})
    with stack.client.app.connection_for_write() as conn:
        conn.Producer().publish(
            body,
            exchange="",
            routing_key="dspex",
            serializer="pickle",
            headers={"task": PREDICT_TASK, "id": tid, "lang": "py"},
        )
    refusal = "Refusing to deserialize untrusted content of type pickle"
    wait_until(
        lambda: refusal in stack.worker.log(), 15, what="the refusal", diagnose=stack.worker.log
    )
    r = stack.store.redis
    wait_until(lambda: r.llen("dspex") == 0 and r.zcard("unacked_index") == 0, 10)
    assert not canary.exists()
    assert r.get(f"celery-task-meta-{tid}") is None  # never ran
    assert f"dspex.predict[{tid}] received" not in stack.worker.log()
    # A good task right after: the worker is still consuming.
    h = stack.client.session(sid).predict(QA, question="still alive?")
    assert h.get(timeout=20) == {"answer": "fake answer"}

    # No code path can unpickle: no pickle-family module is imported anywhere, nothing
    # evaluates or executes text, and every Celery app accepts JSON only.
    banned = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
    offenders = []
    files = sorted((ROOT / "dspex_tasks").rglob("*.py")) + sorted((ROOT / "workers").rglob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                names = [node.func.id] if node.func.id in {"eval", "exec", "__import__"} else []
            else:
                names = []
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno} {n}"
                for n in names
                if n in banned | {"eval", "exec", "__import__"}
            ]
    assert len(files) > 20
    assert offenders == []
    app = make_celery(Settings.from_env(environ={}))
    assert app.conf.accept_content == ["json"]
    assert app.conf.result_accept_content == ["json"]
    assert app.conf.task_serializer == app.conf.result_serializer == "json"
    assert app.conf.event_serializer == "json"
    reliability.record(
        "pickle",
        cases=2,
        passed=2,
        lost="n/a (no fault injected)",
        figures=f"refused and logged, never run; {len(files)} source files free of unpickling",
    )


# --- secrets ------------------------------------------------------------------------------


def test_lm_key_never_leaves_the_worker(stack: Stack, reliability: Recorder) -> None:
    sid = stack.session()
    stack.store.register_variable(sid, "answer", "string", "")
    stack.store.store_program(sid, "qa", {"module": "chain_of_thought", "signature": QA})
    session = stack.client.session(sid)
    results: list[Any] = [
        session.predict(QA, question="What is 2 + 2?").get_result(timeout=30),
        session.chain_of_thought(QA, question="Why?").get_result(timeout=30),
        session.run_program(
            "qa", question="Where?", options={"store_outputs": ["answer"]}
        ).get_result(timeout=30),
    ]
    # A provider whose error text echoes the key: the task fails without carrying it.
    handle = session.predict(QA, question="ECHO-AUTH please")
    with pytest.raises(LMError) as info:
        handle.get(timeout=30)
    error = info.value
    assert "Incorrect API key provided" in error.message and "***" in error.message
    results.append({"error": error.message, "details": error.details})
    meta = stack.store.redis.get(f"celery-task-meta-{handle.id}")
    results.append(meta)
    # The key was used: every LM request carried it, to the configured endpoint only.
    calls = stack.lm.calls
    assert calls and all(c.authorization == f"Bearer {stack.key}" for c in calls)
    assert all(c.path == "/v1/chat/completions" for c in calls) and stack.lm.unknown == []
    # ... and it is nowhere else: not in any Redis key of any db, any result, the log.
    # The worker is done with every task: the ledger has forgotten them (after_return,
    # after results and counters) and the broker holds no unacknowledged message.
    wait_until(
        lambda: stack.store.pending_sent() == 0 and stack.store.redis.zcard("unacked_index") == 0,
        15,
        what="the worker to finish with every task",
    )
    scanned, found = find_secret(stack.redis.url, stack.key)
    assert scanned > 10
    assert found == []
    for result in results:
        assert stack.key not in json.dumps(result)
    log = stack.worker.log()
    assert "ECHO-AUTH" in log  # the failing task was logged (at DEBUG, with its args)
    assert stack.key not in log
    assert base64.b64encode(stack.key.encode()).decode()[:24] not in log
    reliability.record(
        "secrets",
        cases=4,
        passed=4,
        lost="n/a (no fault injected)",
        figures=(
            f"key sent on {len(stack.lm.calls)} LM requests; absent from {scanned} Redis keys "
            "(16 dbs, base64 bodies decoded), 4 results, the DEBUG worker log"
        ),
    )


def test_settings_reprs_hide_secrets(reliability: Recorder) -> None:
    pw = {
        "store": "st0re-pw-3141",
        "broker": "br0ker-pw-2718",
        "backend": "b4ckend-pw-1618",
        "flower": "fl0wer-pw-1414",
        "sentinel": "s3ntinel-pw-1732",
    }
    environ = {
        "DSPEX_REDIS_URL": f"redis://dspex:{pw['store']}@10.0.0.1:6379/0",
        "DSPEX_BROKER_URL": f"rediss://:{pw['broker']}@10.0.0.2:6380/1",
        "DSPEX_RESULT_BACKEND": f"redis://user:{pw['backend']}@10.0.0.3/2",
        "DSPEX_FLOWER_PASSWORD": pw["flower"],
        "DSPEX_REDIS_SENTINEL_PASSWORD": pw["sentinel"],
    }
    settings = Settings.from_env(environ)
    shown = [
        repr(settings),
        str(settings),
        repr(settings.flower_password),
        str(settings.flower_password),
    ]
    app = make_celery(settings)
    shown.append(app.conf.humanize(with_defaults=False, censored=True))
    shown.append(app.connection_for_write().as_uri())
    for text in shown:
        for value in pw.values():
            assert value not in text, text
    assert "***" in repr(settings)
    assert settings.flower_password.get() == pw["flower"]  # still usable
    reliability.record(
        "settings_repr", cases=len(shown), passed=len(shown), lost="n/a (no fault injected)"
    )


# --- producers cannot choose endpoints, keys, tools, types or classes ---------------------


def test_producer_cannot_pick_lm_endpoint_key_or_profile(
    stack: Stack, reliability: Recorder
) -> None:
    sid = stack.session()
    cases = 0
    for params in (
        {"api_base": stack.attacker.base_url},
        {"api_key": "sk-mine"},
        {"model": "openai/gpt-4o"},
        {"base_url": stack.attacker.base_url},
    ):
        with pytest.raises(ValidationFailed):
            stack.client.session(sid).configure_lm(profile="default", **params)
        cases += 1
    # A profile the worker does not have.
    stack.client.session(sid).configure_lm(profile="attacker")
    err = stack.failure(PREDICT_TASK, sid, QA, {"question": "q"})
    assert type(err) is UnknownLMProfile and err.code == "unknown_lm_profile"
    cases += 1
    # A session record written around the store's validation (raw Redis).
    raw_lm = [
        {"profile": "default", "params": {"api_base": stack.attacker.base_url}},
        {"profile": "default", "params": {"api_key": "sk-mine", "model": "openai/other"}},
        {"profile": "default", "params": ["api_base", stack.attacker.base_url]},
    ]
    for lm_record in raw_lm:
        stack.store.redis.hset(stack.store.keys.session(sid), "lm", json.dumps(lm_record))
        err = stack.failure(PREDICT_TASK, sid, QA, {"question": "q"})
        assert type(err) is ValidationFailed and err.code == "validation_failed", err
        cases += 1
    # A stored program whose DSPy state names its own LM (endpoint and model), written
    # around store_program: the worker drops it and uses its own profile.
    stack.store.redis.hset(stack.store.keys.session(sid), "lm", "{}")
    state = {
        "lm": {"model": "openai/evil", "api_base": stack.attacker.base_url},
        "demos": [],
        "traces": [],
        "train": [],
        "signature": {"instructions": "x", "fields": []},
    }
    spec = {"module": "predict", "signature": QA, "state": state}
    stack.store.redis.hset(stack.store.keys.programs(sid), "p", json.dumps(spec))
    before = len(stack.lm.calls)
    result = stack.client.app.send_task(RUN_PROGRAM_TASK, args=[sid, "p", {"question": "q"}])
    assert result.get(timeout=30)["outputs"] == {"answer": "fake answer"}
    assert len(stack.lm.calls) == before + 1
    cases += 1
    # The same through store_program, for a ChainOfThought whose predictor's state names
    # an LM: stored without it, and it loads and runs on the worker's profile.
    cot = json.loads(json.dumps(dspy.ChainOfThought(QA).dump_state()))
    cot["predict"]["lm"] = {"model": "openai/evil", "api_base": stack.attacker.base_url}
    stored = stack.store.store_program(
        sid, "cot", {"module": "chain_of_thought", "signature": QA, "state": cot}
    )
    assert stored["state"]["predict"]["lm"] is None
    result = stack.client.app.send_task(RUN_PROGRAM_TASK, args=[sid, "cot", {"question": "q"}])
    assert result.get(timeout=30)["outputs"]["answer"] == "fake answer"
    assert len(stack.lm.calls) == before + 2
    cases += 1
    # No request, so no key, ever reached the attacker.
    assert stack.attacker.calls == [] and stack.attacker.unknown == []
    reliability.record(
        "lm_endpoint",
        cases=cases,
        passed=cases,
        lost="n/a (no fault injected)",
        figures="the attacker's endpoint got 0 requests",
    )


def test_no_tool_type_or_class_by_name(stack: Stack, reliability: Recorder) -> None:
    sid = stack.session()
    canary = stack.tmp / f"imported-{uuid.uuid4().hex[:6]}"
    cases = 0
    # (spec, refused by store_program?, the worker's code when written around the store)
    bad_specs: list[tuple[dict[str, Any], bool, str]] = [
        (
            {"module": "react", "signature": QA, "config": {"tools": ["os.system"]}},
            True,
            "invalid_program",
        ),
        (
            {"module": "react", "signature": QA, "config": {"tools": ["__import__"]}},
            False,
            "tool_not_found",
        ),
        (
            {"module": "react", "signature": QA, "config": {"tools": ["eval"]}},
            False,
            "tool_not_found",
        ),
        ({"module": "os.system", "signature": QA}, True, "invalid_program"),
        (
            {"module": "predict", "signature": "question -> answer: os.system"},
            True,
            "invalid_program",
        ),
        (
            {
                "module": "predict",
                "signature": f"question -> answer: __import__('os').mkdir('{canary}')",
            },
            True,
            "invalid_program",
        ),
        (
            {
                "module": "predict",
                "signature": {"inputs": ["q"], "outputs": [{"name": "a", "type": "builtins.eval"}]},
            },
            True,
            "invalid_program",
        ),
        (
            {"module": "predict", "signature": QA, "config": {"lm": "openai/x"}},
            True,
            "invalid_program",
        ),
    ]
    for spec, store_refuses, worker_code in bad_specs:
        if store_refuses:
            with pytest.raises(InvalidProgram):
                stack.store.store_program(sid, "p", spec)
        else:  # a well-formed name: only the worker knows whether it is registered
            stack.store.store_program(sid, "p", spec)
        # The same spec written around the store: the worker refuses it too.
        stack.store.redis.hset(stack.store.keys.programs(sid), "p", json.dumps(spec))
        err = stack.failure(RUN_PROGRAM_TASK, sid, "p", {"question": "q"})
        assert err.code == worker_code, (spec, err)
        if worker_code == "tool_not_found":
            assert type(err) is ToolNotFound and err.details["tools"] == spec["config"]["tools"]
        cases += 2
    for signature in ("question -> answer: os.system", "question -> answer: __import__('os')"):
        err = stack.failure(PREDICT_TASK, sid, signature, {"question": "q"})
        assert type(err) is InvalidProgram, err
        cases += 1
    assert not canary.exists()
    reliability.record("names", cases=cases, passed=cases, lost="n/a (no fault injected)")


def test_forged_failure_result_is_not_executed(stack: Stack, reliability: Recorder) -> None:
    forged = [("os", "system"), ("builtins", "eval"), ("subprocess", "Popen"), ("os", "mkdir")]
    canary = stack.tmp / f"forged-{uuid.uuid4().hex[:6]}"
    for module, name in forged:
        tid = str(uuid.uuid4())
        payload = f"mkdir {canary}" if name == "system" else str(canary)
        meta = {
            "status": "FAILURE",
            "result": {"exc_type": name, "exc_module": module, "exc_message": [payload]},
            "traceback": None,
            "children": [],
            "date_done": datetime.now(UTC).isoformat(),
            "task_id": tid,
        }
        stack.store.redis.set(f"celery-task-meta-{tid}", json.dumps(meta))
        with pytest.raises(SecurityError):
            stack.client.result(tid).get(timeout=5)
        with pytest.raises(SecurityError):
            stack.client.app.AsyncResult(tid).get(timeout=5, propagate=True)
    assert not canary.exists()
    reliability.record(
        "forged_result",
        cases=len(forged),
        passed=len(forged),
        lost="n/a (no fault injected)",
        figures="celery SecurityError, nothing called",
    )


# --- session ids, size limits -------------------------------------------------------------


def test_session_ids_cannot_reach_other_keys(stack: Stack, reliability: Recorder) -> None:
    store = stack.store
    cases = 0
    for bad in ("a}*", "{b}", "*", "a b", "?", "[ab]", "a\\", "sec-x}:vars", ""):
        with pytest.raises(InvalidSessionId):
            store.create_session(bad)
        with pytest.raises(InvalidSessionId):
            store.get_variable(bad, "answer")
        with pytest.raises(InvalidSessionId):
            stack.client.submit("predict", bad, QA, {"question": "q"})
        err = stack.failure(PREDICT_TASK, bad, QA, {"question": "q"})
        assert type(err) is InvalidSessionId and err.code == "invalid_session_id"
        cases += 4
    # Ids that are prefixes of each other or share characters stay apart.
    base = f"iso{uuid.uuid4().hex[:4]}"
    ids = [base, f"{base}b", f"{base}.b", f"{base}:b", f"{base}-b", f"{base}@b", f"{base}_b"]
    for sid in ids:
        store.create_session(sid)
        store.register_variable(sid, "v", "string", sid)
        store.store_program(sid, "p", {"module": "predict", "signature": QA})
    raw = store.redis
    for sid in ids:
        keys = set(raw.scan_iter(match=store.keys.session_pattern(sid), count=1000))
        assert keys == {
            store.keys.session(sid),
            store.keys.variables(sid),
            store.keys.programs(sid),
            store.keys.program_versions(sid),
            store.keys.events(sid),
        }
        assert store.get_value(sid, "v") == sid
        cases += 1
    store.delete_session(base)
    assert all(store.get_value(sid, "v") == sid for sid in ids[1:])
    reliability.record("session_ids", cases=cases, passed=cases, lost="n/a (no fault injected)")


def test_size_limits(stack: Stack, reliability: Recorder) -> None:
    sid = stack.session()
    store = stack.store
    store.register_variable(sid, "answer", "string", "")
    big = "x" * LIMIT_VALUE
    attempts = [
        lambda: store.register_variable(sid, "v", "string", big),
        lambda: store.update_variable(sid, "answer", big),
        lambda: store.update_session_metadata(sid, {"note": big}),
        lambda: store.store_program(
            sid,
            "p",
            {
                "module": "predict",
                "signature": {"instructions": big, "inputs": ["q"], "outputs": ["a"]},
            },
        ),
        lambda: stack.client.session(sid).predict(QA, question="y" * LIMIT_INPUTS),
    ]
    for attempt in attempts:
        with pytest.raises(PayloadTooLarge) as info:
            attempt()
        assert info.value.code == "payload_too_large"
        assert "over the limit" in info.value.message
        assert info.value.details["size_bytes"] > info.value.details["limit_bytes"]
    # The same inputs sent by name, past the producer's check: the worker refuses them.
    err = stack.failure(PREDICT_TASK, sid, QA, {"question": "y" * LIMIT_INPUTS})
    assert type(err) is PayloadTooLarge and err.details["limit_bytes"] == LIMIT_INPUTS
    # An LM answer over the result limit: refused, nothing written.
    handle = stack.client.session(sid).predict(
        QA, question=f"HUGE[{LIMIT_RESULT}]", options={"store_outputs": ["answer"]}
    )
    with pytest.raises(PayloadTooLarge) as info:
        handle.get(timeout=30)
    assert "result" in info.value.message and info.value.details["limit_bytes"] == LIMIT_RESULT
    assert store.get_variable(sid, "answer").version == 1
    cases = len(attempts) + 2
    reliability.record(
        "size_limits",
        cases=cases,
        passed=cases,
        lost="n/a (no fault injected)",
        figures=f"limits: value {LIMIT_VALUE} B, inputs {LIMIT_INPUTS} B, result {LIMIT_RESULT} B",
    )


# --- authenticated Redis, Flower ----------------------------------------------------------


def test_redis_requirepass_and_acl_user(tmp_path: Path, reliability: Recorder) -> None:
    admin_pw, user_pw = f"adm-{secrets.token_hex(8)}", f"usr-{secrets.token_hex(8)}"
    srv = start_redis_server(data_dir=tmp_path / "redis")
    try:
        redis.Redis(port=srv.port).config_set("requirepass", admin_pw)
        admin = redis.Redis(port=srv.port, password=admin_pw)
        admin.execute_command(
            "ACL", "SETUSER", "dspex", "on", f">{user_pw}", "~*", "&*", "+@all", "-@admin"
        )
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=srv.port).ping()  # the server really wants a password
        urls = {
            "requirepass": f"redis://:{admin_pw}@127.0.0.1:{srv.port}",
            "acl user": f"redis://dspex:{user_pw}@127.0.0.1:{srv.port}",
        }
        envs = {
            kind: base_env(
                with_db(url, db),
                f"auth{db}",
                DSPEX_LM_PROFILES='{"default": {"model": "dspex/echo"}}',
            )
            for db, (kind, url) in enumerate(urls.items(), start=1)
        }
        with stopping(*(start_worker(env, tmp_path) for env in envs.values())) as workers:
            for w in workers:
                w.wait_log(" ready.", 30)
            for env in envs.values():
                with Client(settings=Settings.from_env(env)) as client:
                    s = client.create_session()
                    s.register_variable("answer", "string", "")
                    out = s.predict(QA, question="hi", options={"store_outputs": ["answer"]}).get(
                        timeout=30
                    )
                    assert out["answer"].startswith("echo answer")
                    assert s.variable("answer").version == 2
            logs = "\n".join(w.log() for w in workers)
        for pw in (admin_pw, user_pw):
            assert pw not in logs
        assert ":**@127.0.0.1" in logs  # the banner shows the URL with the password masked
        # A wrong password fails at once as a configuration error (no retry can fix it),
        # naming the setting to check and not echoing the password.
        bad = SessionStore.from_url(f"redis://dspex:wrong-{user_pw}@127.0.0.1:{srv.port}/1")
        t0 = time.monotonic()
        with pytest.raises(ConfigError) as info:
            bad.get_session("anything")
        elapsed = time.monotonic() - t0
        assert info.value.code == "invalid_settings" and "DSPEX_REDIS_URL" in info.value.message
        assert user_pw not in info.value.message
        bad.close()
    finally:
        srv.stop()
    reliability.record(
        "redis_auth",
        cases=3,
        passed=3,
        lost="n/a (no fault injected)",
        figures=(
            "a worker and a task with each; a wrong password is invalid_settings "
            f"in {elapsed * 1000:.0f} ms"
        ),
    )


def test_flower_api_requires_auth(stack: Stack, reliability: Recorder) -> None:
    user, pw = "ops", f"fl-{secrets.token_hex(6)}"
    port = free_port()
    env = {
        **{k: v for k, v in stack.env.items() if k not in ("MY_KEY", "OPENAI_API_KEY")},
        "DSPEX_FLOWER_USER": user,
        "DSPEX_FLOWER_PASSWORD": pw,
    }
    flower = flower_proc(env, stack.tmp, port, f"{user}:{pw}")
    base = f"http://127.0.0.1:{port}"

    def call(path: str, auth: tuple[str, str] | None, body: bytes | None = None) -> int:
        req = urllib.request.Request(base + path, data=body, method="POST" if body else "GET")
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        if body:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=15) as response:
                return int(response.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    sid = stack.session()
    body = json.dumps({"args": [sid, QA, {"question": "q"}]}).encode()
    queued_before = stack.store.redis.llen("dspex")
    with stopping(flower):
        flower.wait_log("Visit me at", 30)
        checks = {
            "workers, no auth": call("/api/workers", None),
            "workers, wrong password": call("/api/workers", (user, "nope")),
            "workers, wrong user": call("/api/workers", ("admin", pw)),
            "async-apply, no auth": call("/api/task/async-apply/dspex.predict", None, body),
            "tasks, no auth": call("/api/tasks", None),
        }
        ok = call("/api/workers?refresh=1", (user, pw))
    assert all(status == 401 for status in checks.values()), checks
    assert ok == 200
    assert stack.store.redis.llen("dspex") == queued_before  # nothing was enqueued
    assert pw not in flower.log()
    reliability.record(
        "flower_auth",
        cases=len(checks) + 1,
        passed=len(checks) + 1,
        lost="n/a (no fault injected)",
        figures="401 without or with wrong credentials, 200 with them",
    )


def test_cli_does_not_print_secrets(stack: Stack) -> None:
    """``dspex-tasks worker --print-command`` and errors never show URL passwords."""
    pw = f"pw-{secrets.token_hex(6)}"
    env = {**stack.env, "DSPEX_REDIS_URL": f"redis://:{pw}@127.0.0.1:1/0"}
    proc = subprocess.run(
        [sys.executable, "-m", "dspex_tasks.cli", "--json", "session", "show", "x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["error"]["code"] == "store_unavailable"
    assert pw not in proc.stdout + proc.stderr
