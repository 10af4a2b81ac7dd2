"""Streamed runs end to end: a real threads-pool worker, real Redis, streaming fake LMs.

The fake LM streams its answer word by word through DSPy's streaming path; the run's
events are read back from its Redis stream.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from support.worker import (
    Call,
    DspexWorker,
    FailAfter,
    default_answer,
    mark,
    observation_of,
    react_capital_steps,
)

from dspex_tasks.app import COT_TASK, PREDICT_TASK, RUN_PROGRAM_TASK
from dspex_tasks.client import Client, TaskHandle
from dspex_tasks.errors import LMError, RunCancelled
from dspex_tasks.store import StreamEvent
from dspex_tasks.streaming import FieldSplitter
from dspex_tasks.tools import tool, unregister_tool

QA = "question -> answer"
STREAM = {"stream": True}


def q(marker: str, text: str = "Why is the sky blue?") -> dict[str, str]:
    return {"question": f"{text} MARK[{marker}]"}


def handle(w: DspexWorker, sid: str, result: Any) -> TaskHandle:
    return TaskHandle(result, store=w.store, session_id=sid)


def tokens(events: Iterable[StreamEvent], field: str) -> str:
    return "".join(
        e.data["delta"] for e in events if e.type == "token" and e.data["field"] == field
    )


def check_stream(events: list[StreamEvent], result: dict[str, Any], str_fields: list[str]) -> None:
    assert events[-1].type == "done" and events[-1].data == result
    assert sum(e.type in {"done", "error"} for e in events) == 1
    ids = [e.id for e in events]
    assert len(set(ids)) == len(ids)
    for field in str_fields:
        assert tokens(events, field) == result["outputs"][field]
    outputs = {e.data["field"]: e.data["value"] for e in events if e.type == "output"}
    assert outputs == result["outputs"]


def long_answer(words: int) -> Any:
    def respond(call: Call) -> dict[str, str]:
        values = default_answer(call)
        for name, type_text in call.fields:
            if type_text == "str":
                values[name] = " ".join(f"{name}{i}-{call.marker}" for i in range(words))
        return values

    return respond


def test_predict_streams_tokens_that_make_the_answer(dspex: DspexWorker) -> None:
    sid, m = dspex.session(), mark()
    dspex.recorder.script(m, long_answer(40))
    h = handle(dspex, sid, dspex.send(PREDICT_TASK, sid, QA, q(m), STREAM))
    events = list(h.stream(block_s=20))
    result = h.get_result(timeout=20)
    check_stream(events, result, ["answer"])
    deltas = [e for e in events if e.type == "token"]
    assert len(deltas) >= 1
    assert events[0].type == "status" and events[0].data["step"] == "start"


def test_chain_of_thought_streams_reasoning_then_answer(dspex: DspexWorker) -> None:
    sid, m = dspex.session(), mark()
    dspex.recorder.script(m, long_answer(30))
    signature = "question -> answer, votes: int"
    h = handle(dspex, sid, dspex.send(COT_TASK, sid, signature, q(m), STREAM))
    events = list(h.stream(block_s=20))
    result = h.get_result(timeout=20)
    check_stream(events, result, ["reasoning", "answer"])
    fields = [e.data["field"] for e in events if e.type == "token"]
    assert fields.index("answer") > max(i for i, f in enumerate(fields) if f == "reasoning")
    assert result["outputs"]["votes"] == 3


def test_stored_program_streams(dspex: DspexWorker) -> None:
    sid, m = dspex.session(), mark()
    dspex.store.store_program(sid, "qa", {"module": "chain_of_thought", "signature": QA})
    h = handle(dspex, sid, dspex.send(RUN_PROGRAM_TASK, sid, "qa", q(m), STREAM))
    events = list(h.stream(block_s=20))
    check_stream(events, h.get_result(timeout=20), ["reasoning", "answer"])


def test_react_reports_each_step_and_streams_its_answer(dspex: DspexWorker) -> None:
    @tool(name="capital_lookup")
    def capital_lookup(country: str) -> str:
        """Return the capital city of a country."""
        return {"France": "Paris-from-tool"}.get(country, "unknown")

    def script(call: Call) -> dict[str, str]:
        step = react_capital_steps(call)
        if step is not None:
            return step
        observed = observation_of(call)
        words = " ".join(f"w{i}" for i in range(30))
        return {"reasoning": f"The tool said {observed}. {words}", "answer": f"{observed} {words}"}

    sid, m = dspex.session(), mark()
    dspex.recorder.script(m, script)
    spec = {"module": "react", "signature": QA, "config": {"tools": ["capital_lookup"]}}
    try:
        dspex.store.store_program(sid, "agent", spec)
        h = handle(dspex, sid, dspex.send(RUN_PROGRAM_TASK, sid, "agent", q(m), STREAM))
        events = list(h.stream(block_s=20))
        result = h.get_result(timeout=20)
    finally:
        unregister_tool("capital_lookup")
    check_stream(events, result, ["reasoning", "answer"])
    assert result["outputs"]["answer"].startswith("Paris-from-tool w0")
    steps = [(e.data["step"], e.data["detail"]) for e in events if e.type == "status"]
    assert steps == [
        ("start", "ReAct"),
        ("thought", "I should look up the capital."),
        ("tool_call", 'capital_lookup({"country":"France"})'),
        ("observation", "Paris-from-tool"),
        ("thought", "I know it now."),
        ("answer", ""),
    ]
    # Only the final answer streams, after the last step; the steps' own LM calls do not.
    kinds = [e.type for e in events]
    last_status = max(i for i, k in enumerate(kinds) if k == "status")
    assert kinds.index("token") > last_status
    assert {e.data["field"] for e in events if e.type == "token"} == {"reasoning", "answer"}


def test_a_run_without_stream_makes_no_key(dspex: DspexWorker) -> None:
    sid, m = dspex.session(), mark()
    h = handle(dspex, sid, dspex.send(PREDICT_TASK, sid, QA, q(m)))
    h.get_result(timeout=20)
    assert not dspex.store.run_stream_exists(sid, h.id)
    assert not dspex.store.redis.exists(dspex.store.keys.run_streams(sid))
    # A reader of such a run ends once the run is over, with nothing.
    assert list(h.stream(block_s=5)) == []


def test_a_failure_after_some_tokens_ends_with_error(dspex: DspexWorker) -> None:
    sid, m = dspex.session(), mark()
    text = "[[ ## answer ## ]]\nthe first words of an answer that never ends"

    def respond(call: Call) -> dict[str, str]:
        raise FailAfter(text, 6, ConnectionError("connection lost"))

    dspex.recorder.script(m, respond)
    h = handle(dspex, sid, dspex.send(PREDICT_TASK, sid, QA, q(m), STREAM))
    events = list(h.stream(block_s=20))
    with pytest.raises(LMError):
        h.get_result(timeout=20)
    assert events[-1].type == "error"
    assert events[-1].data["code"] == "lm_error"
    assert tokens(events, "answer")  # some tokens went out first
    assert "the first words".startswith(tokens(events, "answer")[:15])


def test_a_cancelled_streaming_run_ends_with_run_cancelled(dspex: DspexWorker) -> None:
    """Cancel while tokens are flowing: the stream's last event is ``error``
    ``run_cancelled``, and the task fails with RunCancelled."""
    hold = threading.Event()
    answer = " ".join(f"w{i}" for i in range(40))
    text = f"[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]\n"

    def stall(call: Call) -> dict[str, str]:
        raise FailAfter(text, 12, LMError("never raised: the run is cancelled first"), hold)

    sid, m = dspex.session(), mark()
    dspex.recorder.script(m, stall)
    try:
        with Client(settings=dspex.settings) as client:
            h = client.session(sid).predict(QA, options=STREAM, **q(m))
            seen: list[StreamEvent] = []
            for event in h.stream(block_s=20):
                seen.append(event)
                if event.type == "token":
                    break
            assert h.cancel() == "signalled"
            seen += h.stream(after=seen[-1].id, block_s=20)
            with pytest.raises(RunCancelled):
                h.get(timeout=10)
    finally:
        hold.set()
    assert tokens(seen, "answer").startswith("w0")
    assert seen[-1].type == "error" and seen[-1].data["code"] == "run_cancelled", seen[-3:]
    assert sum(e.type in {"done", "error"} for e in seen) == 1


def test_a_streamed_run_refused_before_it_runs_ends_its_stream_with_the_error(
    dspex: DspexWorker,
) -> None:
    """Bad input, or a run cancelled after it was published but before a worker took it:
    the reader still gets ``error`` as the last (only) event."""
    sid = dspex.session()
    bad = handle(dspex, sid, dspex.send(PREDICT_TASK, sid, QA, {"nope": "x"}, STREAM))
    events = list(bad.stream(block_s=20))
    assert [(e.type, e.data["code"]) for e in events] == [("error", "invalid_inputs")]

    run_id = uuid.uuid4().hex
    message = {"task": PREDICT_TASK, "args": [sid, QA, q(mark()), STREAM], "kwargs": {}}
    dspex.store.queue_run(sid, run_id, PREDICT_TASK, message)
    assert dspex.store.cancel_run(sid, run_id).verdict == "stopped"
    sent = dspex.producer.send_task(PREDICT_TASK, args=message["args"], task_id=run_id)
    events = list(handle(dspex, sid, sent).stream(block_s=20))
    assert [(e.type, e.data["code"]) for e in events] == [("error", "run_cancelled")]
    with pytest.raises(RunCancelled):
        sent.get(timeout=10)


def test_a_streamed_run_cancelled_while_parked_ends_with_run_cancelled(
    dspex: DspexWorker,
) -> None:
    """An ``enqueue`` run waiting behind another is cancelled: no worker ever runs it,
    and its reader (sync and async) still ends with ``error`` ``run_cancelled``."""
    gate = threading.Event()
    first = mark()

    def wait(call: Call) -> dict[str, str]:
        gate.wait(30)
        return default_answer(call)

    dspex.recorder.script(first, wait)
    sid = dspex.session()
    try:
        with Client(settings=dspex.settings) as client:
            s = client.session(sid)
            s.configure(multitask="enqueue")
            ahead = s.predict(QA, **q(first))
            parked = s.predict(QA, options=STREAM, **q(mark()))
            assert parked.cancel() == "stopped"
            events = list(parked.stream(block_s=20))
            assert [(e.type, e.data["code"]) for e in events] == [("error", "run_cancelled")]

            async def read() -> list[StreamEvent]:
                return [e async for e in parked.astream(block_s=20)]

            assert asyncio.run(read()) == events
            assert not dspex.store.run_stream_exists(sid, parked.id)
            gate.set()
            ahead.get(timeout=20)
    finally:
        gate.set()


def test_sixteen_concurrent_streamed_runs_keep_order_and_completeness(
    dspex: DspexWorker,
) -> None:
    sid = dspex.session()
    marks = [mark() for _ in range(16)]
    for m in marks:
        dspex.recorder.script(m, long_answer(60))
    handles = [handle(dspex, sid, dspex.send(COT_TASK, sid, QA, q(m), STREAM)) for m in marks]

    def read(h: TaskHandle) -> list[StreamEvent]:
        return list(h.stream(block_s=30))

    with ThreadPoolExecutor(16) as pool:
        streams = list(pool.map(read, handles))
    for m, h, events in zip(marks, handles, streams, strict=True):
        result = h.get_result(timeout=30)
        check_stream(events, result, ["reasoning", "answer"])
        assert f"answer59-{m}" in tokens(events, "answer")


def test_a_reader_that_disconnects_resumes_without_gap_or_duplicate(
    dspex: DspexWorker,
) -> None:
    sid, m = dspex.session(), mark()
    dspex.recorder.script(m, long_answer(80))
    h = handle(dspex, sid, dspex.send(COT_TASK, sid, QA, q(m), STREAM))
    rng = random.Random(m)
    seen: list[StreamEvent] = []
    after: str | None = None
    while not seen or seen[-1].type not in {"done", "error"}:
        stop = rng.randint(1, 4)
        reader = h.stream(after=after, block_s=20)
        for n, event in enumerate(reader, 1):
            seen.append(event)
            if n == stop:
                break
        reader.close()  # the reader goes away mid-stream
        after = seen[-1].id
    result = h.get_result(timeout=20)
    check_stream(seen, result, ["reasoning", "answer"])
    whole = list(h.stream(block_s=5))
    assert [e.id for e in whole] == [e.id for e in seen]


def test_async_reader(dspex: DspexWorker) -> None:
    sid, m = dspex.session(), mark()
    dspex.recorder.script(m, long_answer(50))
    h = handle(dspex, sid, dspex.send(PREDICT_TASK, sid, QA, q(m), STREAM))

    async def read() -> list[StreamEvent]:
        return [event async for event in h.astream(block_s=20)]

    events = asyncio.run(read())
    check_stream(events, h.get_result(timeout=20), ["answer"])


def test_stream_keys_go_with_the_session(dspex: DspexWorker) -> None:
    sid, m = dspex.session(), mark()
    h = handle(dspex, sid, dspex.send(PREDICT_TASK, sid, QA, q(m), STREAM))
    h.get_result(timeout=20)
    assert dspex.store.run_stream_exists(sid, h.id)
    keep = dspex.store.redis.pttl(dspex.store.keys.run_stream(sid, h.id))
    assert 0 < keep <= dspex.settings.stream_keep_s * 1000
    dspex.store.delete_session(sid)
    assert not dspex.store.run_stream_exists(sid, h.id)
    assert not dspex.store.redis.exists(dspex.store.keys.run_streams(sid))


def test_stream_keys_go_after_the_keep_time_and_with_expiry(dspex: DspexWorker) -> None:
    store = dspex.store
    sid = dspex.session(ttl_s=60)
    run = uuid.uuid4().hex
    store.append_run_stream(sid, run, [("token", b'{"field":"a","delta":"x"}')], keep_s=0.05)
    key = store.keys.run_stream(sid, run)
    deadline = time.monotonic() + 5
    while store.redis.exists(key) and time.monotonic() < deadline:
        time.sleep(0.01)  # Redis's own expiry, polled: nothing else to wait on
    assert not store.redis.exists(key)
    # Expired by the sweep: its run streams go too.
    other = uuid.uuid4().hex
    store.append_run_stream(sid, other, [("done", b"{}")], keep_s=600)
    store.redis.hset(store.keys.session(sid), "deadline_ms", 1)
    store.redis.zadd(store.keys.sessions, {sid: 1})
    store.expire_sessions()
    assert not store.redis.exists(store.keys.run_stream(sid, other))
    assert not store.redis.exists(store.keys.run_streams(sid))


# --- the splitter, against DSPy's own parser ------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "[[ ## reasoning ## ]]\nstep one\n\nstep two  \n\n[[ ## answer ## ]]\n  42 is it \n\n"
        "[[ ## completed ## ]]\n",
        "[[ ## answer ## ]] on the header line  \nand more\r\nlines\r\n[[ ## completed ## ]]",
        "  [[ ## answer ## ]]\n[[ not a header\n[[ ## answer ## ]]\nignored\n",
        "[[ ## reasoning ## ]]\nx [[ ## y ## ]] z\n[[ ## answer ## ]]\n\u2028a\u2029b\x0cc\n",
        "[[ ## answer ## ]]\n[[ ## ans",
    ],
)
def test_splitter_matches_the_chat_adapter(text: str) -> None:
    import dspy
    from dspy.adapters.chat_adapter import ChatAdapter

    signature = dspy.Signature("question -> reasoning, answer")
    try:
        parsed = ChatAdapter().parse(signature, text)
    except Exception:
        parsed = None
    rng = random.Random(text)
    for _ in range(20):
        out: dict[str, str] = {}

        def emit(field: str, delta: str, out: dict[str, str] = out) -> None:
            out[field] = out.get(field, "") + delta

        splitter = FieldSplitter(frozenset({"reasoning", "answer"}), emit)
        i = 0
        while i < len(text):
            step = rng.randint(1, 5)
            splitter.feed(text[i : i + step])
            i += step
        splitter.close()
        if parsed is not None:
            for field in ("reasoning", "answer"):
                assert parsed[field].startswith(out.get(field, "")), (field, out)
                assert out.get(field, "") == parsed[field]


def test_chunks_reach_the_sink_on_the_run_s_own_thread() -> None:
    """DSPy's sync path sends each chunk with ``anyio.from_thread.run``: it runs inline
    on the run's thread (no event loop hop per chunk); any other coroutine still runs."""
    import anyio
    import anyio.from_thread
    import dspy

    from dspex_tasks.streaming import run_streamed

    out: list[tuple[str, str]] = []
    writer: Any = type(
        "W",
        (),
        {
            "str_fields": frozenset({"answer"}),
            "token": lambda self, f, d: out.append((f, d)),
            "status": lambda self, step, detail="": None,
        },
    )()
    module = dspy.Predict(QA)
    caller = threading.get_ident()

    def chunk(text: str) -> Any:
        delta = type("D", (), {"content": text})()
        choice = type("C", (), {"delta": delta})()
        return type("K", (), {"predict_id": id(module), "id": "c1", "choices": [choice]})()

    async def other() -> int:
        await anyio.sleep(0)
        return threading.get_ident()

    def run(context: Any) -> tuple[Any, dict[str, Any]]:
        assert threading.get_ident() == caller
        sink = context["send_stream"]
        for text in ["[[ ## answer ## ]]\nhel", "lo world", "\n\n[[ ## completed ## ]]"]:
            anyio.from_thread.run(sink.send, chunk(text))
        assert anyio.from_thread.run(other) == caller
        return None, {}

    run_streamed(run, module, writer)
    assert "".join(d for f, d in out if f == "answer") == "hello world"


# --- the real streaming client path: an OpenAI-compatible endpoint streaming SSE -------


@pytest.mark.parametrize("model", ["openai/fake-model", "dspex/echo"])
def test_streaming_over_http_and_with_the_echo_engine(
    redis_url: str, key_prefix: str, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fake_openai import FakeOpenAI

    from dspex_tasks.lm import LMRegistry
    from dspex_tasks.runtime import Runtime
    from dspex_tasks.settings import LMProfileConfig, Settings

    with FakeOpenAI(chunk_delay_s=0.001) as fake:
        settings = Settings.from_env(environ={}, redis_url=redis_url, key_prefix=key_prefix)
        monkeypatch.setenv("DSPEX_TEST_STREAM_KEY", "sk-fake")
        http = "openai" in model
        profile = LMProfileConfig(
            name="default",
            model=model,
            api_base=fake.base_url if http else None,
            api_key_env="DSPEX_TEST_STREAM_KEY" if http else None,
        )
        runtime = Runtime(settings, lms=LMRegistry({"default": profile}))
        store = runtime.store
        try:
            sid, run = f"h-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
            store.create_session(sid)
            spec = runtime.spec_for("chain_of_thought", QA)
            result = runtime.run(run, sid, spec, q("abc"), {"stream": True})
            events = store.run_stream_events(sid, run)
            check_stream(events, result, ["reasoning", "answer"])
            assert sum(e.type == "token" for e in events) >= 2
            if "openai" in model:
                assert [c.stream for c in fake.calls] == [True]
                assert fake.calls[0].first_chunk is not None
            # Unstreamed: the LM is not asked to stream, and no key is made.
            other = uuid.uuid4().hex
            runtime.run(other, sid, spec, q("def"))
            assert not store.run_stream_exists(sid, other)
            if "openai" in model:
                assert [c.stream for c in fake.calls] == [True, False]
        finally:
            store.close()
