"""Bad input, table-driven, through every entry point: the store API, raw task messages
sent by name as a foreign producer would, raw broker messages, the CLI, and Flower's
HTTP API.

Every case runs against a fresh session holding variables and a program, and checks:
the expected error class and code, a readable message (one line, no traceback, naming
what was wrong), and that the session's state is byte-identical afterwards (DUMP of
every key of the session, the record hash without the fields a touch changes). Broker
messages that cannot be decoded have no one to answer: the worker must log and discard
them without running anything.

Tasks run on the in-process worker of ``worker_fixtures`` (recording fake LM, inputs over
4 KB and results over 16 KB refused); the CLI runs as ``python -m dspex_tasks.cli``
and Flower as ``celery -A workers.monitor flower`` with basic auth, both against the
worker's Redis db and key prefix.
"""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from support.polling import wait_until
from support.procs import base_env, flower_proc, session_snapshot
from support.redis_server import free_port
from support.reliability import Recorder
from support.worker import MAX_INPUTS_BYTES, MAX_RESULT_BYTES, DspexWorker

from dspex_tasks import errors
from dspex_tasks.app import COT_TASK, EXPIRE_TASK, PREDICT_TASK, RUN_PROGRAM_TASK
from dspex_tasks.store import SessionStore

pytestmark = pytest.mark.fault


QA = "question -> answer"
FLOWER_AUTH = ("checker", "s3cret-flower")


def _all_errors(cls: type[errors.DspexError]) -> list[type[errors.DspexError]]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _all_errors(sub))]


#: code -> the error class that declares it (what a producer gets back).
ERROR_CLASSES = {c.code: c for c in _all_errors(errors.DspexError) if "code" in vars(c)}


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


# --- the session every case starts from ---------------------------------------------------


def fresh_session(store: SessionStore) -> str:
    sid = f"bi-{uuid.uuid4().hex[:10]}"
    store.create_session(sid, metadata={"owner": "bad-input"})
    store.register_variable(sid, "answer", "string", "before")
    store.register_variable(sid, "count", "integer", 3, constraints={"min": 0, "max": 10})
    store.register_variable(sid, "temperature", "float", 0.5, constraints={"max": 2})
    store.store_program(sid, "qa", {"module": "predict", "signature": QA})
    return sid


# --- what a case observed -------------------------------------------------------------------


@dataclass
class Observed:
    code: str
    message: str
    cls: type[errors.DspexError] | None = None


@dataclass
class Ctx:
    worker: DspexWorker
    raw: redis.Redis
    cli_env: dict[str, str]
    flower_url: str
    log: list[logging.LogRecord]


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # store | task | wire | cli | flower
    code: str  # the expected error code ("discarded" for wire cases)
    act: Callable[[Ctx, str], Observed]
    hint: str = ""  # text the message must contain
    setup: Callable[[Ctx, str], None] | None = None
    lm_calls: int = 0  # LM calls the case may make (its marker is the case id)


CASES: list[Case] = []


def case(kind: str, cid: str, code: str, hint: str = "", **kw: Any) -> Callable[..., Any]:
    def register(act: Callable[[Ctx, str], Observed]) -> Callable[[Ctx, str], Observed]:
        CASES.append(Case(cid, kind, code, act, hint, **kw))
        return act

    return register


def raises(fn: Callable[[], Any]) -> Observed:
    try:
        fn()
    except errors.DspexError as e:
        return Observed(e.code, e.message, type(e))
    raise AssertionError("no DspexError raised")


# --- store API ----------------------------------------------------------------------------


def store_case(
    cid: str, code: str, call: Callable[[SessionStore, str], Any], hint: str = ""
) -> None:
    case("store", cid, code, hint)(lambda ctx, sid: raises(lambda: call(ctx.worker.store, sid)))


for bad_id in ["a}*", "{b}", "*", "a b", "x" * 129, "", "\ud800", "a\nb", "s:{x}:vars"]:
    store_case(
        f"store-create-id-{bad_id.encode('unicode_escape').decode()[:12] or 'empty'}",
        "invalid_session_id",
        lambda s, sid, b=bad_id: s.create_session(b),
        "invalid session id",
    )
store_case("store-read-id-glob", "invalid_session_id", lambda s, sid: s.get_variable("*", "answer"))
store_case("store-delete-id-brace", "invalid_session_id", lambda s, sid: s.delete_session("a}*"))
store_case("store-create-exists", "session_exists", lambda s, sid: s.create_session(sid), "exists")
store_case(
    "store-create-ttl-negative",
    "validation_failed",
    lambda s, sid: s.create_session(f"{sid}-new", ttl_s=-1),
    "ttl_s",
)
store_case(
    "store-create-metadata-list",
    "validation_failed",
    lambda s, sid: s.create_session(f"{sid}-new", metadata=[1, 2]),
    "metadata",
)
store_case("store-unknown-session", "session_not_found", lambda s, sid: s.get_session("bi-nope"))
store_case(
    "store-register-duplicate",
    "variable_exists",
    lambda s, sid: s.register_variable(sid, "answer", "string", "x"),
    "answer",
)
store_case(
    "store-register-unknown-type",
    "unknown_type",
    lambda s, sid: s.register_variable(sid, "v", "os.system", 1),
    "os.system",
)
store_case(
    "store-register-wrong-type",
    "validation_failed",
    lambda s, sid: s.register_variable(sid, "v", "integer", "seven"),
    "seven",
)
store_case(
    "store-register-bad-constraint",
    "validation_failed",
    lambda s, sid: s.register_variable(sid, "v", "float", 1.0, constraints={"min": "zero"}),
    "min",
)
store_case(
    "store-register-bad-name",
    "validation_failed",
    lambda s, sid: s.register_variable(sid, "bad name!", "string", "x"),
    "variable name",
)
store_case(
    "store-register-lone-surrogate",
    "validation_failed",
    lambda s, sid: s.register_variable(sid, "v", "string", "\ud800"),
)
store_case(
    "store-register-huge",
    "payload_too_large",
    lambda s, sid: s.register_variable(sid, "v", "string", "x" * (1_048_576 + 1)),
    "limit",
)
store_case(
    "store-register-embedding-types",
    "validation_failed",
    lambda s, sid: s.register_variable(sid, "e", "embedding", [1.0, "x"]),
)
store_case(
    "store-update-constraint",
    "validation_failed",
    lambda s, sid: s.update_variable(sid, "count", 11),
    "count",
)
store_case(
    "store-update-type",
    "validation_failed",
    lambda s, sid: s.update_variable(sid, "count", "3"),
    "count",
)
store_case(
    "store-update-cas-conflict",
    "version_conflict",
    lambda s, sid: s.update_variable(sid, "count", 4, expected_version=99),
    "version",
)
store_case(
    "store-update-missing",
    "variable_not_found",
    lambda s, sid: s.update_variable(sid, "nope", 1),
    "nope",
)
store_case(
    "store-update-many-atomic",
    "validation_failed",
    lambda s, sid: s.update_variables(sid, {"count": 4, "answer": 5}, atomic=True),
    "answer",
)
store_case(
    "store-metadata-nesting-bomb",
    "validation_failed",
    lambda s, sid: s.update_session_metadata(sid, {"deep": _nested(300)}),
)
store_case(
    "store-lm-api-base",
    "validation_failed",
    lambda s, sid: s.set_session_lm(sid, profile="default", api_base="http://evil.example"),
    "api_base",
)
store_case(
    "store-lm-bad-profile-name",
    "validation_failed",
    lambda s, sid: s.set_session_lm(sid, profile="../../etc"),
    "profile",
)
store_case(
    "store-lm-temperature-range",
    "validation_failed",
    lambda s, sid: s.set_session_lm(sid, temperature=5),
    "temperature",
)
store_case(
    "store-program-module",
    "invalid_program",
    lambda s, sid: s.store_program(sid, "p", {"module": "eval", "signature": QA}),
    "eval",
)
store_case(
    "store-program-field-type",
    "invalid_program",
    lambda s, sid: s.store_program(
        sid, "p", {"module": "predict", "signature": "q -> a: os.system"}
    ),
    "os.system",
)
store_case(
    "store-program-id",
    "invalid_program",
    lambda s, sid: s.store_program(sid, "p}*", {"module": "predict", "signature": QA}),
    "program id",
)
store_case(
    "store-program-missing",
    "program_not_found",
    lambda s, sid: s.get_program(sid, "nope"),
    "nope",
)
store_case(
    "store-delete-variable-missing",
    "variable_not_found",
    lambda s, sid: s.delete_variable(sid, "nope"),
    "nope",
)


# --- raw task messages by name (send_task, JSON args) -------------------------------------


def q(cid: str, text: str = "What is 2 + 2?") -> dict[str, str]:
    return {"question": f"{text} MARK[{cid}]"}


def task_case(
    cid: str,
    code: str,
    task: str,
    args: Callable[[str], list[Any]],
    kwargs: dict[str, Any] | None = None,
    hint: str = "",
    **kw: Any,
) -> None:
    def act(ctx: Ctx, sid: str) -> Observed:
        err = ctx.worker.failure(task, *args(sid), **(kwargs or {}))
        return Observed(err.code, err.message, type(err))

    case("task", cid, code, hint, **kw)(act)


def set_lm_profile(ctx: Ctx, sid: str) -> None:
    ctx.worker.store.set_session_lm(sid, profile="no-such-profile")


def huge_answer(ctx: Ctx, sid: str) -> None:
    ctx.worker.recorder.script("task-result-huge", lambda call: {"answer": "z" * MAX_RESULT_BYTES})


task_case(
    "task-arity-one", "invalid_inputs", PREDICT_TASK, lambda s: [s], hint="bad task arguments"
)
task_case(
    "task-arity-five",
    "invalid_inputs",
    PREDICT_TASK,
    lambda s: [s, QA, q("task-arity-five"), None, "surplus"],
    hint="bad task arguments",
)
task_case(
    "task-unknown-kwarg",
    "invalid_inputs",
    PREDICT_TASK,
    lambda s: [s, QA, q("task-unknown-kwarg")],
    {"temperature": 0.1},
    hint="temperature",
)
task_case("task-cot-no-args", "invalid_inputs", COT_TASK, lambda s: [], hint="bad task arguments")
task_case("task-program-arity", "invalid_inputs", RUN_PROGRAM_TASK, lambda s: [s, "qa"])
task_case("task-expire-arg", "invalid_inputs", EXPIRE_TASK, lambda s: ["now"])
task_case("task-sid-int", "invalid_session_id", PREDICT_TASK, lambda s: [42, QA, q("task-sid-int")])
task_case(
    "task-sid-null", "invalid_session_id", PREDICT_TASK, lambda s: [None, QA, q("task-sid-null")]
)
task_case(
    "task-sid-list", "invalid_session_id", PREDICT_TASK, lambda s: [[s], QA, q("task-sid-list")]
)
for n, bad_id in enumerate(["a}*", "{b}", "*", "a b", "\ud800"]):
    task_case(
        f"task-sid-{n}",
        "invalid_session_id",
        PREDICT_TASK,
        lambda s, b=bad_id, n=n: [b, QA, q(f"task-sid-{n}")],
        hint="invalid session id",
    )
task_case(
    "task-unknown-session",
    "session_not_found",
    PREDICT_TASK,
    lambda s: ["bi-no-such-session", QA, q("task-unknown-session")],
)
task_case(
    "task-unknown-program",
    "program_not_found",
    RUN_PROGRAM_TASK,
    lambda s: [s, "nope", q("task-unknown-program")],
    hint="nope",
)
task_case(
    "task-program-id-glob",
    "invalid_program",
    RUN_PROGRAM_TASK,
    lambda s: [s, "qa}*", q("task-program-id-glob")],
    hint="program id",
)
for n, sig in enumerate(
    [
        "question answer",
        "question -> answer -> more",
        "question -> answer: os.system",
        "question -> answer: __import__('os')",
        "question, question -> answer",
        "-> answer",
        "question -> reasoning",
        "question -> answer: list[os.system]",
    ]
):
    task_case(
        f"task-signature-{n}",
        "invalid_program",
        PREDICT_TASK,
        lambda s, sig=sig, n=n: [s, sig, q(f"task-signature-{n}")],
    )
task_case(
    "task-signature-int",
    "invalid_program",
    PREDICT_TASK,
    lambda s: [s, 42, q("task-signature-int")],
)
task_case(
    "task-signature-null",
    "invalid_program",
    COT_TASK,
    lambda s: [s, None, q("task-signature-null")],
)
task_case(
    "task-signature-extra-key",
    "invalid_program",
    PREDICT_TASK,
    lambda s: [
        s,
        {"inputs": ["question"], "outputs": ["answer"], "eval": "1"},
        q("task-signature-extra-key"),
    ],
    hint="eval",
)
task_case(
    "task-inputs-missing", "invalid_inputs", PREDICT_TASK, lambda s: [s, QA, {}], hint="question"
)
task_case(
    "task-inputs-extra",
    "invalid_inputs",
    PREDICT_TASK,
    lambda s: [s, QA, {**q("task-inputs-extra"), "extra": "y"}],
    hint="extra",
)
task_case("task-inputs-type", "invalid_inputs", PREDICT_TASK, lambda s: [s, QA, {"question": 42}])
task_case("task-inputs-list", "invalid_inputs", PREDICT_TASK, lambda s: [s, QA, ["question"]])
task_case("task-inputs-string", "invalid_inputs", PREDICT_TASK, lambda s: [s, QA, "question"])
task_case(
    "task-inputs-nesting",
    "invalid_inputs",
    PREDICT_TASK,
    lambda s: [s, "question: list[str] -> answer", {"question": _nested(300)}],
)
task_case(
    "task-inputs-lone-surrogate",
    "invalid_inputs",
    PREDICT_TASK,
    lambda s: [s, QA, {"question": "half a pair: \ud800"}],
    hint="surrogate",
)
task_case(
    "task-inputs-over-limit",
    "payload_too_large",
    PREDICT_TASK,
    lambda s: [s, QA, q("task-inputs-over-limit", "y" * MAX_INPUTS_BYTES)],
    hint="limit",
)
task_case(
    "task-inputs-huge",
    "payload_too_large",
    PREDICT_TASK,
    lambda s: [s, QA, q("task-inputs-huge", "y" * 1_000_000)],
    hint="limit",
)
task_case(
    "task-options-string",
    "invalid_inputs",
    PREDICT_TASK,
    lambda s: [s, QA, q("task-options-string"), "all"],
)
task_case(
    "task-options-unknown",
    "invalid_inputs",
    PREDICT_TASK,
    lambda s: [s, QA, q("task-options-unknown"), {"api_base": "http://evil.example"}],
    hint="api_base",
)
task_case(
    "task-store-outputs-not-an-output",
    "invalid_inputs",
    PREDICT_TASK,
    lambda s: [s, QA, q("task-store-outputs-not-an-output"), {"store_outputs": ["count"]}],
    hint="count",
)
task_case(
    "task-store-outputs-no-variable",
    "variable_not_found",
    PREDICT_TASK,
    lambda s: [s, QA, q("task-store-outputs-no-variable"), {"store_outputs": {"answer": "nope"}}],
    hint="nope",
    lm_calls=1,
)
task_case(
    "task-store-outputs-wrong-type",
    "validation_failed",
    PREDICT_TASK,
    lambda s: [s, QA, q("task-store-outputs-wrong-type"), {"store_outputs": {"answer": "count"}}],
    hint="count",
    lm_calls=1,
)
task_case(
    "task-result-huge",
    "payload_too_large",
    PREDICT_TASK,
    lambda s: [s, QA, q("task-result-huge")],
    hint="result",
    setup=huge_answer,
    lm_calls=1,
)
task_case(
    "task-unknown-profile",
    "unknown_lm_profile",
    PREDICT_TASK,
    lambda s: [s, QA, q("task-unknown-profile")],
    hint="no-such-profile",
    setup=set_lm_profile,
)


# --- raw broker messages ------------------------------------------------------------------


def publish(ctx: Ctx, body: bytes, headers: dict[str, Any], content_type: str) -> None:
    with ctx.worker.producer.connection_for_write() as conn:
        conn.Producer().publish(
            body,
            exchange="",
            routing_key="dspex",
            content_type=content_type,
            content_encoding="binary",
            headers=headers,
        )


def wire_case(
    cid: str,
    body: Callable[[str], bytes],
    log_text: str,
    task: str = PREDICT_TASK,
    result_exc: str | None = None,
) -> None:
    """A message the worker must log and discard without running anything. Only a
    message it could decode gets a result: a FAILURE naming ``result_exc``."""

    def act(ctx: Ctx, sid: str) -> Observed:
        tid = str(uuid.uuid4())
        before = len(ctx.log)
        publish(ctx, body(sid), {"task": task, "id": tid, "lang": "py"}, "application/json")

        def logged() -> str | None:
            for record in ctx.log[before:]:
                text = record.getMessage()
                if log_text in text:
                    return text
            return None

        message = wait_until(logged, 15, what=f"the worker to log {log_text!r}")
        r = ctx.worker.store.redis
        wait_until(
            lambda: r.llen("dspex") == 0 and r.zcard("unacked_index") == 0, 10, what="discard"
        )
        meta_key = f"celery-task-meta-{tid}"
        if result_exc is None:
            assert r.get(meta_key) is None  # never ran, no result
        else:
            stored = json.loads(wait_until(lambda: r.get(meta_key), 10, what="the failure result"))
            assert stored["status"] == "FAILURE", stored
            assert stored["result"]["exc_type"] == result_exc, stored
        return Observed("discarded", message.splitlines()[0][:300])

    case("wire", cid, "discarded")(act)


def v2_body(sid: str, question: str) -> bytes:
    return json.dumps([[sid, QA, {"question": question}], {}, {}]).encode()


wire_case(
    "wire-not-utf8",
    lambda sid: (
        b'[["' + sid.encode() + b'", "question -> answer", {"question": "\xff\xfe"}], {}, {}]'
    ),
    "Can't decode message body",
)
wire_case(
    "wire-surrogate-bytes",
    lambda sid: v2_body(sid, "@").replace(b"@", b"\xed\xa0\x80"),
    "Can't decode message body",
)
wire_case("wire-nesting-bomb", lambda sid: b"[" * 200_000, "Can't decode message body")
wire_case(
    "wire-unknown-task",
    lambda sid: v2_body(sid, "x"),
    "Received unregistered task of type 'dspex.nope'",
    task="dspex.nope",
    result_exc="NotRegistered",
)


# --- CLI ----------------------------------------------------------------------------------

CLI = [sys.executable, "-m", "dspex_tasks.cli"]


def cli_case(cid: str, code: str, argv: Callable[[str], list[str]], hint: str = "") -> None:
    def act(ctx: Ctx, sid: str) -> Observed:
        args = argv(sid)
        as_json = subprocess.run(
            [*CLI, "--json", *args], env=ctx.cli_env, capture_output=True, text=True, timeout=60
        )
        assert as_json.returncode == 2, as_json
        lines = as_json.stdout.splitlines()
        assert len(lines) == 1, as_json  # exactly one JSON document
        error = json.loads(lines[0])["error"]
        assert set(error) == {"code", "message", "details"}, error
        as_text = subprocess.run(
            [*CLI, *args], env=ctx.cli_env, capture_output=True, text=True, timeout=60
        )
        assert as_text.returncode == 2, as_text
        assert as_text.stdout == "", as_text
        assert as_text.stderr.startswith(f"error: {error['code']}: "), as_text
        assert len(as_text.stderr.strip().splitlines()) == 1, as_text
        return Observed(error["code"], error["message"], ERROR_CLASSES.get(error["code"]))

    case("cli", cid, code, hint)(act)


cli_case("cli-show-glob-id", "invalid_session_id", lambda s: ["session", "show", "a}*"])
cli_case("cli-create-brace-id", "invalid_session_id", lambda s: ["session", "create", "{b}"])
cli_case("cli-show-unknown", "session_not_found", lambda s: ["session", "show", "bi-nope"])
cli_case(
    "cli-var-constraint", "validation_failed", lambda s: ["var", "set", s, "count", "11"], "count"
)
cli_case("cli-var-type", "validation_failed", lambda s: ["var", "set", s, "count", "eleven"])
cli_case(
    "cli-var-cas",
    "version_conflict",
    lambda s: ["var", "set", s, "count", "4", "--expected-version", "99"],
)
cli_case("cli-var-missing", "variable_not_found", lambda s: ["var", "get", s, "nope"], "nope")
cli_case(
    "cli-var-unknown-type",
    "unknown_type",
    lambda s: ["var", "set", s, "v", "1", "--type", "os.system"],
)
cli_case(
    "cli-var-exists",
    "variable_exists",
    lambda s: ["var", "set", s, "answer", "x", "--type", "string"],
)
cli_case(
    "cli-predict-signature",
    "invalid_program",
    lambda s: ["predict", s, "question answer", "question=x"],
)
cli_case(
    "cli-predict-type-name",
    "invalid_program",
    lambda s: ["predict", s, "question -> answer: os.system", "question=x"],
    "os.system",
)
cli_case("cli-predict-no-inputs", "invalid_inputs", lambda s: ["predict", s, QA], "question")
cli_case(
    "cli-predict-extra-input",
    "invalid_inputs",
    lambda s: ["predict", s, QA, "question=x", "extra=y"],
    "extra",
)
cli_case(
    "cli-predict-huge",
    "payload_too_large",
    lambda s: ["predict", s, QA, "--inputs", json.dumps({"question": "y" * 5000})],
)
cli_case("cli-run-unknown-program", "program_not_found", lambda s: ["run", s, "nope", "question=x"])
cli_case(
    "cli-predict-unknown-session",
    "session_not_found",
    lambda s: ["predict", "bi-nope", QA, "question=x"],
)


# --- Flower HTTP API ----------------------------------------------------------------------


def http(
    ctx: Ctx, path: str, body: bytes | None = None, auth: tuple[str, str] | None = FLOWER_AUTH
) -> tuple[int, Any]:
    request = urllib.request.Request(
        ctx.flower_url + path, data=body, method="POST" if body else "GET"
    )
    if body is not None:
        request.add_header("Content-Type", "application/json")
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def flower_case(
    cid: str, code: str, body: Callable[[str], str], task: str = PREDICT_TASK, hint: str = ""
) -> None:
    def act(ctx: Ctx, sid: str) -> Observed:
        status, reply = http(ctx, f"/api/task/async-apply/{task}", body(sid).encode())
        assert status == 200, (status, reply)
        tid = reply["task-id"]
        deadline = time.monotonic() + 30
        while True:
            status, result = http(ctx, f"/api/task/result/{tid}?timeout=5")
            assert status == 200, (status, result)
            # Flower reads the state before it waits: poll until it says so.
            if result["state"] in ("FAILURE", "SUCCESS") or time.monotonic() > deadline:
                break
        assert result["state"] == "FAILURE", result
        # JSON, in the shape of a raw Celery result; no worker traceback.
        assert result["traceback"] is None, result
        error = result["result"]
        assert error["exc_module"] == "dspex_tasks.errors", result
        message, wire = error["exc_message"]
        assert ERROR_CLASSES[wire["code"]].__name__ == error["exc_type"], result
        return Observed(wire["code"], message, ERROR_CLASSES.get(wire["code"]))

    case("flower", cid, code, hint)(act)


def args_json(*args: Any) -> Callable[[str], str]:
    return lambda sid: json.dumps({"args": [sid if a is SID else a for a in args]})


SID = object()
flower_case("flower-arity", "invalid_inputs", args_json(SID), hint="bad task arguments")
flower_case(
    "flower-unknown-session", "session_not_found", args_json("bi-nope", QA, {"question": "x"})
)
flower_case("flower-glob-id", "invalid_session_id", args_json("a}*", QA, {"question": "x"}))
flower_case("flower-signature", "invalid_program", args_json(SID, "q -> a: eval", {"q": "x"}))
flower_case("flower-missing-input", "invalid_inputs", args_json(SID, QA, {}), hint="question")
flower_case(
    "flower-huge-input",
    "payload_too_large",
    args_json(SID, QA, {"question": "y" * MAX_INPUTS_BYTES}),
)
flower_case(
    "flower-lone-surrogate",
    "invalid_inputs",
    lambda sid: '{"args": ["' + sid + '", "question -> answer", {"question": "\\ud800"}]}',
    hint="surrogate",
)
flower_case(
    "flower-unknown-program",
    "program_not_found",
    args_json(SID, "nope", {"question": "x"}),
    task=RUN_PROGRAM_TASK,
)


# --- the test -------------------------------------------------------------------------------


class _Capture(logging.Handler):
    def __init__(self, sink: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record)


@pytest.fixture(scope="module")
def ctx(dspex: DspexWorker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    records: list[logging.LogRecord] = []
    handler = _Capture(records)
    celery_log = logging.getLogger("celery")
    celery_log.addHandler(handler)
    env = base_env(
        dspex.url,
        dspex.prefix,
        DSPEX_MAX_INPUTS_BYTES=str(MAX_INPUTS_BYTES),
        DSPEX_FLOWER_USER=FLOWER_AUTH[0],
        DSPEX_FLOWER_PASSWORD=FLOWER_AUTH[1],
    )
    port = free_port()
    flower = flower_proc(env, tmp_path_factory.mktemp("flower"), port, ":".join(FLOWER_AUTH))
    raw = redis.Redis.from_url(dspex.url)
    try:
        flower.wait_log("Visit me at", 30)
        yield Ctx(dspex, raw, env, f"http://127.0.0.1:{port}", records)
    finally:
        celery_log.removeHandler(handler)
        flower.stop()
        raw.close()


PASSED: dict[str, int] = {}


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input(ctx: Ctx, c: Case) -> None:
    store = ctx.worker.store
    sid = fresh_session(store)
    if c.setup:
        c.setup(ctx, sid)
    before = session_snapshot(ctx.raw, store, sid)
    assert before, "the session has keys"

    calls_before = ctx.worker.recorder.count()
    seen = c.act(ctx, sid)

    assert seen.code == c.code, (seen, c)
    if c.kind != "wire":  # the very class that declares the code
        assert seen.cls is ERROR_CLASSES[c.code], seen
    # A readable message: one line, no traceback, says what was wrong.
    assert 0 < len(seen.message) <= 600, seen
    assert "Traceback" not in seen.message and "\n" not in seen.message.strip(), seen
    assert c.hint.lower() in seen.message.lower(), (c.hint, seen)
    # Nothing changed: every key of the session is byte-identical.
    after = session_snapshot(ctx.raw, store, sid)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)}
    # No LM call beyond what the case allows: counted by the case's marker (every
    # question carries MARK[<case id>]) and in total, whatever the marker.
    assert len(ctx.worker.recorder.calls(c.id)) == c.lm_calls
    assert ctx.worker.recorder.count() - calls_before == c.lm_calls
    PASSED[c.kind] = PASSED.get(c.kind, 0) + 1


def test_bad_input_report(reliability: Recorder) -> None:
    totals: dict[str, int] = {}
    for c in CASES:
        totals[c.kind] = totals.get(c.kind, 0) + 1
    for kind, key in [
        ("store", "bad_store"),
        ("task", "bad_task"),
        ("wire", "bad_wire"),
        ("cli", "bad_cli"),
        ("flower", "bad_flower"),
    ]:
        reliability.record(
            key,
            cases=totals[kind],
            passed=PASSED.get(kind, 0),
            lost="n/a (no fault injected)",
            figures=(
                "logged and discarded by the worker, nothing ran, session byte-identical"
                if kind == "wire"
                else "expected class and code, readable message, session byte-identical"
            ),
        )
    # Recorded first, so a failing case shows in the report with the real count.
    assert sum(totals.values()) >= 60
    assert totals == PASSED, (PASSED, totals)
