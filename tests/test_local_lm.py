"""The embedded offline model (``dspex/local``): typed outputs, directly and via a worker.

Needs the ``local-lm`` extra; skipped only when llama_cpp is not importable (a missing
model file with llama_cpp present is a failure, not a skip). Assertions are about shape,
types and time, never content: SmolLM2-135M answers are well-formed, not good.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

import pytest

pytest.importorskip("llama_cpp")

import dspy
from celery import Celery
from support.dbs import db_url
from support.worker import close_app, in_process_worker, worker_app

from dspex_tasks.app import COT_TASK, PREDICT_TASK
from dspex_tasks.client import TaskHandle
from dspex_tasks.lm.engines import local as local_lm
from dspex_tasks.lm.engines.echo import EchoEngine
from dspex_tasks.lm.engines.local import LocalEngine
from dspex_tasks.runtime import Runtime
from dspex_tasks.settings import Settings

pytestmark = pytest.mark.llm

CHOICES = ("positive", "negative", "neutral")
SIGNATURE = {
    "instructions": "Read the review and answer.",
    "inputs": [{"name": "review"}],
    "outputs": [
        {"name": "stars", "type": "int", "desc": "rating from 1 to 5"},
        {"name": "sentiment", "choices": list(CHOICES)},
        {"name": "summary", "type": "str", "desc": "one short sentence"},
    ],
}
REVIEWS = [
    "The soup was cold and the waiter was rude.",
    "Best pizza in town, we will come back!",
    "It was fine, nothing special.",
    "The hotel room was spotless and the staff friendly.",
    "My phone broke after two days.",
    "The concert was loud but fun.",
    "Delivery took three weeks and the box was damaged.",
    "A calm, pleasant walk through the park.",
]
TASK_TIMEOUT_S = 60


class Review(dspy.Signature):
    """Read the review and answer."""

    review: str = dspy.InputField()
    stars: int = dspy.OutputField(desc="rating from 1 to 5")
    sentiment: Literal["positive", "negative", "neutral"] = dspy.OutputField()
    summary: str = dspy.OutputField(desc="one short sentence")


def _check_typed(outputs: Any, *, reasoning: bool) -> None:
    get = outputs.get if isinstance(outputs, dict) else outputs.__getattr__
    assert isinstance(get("stars"), int) and not isinstance(get("stars"), bool)
    assert get("sentiment") in CHOICES
    assert isinstance(get("summary"), str)
    if reasoning:
        assert isinstance(get("reasoning"), str)


def test_available_and_probe() -> None:
    assert local_lm.available()
    report = local_lm.probe(max_tokens=16)
    assert report["loaded"] is True and report["error"] is None, report
    assert report["tokens_per_s"] and report["tokens_per_s"] > 0
    assert str(report["model_path"]).endswith(".gguf")


def test_engine_predict_and_cot_are_typed() -> None:
    lm = dspy.LM(local_lm.LOCAL_MODEL, engine=LocalEngine(), cache=False)
    with dspy.context(lm=lm):
        for module, reasoning in (
            (dspy.Predict(Review), False),
            (dspy.ChainOfThought(Review), True),
        ):
            started = time.monotonic()
            prediction = module(review=REVIEWS[0])
            assert time.monotonic() - started < TASK_TIMEOUT_S
            _check_typed(prediction, reasoning=reasoning)


def test_engine_enforces_max_tokens() -> None:
    engine = LocalEngine()
    calls: list[Any] = []
    complete = engine.complete

    def spy(request: Any) -> Any:
        calls.append(response := complete(request))
        return response

    engine.complete = spy  # type: ignore[method-assign]
    lm = dspy.LM(local_lm.LOCAL_MODEL, engine=engine, cache=False, max_tokens=12)
    with dspy.context(lm=lm):
        prediction = dspy.ChainOfThought(Review)(review=REVIEWS[1])
    _check_typed(prediction, reasoning=True)  # cut off, yet every field parses
    assert len(calls) == 1  # no second (JSONAdapter) attempt was needed
    assert calls[0].usage.output_tokens <= 12


@pytest.fixture(scope="module")
def worker(redis_url: str) -> Iterator[tuple[Celery, Runtime]]:
    """A real threads-pool worker whose default profile is the local model."""
    settings = Settings.from_env(
        environ={},
        redis_url=db_url(redis_url, "local_lm"),
        key_prefix=f"llm{uuid.uuid4().hex[:8]}",
    )
    app, runtime = worker_app(settings)
    try:
        assert runtime.lms.model_of("default") == local_lm.LOCAL_MODEL
        with in_process_worker(app, concurrency=8):
            yield app, runtime
    finally:
        close_app(app)
        runtime.store.close()


def _session(runtime: Runtime) -> str:
    sid = f"llm-{uuid.uuid4().hex[:10]}"
    runtime.store.create_session(sid, ttl_s=300)
    return sid


def test_worker_predict_and_cot(worker: tuple[Celery, Runtime]) -> None:
    app, runtime = worker
    for task, reasoning in ((PREDICT_TASK, False), (COT_TASK, True)):
        sid = _session(runtime)
        started = time.monotonic()
        result = app.send_task(task, args=[sid, SIGNATURE, {"review": REVIEWS[2]}]).get(
            timeout=TASK_TIMEOUT_S
        )
        assert time.monotonic() - started < TASK_TIMEOUT_S
        assert result["session_id"] == sid
        assert result["lm"]["model"] == local_lm.LOCAL_MODEL
        _check_typed(result["outputs"], reasoning=reasoning)
        usage = result["lm"]["usage"][local_lm.LOCAL_MODEL]
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0


def test_worker_eight_concurrent_tasks(worker: tuple[Celery, Runtime]) -> None:
    app, runtime = worker
    sessions = [_session(runtime) for _ in REVIEWS]
    started = time.monotonic()
    handles = [
        app.send_task(PREDICT_TASK if i % 2 else COT_TASK, args=[sid, SIGNATURE, {"review": r}])
        for i, (sid, r) in enumerate(zip(sessions, REVIEWS, strict=True))
    ]
    # Celery's result consumer is not thread-safe: wait in turn. The tasks run
    # concurrently anyway, so all of them finishing within one bound checks each.
    results = [h.get(timeout=TASK_TIMEOUT_S) for h in handles]
    assert time.monotonic() - started < TASK_TIMEOUT_S
    for i, (sid, result) in enumerate(zip(sessions, results, strict=True)):
        assert result["session_id"] == sid
        _check_typed(result["outputs"], reasoning=i % 2 == 0)
        assert set(result["outputs"]) == {"stars", "sentiment", "summary"} | (
            {"reasoning"} if i % 2 == 0 else set()
        )


def test_worker_dspy_type_syntax_in_a_string_signature(worker: tuple[Celery, Runtime]) -> None:
    """``Literal`` and ``list[int]`` outputs of a string signature come back typed, from the
    local model and from the echo engine."""
    app, runtime = worker
    runtime.lms.install("echo", dspy.LM("dspex/echo", engine=EchoEngine(), cache=False))
    signature = "review -> verdict: Literal['good', 'bad'], scores: list[int]"
    for profile in ("default", "echo"):
        sid = _session(runtime)
        runtime.store.set_session_lm(sid, profile=profile)
        result = app.send_task(PREDICT_TASK, args=[sid, signature, {"review": REVIEWS[1]}]).get(
            timeout=TASK_TIMEOUT_S
        )
        outputs = result["outputs"]
        assert set(outputs) == {"verdict", "scores"}, outputs
        assert outputs["verdict"] in ("good", "bad")
        assert isinstance(outputs["scores"], list)
        assert all(isinstance(s, int) and not isinstance(s, bool) for s in outputs["scores"])


def test_worker_streams_the_local_model_token_by_token(worker: tuple[Celery, Runtime]) -> None:
    """A streamed chain of thought on the local model: many token events (not one at the
    end), the deltas of each str field exactly its final value, ``done`` last."""
    app, runtime = worker
    sid = _session(runtime)
    args = [sid, SIGNATURE, {"review": REVIEWS[3]}]
    sent = app.send_task(COT_TASK, args=args, kwargs={"options": {"stream": True}})
    handle = TaskHandle(sent, store=runtime.store, session_id=sid)
    events = list(handle.stream(block_s=TASK_TIMEOUT_S))
    result = handle.get_result(timeout=TASK_TIMEOUT_S)
    assert events[-1].type == "done" and events[-1].data == result
    _check_typed(result["outputs"], reasoning=True)
    for field in ("reasoning", "summary"):
        deltas = [e.data["delta"] for e in events if e.type == "token" and e.data["field"] == field]
        assert "".join(deltas) == result["outputs"][field]
    arrivals = [e for e in events if e.type == "token"]
    assert len(arrivals) >= 3, events  # batches of tokens as they were generated
