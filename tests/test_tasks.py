"""The dspex Celery tasks end to end: real Redis, a real threads-pool worker, fake LMs.

Tasks are sent by name from a producer app (as a foreign producer would), so the
worker's own validation is what is tested, not the Client's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import dspy
import pytest
from support.polling import holds_for, wait_until
from support.store import wait_expired
from support.worker import (
    COMPLETION_TOKENS,
    MAX_INPUTS_BYTES,
    MAX_RESULT_BYTES,
    PROFILE_PARAMS,
    PROMPT_TOKENS,
    Call,
    DspexWorker,
    RateLimitError,
    default_answer,
    mark,
    observation_of,
    react_capital_steps,
)

from dspex_tasks.app import COT_TASK, EXPIRE_TASK, PREDICT_TASK, RUN_PROGRAM_TASK, make_celery
from dspex_tasks.client import close_app
from dspex_tasks.errors import (
    InvalidInputs,
    InvalidProgram,
    InvalidSessionId,
    LMError,
    PayloadTooLarge,
    ProgramNotFound,
    SessionExpired,
    SessionNotFound,
    ToolNotFound,
    UnknownLMProfile,
    ValidationFailed,
)
from dspex_tasks.settings import Settings
from dspex_tasks.tasks import register_tasks
from dspex_tasks.tools import tool, unregister_tool

ROOT = Path(__file__).resolve().parents[1]
QA = "question -> answer"


def q(marker: str, text: str = "What is the capital of France?") -> dict[str, str]:
    return {"question": f"{text} MARK[{marker}]"}


def only_call(w: DspexWorker, marker: str) -> Call:
    calls = w.recorder.calls(marker)
    assert len(calls) == 1, calls
    return calls[0]


# --- happy paths ----------------------------------------------------------------------


def test_predict_end_to_end(dspex: DspexWorker) -> None:
    sid, m = dspex.session(), mark()
    result = dspex.run(PREDICT_TASK, sid, QA, q(m))
    assert set(result) == {"session_id", "outputs", "lm", "duration_ms"}
    assert result["session_id"] == sid
    assert result["outputs"] == {"answer": f"answer for {m}"}
    assert set(result["lm"]) == {"model", "usage"}
    assert result["lm"]["model"] == "test/default"
    usage = result["lm"]["usage"]["test/default"]
    assert usage["prompt_tokens"] == PROMPT_TOKENS
    assert usage["completion_tokens"] == COMPLETION_TOKENS
    assert usage["total_tokens"] == PROMPT_TOKENS + COMPLETION_TOKENS
    assert isinstance(result["duration_ms"], float) and result["duration_ms"] > 0
    call = only_call(dspex, m)
    assert call.profile == "default" and call.field_names == ["answer"]
    assert "What is the capital of France?" in call.user


def test_chain_of_thought_end_to_end_with_typed_outputs(dspex: DspexWorker) -> None:
    sid, m = dspex.session(), mark()
    signature = "question -> answer, confidence: float, votes: int"
    result = dspex.run(COT_TASK, sid, signature, q(m))
    assert result["outputs"] == {
        "reasoning": f"reasoning for {m}",
        "answer": f"answer for {m}",
        "confidence": 0.25,
        "votes": 3,
    }
    assert type(result["outputs"]["votes"]) is int
    call = only_call(dspex, m)
    assert call.field_names == ["reasoning", "answer", "confidence", "votes"]


def test_bound_temperature_variable_sets_lm_params(dspex: DspexWorker) -> None:
    sid = dspex.session()
    base = PROFILE_PARAMS["default"]

    def seen() -> Call:
        m = mark()
        dspex.run(PREDICT_TASK, sid, QA, q(m))
        return only_call(dspex, m)

    first = seen()
    assert (first.temperature, first.max_tokens) == (base["temperature"], base["max_tokens"])

    dspex.store.register_variable(sid, "temperature", "float", 0.7, constraints={"max": 2})
    assert seen().temperature == 0.7

    dspex.store.update_variable(sid, "temperature", 1.3)
    after = seen()
    assert (after.temperature, after.max_tokens) == (1.3, base["max_tokens"])

    dspex.store.register_variable(sid, "max_tokens", "integer", 77)
    both = seen()
    assert (both.temperature, both.max_tokens) == (1.3, 77)
    # A variable that is not an LM parameter changes nothing.
    dspex.store.register_variable(sid, "style", "string", "terse")
    assert (seen().temperature, seen().max_tokens) == (1.3, 77)


def test_configure_lm_selects_profile_and_params(dspex: DspexWorker) -> None:
    sid = dspex.session()

    def seen() -> tuple[Call, dict[str, Any]]:
        m = mark()
        result = dspex.run(PREDICT_TASK, sid, QA, q(m))
        return only_call(dspex, m), result

    dspex.store.set_session_lm(sid, profile="alt", temperature=0.4, max_tokens=64)
    call, result = seen()
    assert (call.profile, call.temperature, call.max_tokens) == ("alt", 0.4, 64)
    assert result["lm"]["model"] == "test/alt"
    assert set(result["lm"]["usage"]) == {"test/alt"}

    # A bound variable wins over the session's LM params.
    dspex.store.register_variable(sid, "temperature", "float", 1.1)
    call, _ = seen()
    assert (call.profile, call.temperature, call.max_tokens) == ("alt", 1.1, 64)

    dspex.store.set_session_lm(sid, profile="default", top_p=0.9)
    call, result = seen()
    assert (call.profile, call.temperature, call.max_tokens, call.top_p) == (
        "default",
        1.1,
        PROFILE_PARAMS["default"]["max_tokens"],
        0.9,
    )
    assert result["lm"]["model"] == "test/default"


def test_stored_program_round_trip_with_demos(dspex: DspexWorker) -> None:
    sid = dspex.session()
    dspex.store.store_program(sid, "qa", {"module": "predict", "signature": QA})
    m1 = mark()
    result = dspex.run(RUN_PROGRAM_TASK, sid, "qa", q(m1))
    assert result["outputs"] == {"answer": f"answer for {m1}"}
    plain = only_call(dspex, m1)
    assert "DEMO-" not in plain.transcript

    # Optimize "offline" with DSPy: a Predict with demos, stored as dump_state() JSON.
    optimized = dspy.Predict(QA)
    optimized.demos = [
        dspy.Example(question="DEMO-Q capital of Italy?", answer="DEMO-A Rome"),
        dspy.Example(question="DEMO-Q capital of Spain?", answer="DEMO-A Madrid"),
    ]
    state = json.loads(json.dumps(optimized.dump_state()))
    dspex.store.store_program(sid, "qa", {"module": "predict", "signature": QA, "state": state})
    stored = dspex.store.get_program(sid, "qa")
    assert [d["answer"] for d in stored["state"]["demos"]] == ["DEMO-A Rome", "DEMO-A Madrid"]

    m2 = mark()
    result = dspex.run(RUN_PROGRAM_TASK, sid, "qa", q(m2))
    assert result["outputs"] == {"answer": f"answer for {m2}"}
    tuned = only_call(dspex, m2)
    for text in ("DEMO-Q capital of Italy?", "DEMO-A Rome", "DEMO-Q capital of Spain?"):
        assert text in tuned.transcript
    # Demos come before the real question, as earlier turns of the conversation.
    assert tuned.transcript.index("DEMO-A Madrid") < tuned.transcript.index(f"MARK[{m2}]")
    assert "DEMO-" not in tuned.user


def test_react_calls_a_registered_tool(dspex: DspexWorker) -> None:
    tool_calls: list[dict[str, Any]] = []

    @tool(name="capital_lookup")
    def capital_lookup(country: str) -> str:
        """Return the capital city of a country."""
        tool_calls.append({"country": country})
        return {"France": "Paris-from-tool"}.get(country, "unknown")

    def script(call: Call) -> dict[str, str]:
        step = react_capital_steps(call)
        if step is not None:
            return step
        observed = observation_of(call)
        return {"reasoning": f"The tool said {observed}.", "answer": observed}

    m = mark()
    dspex.recorder.script(m, script)
    try:
        sid = dspex.session()
        spec = {
            "module": "react",
            "signature": QA,
            "config": {"tools": ["capital_lookup"], "max_iters": 4},
        }
        dspex.store.store_program(sid, "agent", spec)
        result = dspex.run(RUN_PROGRAM_TASK, sid, "agent", q(m))
    finally:
        unregister_tool("capital_lookup")
    assert tool_calls == [{"country": "France"}]
    assert result["outputs"] == {
        "reasoning": "The tool said Paris-from-tool.",
        "answer": "Paris-from-tool",
    }
    steps = [c.field_names for c in dspex.recorder.calls(m)]
    react_step = ["next_thought", "next_tool_name", "next_tool_args"]
    assert steps == [react_step, react_step, ["reasoning", "answer"]]
    assert "capital_lookup" in dspex.recorder.calls(m)[0].transcript  # the tool was offered


def test_store_outputs_writes_typed_versioned_variables(dspex: DspexWorker) -> None:
    sid, store = dspex.session(), dspex.store
    store.register_variable(sid, "last_answer", "string", "none yet")
    store.register_variable(sid, "score", "float", 0.0, constraints={"min": 0, "max": 1})
    v_answer = store.get_variable(sid, "last_answer").version
    v_score = store.get_variable(sid, "score").version
    signature = "question -> answer, score: float"
    options = {"store_outputs": {"answer": "last_answer", "score": "score"}}

    m1 = mark()
    result = dspex.run(PREDICT_TASK, sid, signature, q(m1), options)
    assert result["outputs"] == {"answer": f"answer for {m1}", "score": 0.25}
    answer, score = store.get_variable(sid, "last_answer"), store.get_variable(sid, "score")
    assert (answer.value, answer.version) == (f"answer for {m1}", v_answer + 1)
    assert (score.value, score.version) == (0.25, v_score + 1)
    assert type(score.value) is float

    # The list form writes same-named variables; every run bumps the version again.
    store.register_variable(sid, "answer", "string", "")
    m2 = mark()
    dspex.run(COT_TASK, sid, QA, q(m2), {"store_outputs": ["answer"]})
    assert store.get_value(sid, "answer") == f"answer for {m2}"
    m3 = mark()
    dspex.run(PREDICT_TASK, sid, signature, q(m3), options)
    assert store.get_variable(sid, "last_answer").value == f"answer for {m3}"
    assert store.get_variable(sid, "last_answer").version == v_answer + 2

    # An output that breaks the variable's constraint: nothing is written (atomic).
    m4 = mark()
    dspex.recorder.script(m4, lambda call: {"answer": "too confident", "score": "5.0"})
    err = dspex.failure(PREDICT_TASK, sid, signature, q(m4), options)
    assert type(err) is ValidationFailed and err.code == "validation_failed"
    assert store.get_variable(sid, "last_answer").value == f"answer for {m3}"
    assert store.get_variable(sid, "score").version == v_score + 2


def test_final_tasks_leave_the_ledger(dspex: DspexWorker) -> None:
    """Every final outcome clears the task's ledger entry, so beat never resends it: a
    success that writes nothing (in its finish round trip), one that writes variables,
    and a failure (after it returns)."""
    sid, store = dspex.session(), dspex.store
    store.register_variable(sid, "answer", "string", "")
    plain, stored, failed = mark(), mark(), mark()
    dspex.recorder.script(failed, lambda call: {"answer": "z" * MAX_RESULT_BYTES})
    arguments = [[sid, QA, q(plain)], [sid, QA, q(stored), {"store_outputs": ["answer"]}]]
    arguments.append([sid, QA, q(failed)])
    sends = {f"ledger-{uuid.uuid4().hex}": args for args in arguments}
    store.record_sent([(tid, PREDICT_TASK, args, {}) for tid, args in sends.items()], 600)

    def recorded() -> list[str]:
        return [tid for tid in sends if store.redis.hexists(store.keys.ledger, tid)]

    assert recorded() == list(sends)
    handles = [dspex.producer.send_task(PREDICT_TASK, args=a, task_id=t) for t, a in sends.items()]
    states = [h.get(timeout=20, propagate=False) and h.state for h in handles]
    assert states == ["SUCCESS", "SUCCESS", "FAILURE"]
    # A failure leaves the ledger in after_return, just after its result.
    wait_until(lambda: recorded() == [], 10, what="the ledger to forget every task")
    assert all(store.redis.zscore(store.keys.ledger_due, tid) is None for tid in sends)
    assert store.get_value(sid, "answer") == f"answer for {stored}"


@pytest.mark.parametrize(
    "options",
    [
        {"store_outputs": ["nonexistent"]},
        {"store_outputs": {"reasoning_x": "answer"}},
        {"store_outputs": "answer"},
        {"unknown_option": True},
    ],
)
def test_bad_store_outputs_is_invalid_inputs(dspex: DspexWorker, options: Any) -> None:
    sid, m = dspex.session(), mark()
    dspex.store.register_variable(sid, "answer", "string", "before")
    err = dspex.failure(PREDICT_TASK, sid, QA, q(m), options)
    assert type(err) is InvalidInputs and err.code == "invalid_inputs"
    assert dspex.store.get_value(sid, "answer") == "before"
    assert dspex.recorder.calls(m) == []  # refused before any LM call


# --- errors reach the producer with their class and code --------------------------------


def test_unknown_and_invalid_session(dspex: DspexWorker) -> None:
    m = mark()
    err = dspex.failure(PREDICT_TASK, "tt-no-such-session", QA, q(m))
    assert type(err) is SessionNotFound and err.code == "session_not_found"
    err = dspex.failure(PREDICT_TASK, "bad id {x}", QA, q(m))
    assert type(err) is InvalidSessionId and err.code == "invalid_session_id"
    err = dspex.failure(RUN_PROGRAM_TASK, "tt-no-such-session", "qa", q(m))
    assert err.code == "session_not_found"
    assert dspex.recorder.calls(m) == []


def test_expired_session(dspex: DspexWorker) -> None:
    sid, m = dspex.session(ttl_s=0.2), mark()
    wait_expired(dspex.store.redis, dspex.store, sid)
    err = dspex.failure(PREDICT_TASK, sid, QA, q(m))
    assert type(err) is SessionExpired and err.code == "session_expired"
    assert isinstance(err, SessionNotFound)
    assert not dspex.session_keys_exist(sid)  # lazy expiry deleted it
    assert dspex.recorder.calls(m) == []


@pytest.mark.parametrize(
    "signature",
    [
        "question answer",
        "question -> answer -> more",
        "question -> answer: complex",
        "question -> reasoning",
        "question, question -> answer",
        "-> answer",
        {"inputs": ["question"]},
        42,
    ],
)
def test_bad_signature_is_invalid_program(dspex: DspexWorker, signature: Any) -> None:
    sid = dspex.session()
    for task in (PREDICT_TASK, COT_TASK):
        err = dspex.failure(task, sid, signature, {"question": "q"})
        assert type(err) is InvalidProgram and err.code == "invalid_program"


@pytest.mark.parametrize(
    ("signature", "inputs"),
    [
        (QA, {}),
        (QA, {"question": "q", "extra": "x"}),
        (QA, {"query": "q"}),
        (QA, {"question": 42}),
        (QA, {"question": None}),
        (QA, ["question"]),
        (QA, "question"),
        ("question, n: int -> answer", {"question": "q", "n": "three"}),
        ("question, n: int -> answer", {"question": "q", "n": 1.5}),
        ("question, n: int -> answer", {"question": "q", "n": True}),
        ("items: list[str] -> answer", {"items": ["a", 1]}),
        ("x: float -> answer", {"x": "NaN"}),
    ],
)
def test_bad_inputs_are_invalid_inputs(dspex: DspexWorker, signature: Any, inputs: Any) -> None:
    sid = dspex.session()
    err = dspex.failure(PREDICT_TASK, sid, signature, inputs)
    assert type(err) is InvalidInputs and err.code == "invalid_inputs"


def test_stored_program_checks_inputs(dspex: DspexWorker) -> None:
    sid = dspex.session()
    dspex.store.store_program(sid, "qa", {"module": "predict", "signature": QA})
    err = dspex.failure(RUN_PROGRAM_TASK, sid, "qa", {"prompt": "q"})
    assert type(err) is InvalidInputs and err.details["missing"] == ["question"]


@pytest.mark.parametrize(
    ("task", "args", "kwargs"),
    [
        (PREDICT_TASK, ["tt-x"], {}),
        (PREDICT_TASK, ["tt-x", QA], {}),
        (PREDICT_TASK, ["tt-x", QA, {"question": "q"}, None, "surplus"], {}),
        (PREDICT_TASK, ["tt-x", QA, {"question": "q"}], {"temperature": 0.1}),
        (PREDICT_TASK, ["tt-x", QA], {"session_id": "tt-y", "inputs": {}}),
        (COT_TASK, [], {}),
        (RUN_PROGRAM_TASK, ["tt-x", "qa"], {}),
        (RUN_PROGRAM_TASK, [], {"session_id": "tt-x", "program": "qa", "inputs": {}}),
        (EXPIRE_TASK, ["now"], {}),
        (EXPIRE_TASK, [], {"limit": 5}),
    ],
)
def test_wrong_arity_by_name_is_invalid_inputs(
    dspex: DspexWorker, task: str, args: list[Any], kwargs: dict[str, Any]
) -> None:
    err = dspex.failure(task, *args, **kwargs)
    assert type(err) is InvalidInputs and err.code == "invalid_inputs"
    assert "bad task arguments" in err.message


def test_keyword_arguments_by_name_are_accepted(dspex: DspexWorker) -> None:
    sid, m = dspex.session(), mark()
    result = dspex.run(PREDICT_TASK, session_id=sid, signature=QA, inputs=q(m))
    assert result["outputs"] == {"answer": f"answer for {m}"}


def test_unknown_program(dspex: DspexWorker) -> None:
    sid = dspex.session()
    err = dspex.failure(RUN_PROGRAM_TASK, sid, "nope", {"question": "q"})
    assert type(err) is ProgramNotFound and err.code == "program_not_found"


def test_unknown_lm_profile(dspex: DspexWorker) -> None:
    sid, m = dspex.session(), mark()
    dspex.store.set_session_lm(sid, profile="no-such-profile")
    err = dspex.failure(PREDICT_TASK, sid, QA, q(m))
    assert type(err) is UnknownLMProfile and err.code == "unknown_lm_profile"
    assert err.details == {"profile": "no-such-profile"}
    assert dspex.recorder.calls(m) == []


def test_tool_not_registered(dspex: DspexWorker) -> None:
    sid, m = dspex.session(), mark()
    spec = {"module": "react", "signature": QA, "config": {"tools": ["never_registered"]}}
    dspex.store.store_program(sid, "agent", spec)
    err = dspex.failure(RUN_PROGRAM_TASK, sid, "agent", q(m))
    assert type(err) is ToolNotFound and err.code == "tool_not_found"
    assert err.details == {"tools": ["never_registered"]}
    assert dspex.recorder.calls(m) == []


def test_oversized_inputs_and_result(dspex: DspexWorker) -> None:
    sid, m = dspex.session(), mark()
    big = q(m, "x" * MAX_INPUTS_BYTES)
    err = dspex.failure(PREDICT_TASK, sid, QA, big)
    assert type(err) is PayloadTooLarge and err.code == "payload_too_large"
    assert err.details["limit_bytes"] == MAX_INPUTS_BYTES
    assert dspex.recorder.calls(m) == []
    # Just under the limit is fine.
    ok = q(m, "y" * (MAX_INPUTS_BYTES - 100))
    assert dspex.run(PREDICT_TASK, sid, QA, ok)["outputs"] == {"answer": f"answer for {m}"}

    m2 = mark()
    dspex.recorder.script(m2, lambda call: {"answer": "z" * MAX_RESULT_BYTES})
    err = dspex.failure(PREDICT_TASK, sid, QA, q(m2))
    assert type(err) is PayloadTooLarge and err.details["limit_bytes"] == MAX_RESULT_BYTES


def test_lm_error_fails_without_retry(dspex: DspexWorker) -> None:
    sid, m = dspex.session(), mark()

    def broken(call: Call) -> dict[str, str]:
        raise RuntimeError("the model server exploded")

    dspex.recorder.script(m, broken)
    err = dspex.failure(PREDICT_TASK, sid, QA, q(m))
    assert type(err) is LMError and err.code == "lm_error"
    assert "exploded" in err.message
    assert len(dspex.recorder.calls(m)) == 1
    # A wrong retry would run again within the first backoff (retry_backoff 1 s, full
    # jitter: anywhere in 0-1 s). Watch that whole window, not a part of it.
    holds_for(lambda: len(dspex.recorder.calls(m)) == 1, 1.5, what="no second LM call")


def test_rate_limited_lm_is_retried(dspex: DspexWorker) -> None:
    sid, m = dspex.session(), mark()
    attempts: list[float] = []

    def throttled(call: Call) -> dict[str, str]:
        attempts.append(time.monotonic())
        if len(attempts) <= 2:
            raise RateLimitError("429: slow down")
        return default_answer(call)

    dspex.recorder.script(m, throttled)
    handle = dspex.send(PREDICT_TASK, sid, QA, q(m))
    result = handle.get(timeout=30)
    assert result["outputs"] == {"answer": f"answer for {m}"}
    assert len(dspex.recorder.calls(m)) == 3


def test_each_app_runs_its_own_runtime(dspex: DspexWorker) -> None:
    """A second app in the process (registered after the worker's) gets its own tasks."""
    seen: list[str] = []

    class OtherRuntime:
        def expire_sessions(self) -> dict[str, Any]:
            seen.append("other")
            return {"expired": 0, "duration_ms": 0.0}

    other = make_celery(Settings.from_env(environ={}, redis_url=dspex.url, key_prefix="other"))
    try:
        register_tasks(other, lambda: OtherRuntime())
        assert other.tasks[EXPIRE_TASK].run() == {"expired": 0, "duration_ms": 0.0}
        assert seen == ["other"]
        assert dspex.app.tasks[EXPIRE_TASK] is not other.tasks[EXPIRE_TASK]
    finally:
        close_app(other)


# --- expiry ---------------------------------------------------------------------------


def test_expire_sessions_task(dspex: DspexWorker) -> None:
    doomed = [dspex.session(ttl_s=0.2) for _ in range(3)]
    live = dspex.session()
    dspex.store.register_variable(doomed[0], "temperature", "float", 0.5)
    dspex.store.store_program(doomed[1], "qa", {"module": "predict", "signature": QA})
    wait_expired(dspex.store.redis, dspex.store, *doomed)
    assert all(dspex.session_keys_exist(sid) for sid in doomed)  # nobody swept yet

    result = dspex.run(EXPIRE_TASK)
    assert set(result) == {"expired", "duration_ms"}
    assert result["expired"] >= 3
    assert not any(dspex.session_keys_exist(sid) for sid in doomed)
    assert dspex.store.exists(live)


def _no_dspex_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DSPEX_")}


def test_real_beat_schedules_expiry(dspex: DspexWorker, tmp_path: Path) -> None:
    doomed, live = dspex.session(ttl_s=0.2), dspex.session()
    sweeps_before = dspex.store.stats()["sweeps"]
    wait_expired(dspex.store.redis, dspex.store, doomed)
    assert dspex.session_keys_exist(doomed)

    celery_bin = Path(sys.executable).with_name("celery")
    env = {
        **_no_dspex_env(),
        "DSPEX_REDIS_URL": dspex.url,
        "DSPEX_KEY_PREFIX": dspex.prefix,
        "DSPEX_EXPIRY_INTERVAL_S": "0.5",
    }
    log = tmp_path / "beat.log"
    with log.open("wb") as out:
        beat = subprocess.Popen(
            [
                str(celery_bin),
                "-A",
                "workers.beat",
                "beat",
                "-s",
                str(tmp_path / "beat-schedule"),
                "--pidfile=",
                "--loglevel=INFO",
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def swept() -> bool:
            assert beat.poll() is None, log.read_text(errors="replace")
            return not dspex.session_keys_exist(doomed)

        wait_until(swept, 10, interval=0.1, what="beat's sweep", diagnose=log.read_text)
    finally:
        beat.terminate()
        try:
            beat.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(beat.pid, signal.SIGKILL)
            beat.wait(timeout=10)
            pytest.fail("beat did not stop on SIGTERM")
    assert beat.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(beat.pid, 0)  # nothing left in beat's process group
    assert "dspex.expire_sessions" in log.read_text(errors="replace")
    assert dspex.store.stats()["sweeps"] > sweeps_before
    assert dspex.store.exists(live)


# --- concurrency ----------------------------------------------------------------------


def test_concurrent_sessions_do_not_leak_lm_settings(dspex: DspexWorker) -> None:
    expected: dict[str, tuple[str, float, int]] = {}
    for i in range(5):
        sid = dspex.session()
        profile, temperature, max_tokens = ("alt" if i % 2 else "default"), 0.1 + 0.3 * i, 100 + i
        dspex.store.register_variable(sid, "temperature", "float", temperature)
        dspex.store.set_session_lm(sid, profile=profile, max_tokens=max_tokens)
        expected[sid] = (profile, temperature, max_tokens)

    def slow(call: Call) -> dict[str, str]:
        time.sleep(0.15)  # keep calls overlapping
        return default_answer(call)

    dspex.recorder.reset_max_inflight()
    sent = []
    for k in range(4):
        for sid in expected:
            m = f"{sid}.{k}"
            dspex.recorder.script(m, slow)
            sent.append((sid, m, dspex.send(PREDICT_TASK, sid, QA, q(m))))
    results = [(sid, m, handle.get(timeout=30)) for sid, m, handle in sent]

    assert dspex.recorder.max_inflight >= 4, "the tasks did not run concurrently"
    for sid, m, result in results:
        profile, temperature, max_tokens = expected[sid]
        assert result["session_id"] == sid
        assert result["outputs"] == {"answer": f"answer for {m}"}
        assert result["lm"]["model"] == f"test/{profile}"
        call = only_call(dspex, m)
        assert (call.profile, call.temperature, call.max_tokens) == (
            profile,
            temperature,
            max_tokens,
        ), f"session {sid} saw another session's LM settings"
