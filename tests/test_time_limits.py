"""Time limits on the threads pool and LM request timeouts, against a hung LM endpoint.

The fake LM (``tests/fake_openai.py``) accepts a request whose question says ``HANG`` and
never answers it. A real threads-pool worker with ONE thread must end such a task with
``task_timeout`` within its soft limit, then serve the next task (so its thread was
freed), leave the session as it was, and the abandoned run must end at its LM timeout.
"""

from __future__ import annotations

import contextvars
import gc
import json
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from fake_openai import FakeOpenAI
from support.dbs import db_url
from support.worker import mark

from dspex_tasks import runtime as runtime_module
from dspex_tasks.app import PREDICT_TASK, make_celery
from dspex_tasks.errors import ConfigError, RunCancelled, TaskTimeout
from dspex_tasks.lm import LMRegistry, abandon
from dspex_tasks.programs import build_module, run_module
from dspex_tasks.runcontext import RunContext, current_run
from dspex_tasks.runtime import Runtime, run_bounded, runs_in_flight, runs_inline
from dspex_tasks.settings import LMProfileConfig, Settings
from dspex_tasks.specs import normalize_spec
from dspex_tasks.store.runs import StopPoll
from dspex_tasks.tasks import register_tasks
from dspex_tasks.watchdog import Watchdog

SOFT_LIMIT_S = 2
HARD_LIMIT_S = 4
KEY_ENV = "DSPEX_TEST_FAKE_LM_KEY"
QA = "question -> answer"


@dataclass
class Stack:
    fake: FakeOpenAI
    app: Celery
    runtime: Runtime


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def stack(redis_url: str) -> Iterator[Stack]:
    """One threads-pool worker with a single thread; its default LM is the fake server."""
    with FakeOpenAI() as fake, pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, "sk-fake-key")
        profiles = {
            "default": {
                "model": "openai/fake-model",
                "api_base": fake.base_url,
                "api_key_env": KEY_ENV,
                "timeout_s": 60,  # capped by the soft limit
            }
        }
        settings = Settings.from_env(
            environ={
                "DSPEX_LM_PROFILES": json.dumps(profiles),
                "DSPEX_TASK_TIME_LIMIT_S": str(HARD_LIMIT_S),
                "DSPEX_TASK_SOFT_TIME_LIMIT_S": str(SOFT_LIMIT_S),
            },
            redis_url=db_url(redis_url, "time_limits"),
            key_prefix=f"tl{uuid.uuid4().hex[:8]}",
        )
        app = make_celery(settings)
        runtime = Runtime(settings)
        register_tasks(app, lambda: runtime)
        try:
            with start_worker(
                app,
                pool="threads",
                concurrency=1,
                perform_ping_check=False,
                loglevel="WARNING",
                shutdown_timeout=15,
            ):
                yield Stack(fake, app, runtime)
        finally:
            gc.collect()
            app.close()
            runtime.store.close()


def _question(marker: str, hang: bool = False) -> dict[str, str]:
    return {"question": f"{'HANG ' if hang else ''}What is 2 + 2? MARK[{marker}]"}


def test_hung_endpoint_fails_in_bounded_time_and_frees_the_thread(stack: Stack) -> None:
    store = stack.runtime.store
    sid = f"tl-{uuid.uuid4().hex[:10]}"
    store.create_session(sid, ttl_s=300)
    store.register_variable(sid, "note", "string", "before")
    store.register_variable(sid, "kept", "integer", 7)
    hung = mark()

    started = time.monotonic()
    handle = stack.app.send_task(
        PREDICT_TASK,
        args=[sid, QA, _question(hung, hang=True), {"store_outputs": {"answer": "note"}}],
    )
    wait_for(lambda: hung in stack.fake.hanging, 10, "the hung request to reach the fake LM")
    with pytest.raises(TaskTimeout) as exc:
        handle.get(timeout=SOFT_LIMIT_S + 10)
    elapsed = time.monotonic() - started
    assert exc.value.code == "task_timeout"
    assert elapsed < SOFT_LIMIT_S + 5, elapsed  # bounded by the soft limit, not the LM's 60 s

    # Nothing written, nothing lost: the session and its variables are as they were.
    assert store.get_variable(sid, "note").value == "before"
    assert store.get_variable(sid, "note").version == 1
    assert store.get_variable(sid, "kept").value == 7

    # The worker's only thread was freed: the next task on the same session runs (its
    # claim was released) and writes its output.
    ok = mark()
    result = stack.app.send_task(
        PREDICT_TASK, args=[sid, QA, _question(ok), {"store_outputs": {"answer": "note"}}]
    ).get(timeout=15)
    assert result["outputs"] == {"answer": f"answer for MARK[{ok}]"}
    assert store.get_variable(sid, "note").value == f"answer for MARK[{ok}]"

    # The abandoned run ends too, at its LM request's timeout (capped at the soft limit).
    wait_for(lambda: not runs_in_flight(), 60, "the abandoned run to end at its LM timeout")


def test_lm_request_timeout_is_the_profile_value_capped_by_the_soft_limit(stack: Stack) -> None:
    lm = stack.runtime.lms.resolve({"profile": "default"}, {})
    assert lm.kwargs["timeout"] == SOFT_LIMIT_S  # 60 in the profile
    plain = LMRegistry(
        {"p": LMProfileConfig(name="p", model="openai/x", api_base="http://127.0.0.1:9/v1")}
    )
    assert plain.resolve({"profile": "p"}, {}).kwargs["timeout"] == 120  # the default
    # In-process engines own their connection: no timeout reaches them.
    echo = LMRegistry({"e": LMProfileConfig(name="e", model="dspex/echo")}, max_timeout_s=5)
    assert "timeout" not in echo.resolve({"profile": "e"}, {}).kwargs


@pytest.mark.parametrize("bad", [0, -1, "10", True, None])
def test_profile_timeout_must_be_positive_seconds(bad: Any) -> None:
    profiles = json.dumps({"p": {"model": "openai/x", "timeout_s": bad}})
    with pytest.raises(ConfigError, match="timeout_s"):
        Settings.from_env(environ={"DSPEX_LM_PROFILES": profiles})


def test_run_bounded() -> None:
    assert run_bounded(lambda: 42, 5) == 42
    with pytest.raises(KeyError):
        run_bounded(lambda: {}["x"], 5)
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(TaskTimeout) as exc:
        run_bounded(lambda: release.wait(30), 0.2)
    assert time.monotonic() - started < 5 and exc.value.code == "task_timeout"
    assert runs_in_flight() == 1  # abandoned, still going
    release.set()
    wait_for(lambda: not runs_in_flight(), 10, "the abandoned thread to end")


def test_run_threads_are_reused_and_keep_nothing_from_a_run() -> None:
    """Run threads serve run after run, and each run starts as in a fresh thread: no
    context variable and no current run left by the one before."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    def first() -> int:
        var.set("left by an earlier run")
        return threading.get_ident()

    def second() -> tuple[int, str, object]:
        return threading.get_ident(), var.get(), _current_run_or_none()

    class Held:
        """Stands for what a run's context holds (its store)."""

    held = Held()
    gone = weakref.ref(held)
    context = RunContext("s", "t1", held)  # type: ignore[arg-type]
    run_bounded(first, 5, context=context)
    del held, context
    # The thread lets go of the run it did: its context is not kept alive until the next.
    wait_for(lambda: gc.collect() >= 0 and gone() is None, 5, "the run's context to be freed")

    def pool_threads() -> set[int | None]:
        return {t.ident for t in threading.enumerate() if t.name.startswith("dspex-run")}

    before, used = pool_threads(), set()
    for _ in range(20):
        used.add(run_bounded(first, 5))
        ident, value, run = run_bounded(second, 5)
        used.add(ident)
        assert value == "unset" and run is None
    # Forty runs one after another started at most one thread, whatever ran before.
    after = pool_threads()
    assert used <= after and len(after - before) <= 1
    # A run that is stuck does not hold up the next one: another thread takes it.
    release = threading.Event()
    with pytest.raises(TaskTimeout):
        run_bounded(lambda: release.wait(30), 0.1)
    assert run_bounded(lambda: 7, 5) == 7
    release.set()
    wait_for(lambda: not runs_in_flight(), 10, "the stuck run to end")


def _current_run_or_none() -> object:
    try:
        return current_run()
    except RuntimeError:
        return None


def test_lm_request_timeout_alone_is_task_timeout(stack: Stack) -> None:
    """A profile timeout shorter than the soft limit ends the LM call by itself."""
    profile = LMProfileConfig(
        name="short",
        model="openai/fake-model",
        api_base=stack.fake.base_url,
        api_key_env=KEY_ENV,
        params={"num_retries": 0},
        timeout_s=0.3,
    )
    lm = LMRegistry({"short": profile}, max_timeout_s=SOFT_LIMIT_S).resolve(
        {"profile": "short"}, {}
    )
    module = build_module(normalize_spec({"module": "predict", "signature": QA}))
    hung = mark()
    started = time.monotonic()
    with pytest.raises(TaskTimeout) as exc:
        run_module(module, lm, _question(hung, hang=True))
    assert exc.value.code == "task_timeout" and "timeout_s" in exc.value.message
    assert time.monotonic() - started < 10
    assert hung in stack.fake.hanging


def test_cancel_abandons_the_http_request_mid_answer(stack: Stack) -> None:
    """A cancelled run stops within a second, and its HTTP request is closed: the LM
    server sees the client go instead of answering into the void."""
    store = stack.runtime.store
    sid = f"tl-{uuid.uuid4().hex[:10]}"
    store.create_session(sid, ttl_s=300)
    hung = mark()
    handle = stack.app.send_task(PREDICT_TASK, args=[sid, QA, _question(hung, hang=True)])
    wait_for(lambda: hung in stack.fake.hanging, 10, "the request to reach the fake LM")
    wait_for(lambda: store.get_run(sid, handle.id).status == "running", 10, "the run to run")
    started = time.monotonic()
    assert store.cancel_run(sid, handle.id).verdict == "signalled"
    with pytest.raises(RunCancelled):
        handle.get(timeout=10)
    assert time.monotonic() - started < 1.5
    # Well before the request's own timeout (the soft limit, 2 s) could have closed it.
    wait_for(lambda: hung in stack.fake.abandoned, 1.0, "the LM server to see the client go")
    assert store.get_run(sid, handle.id).status == "cancelled"
    wait_for(lambda: not runs_in_flight(), 10, "the abandoned thread to end at once")
    # The shut-down connection was closed, not left to the garbage collector (an
    # unclosed socket found here fails the test: filterwarnings "error").
    gc.collect()


# --- runs in their task's own thread (run_bounded(inline=True), watchdog.py) ----------------


def test_inline_run_bounded() -> None:
    """An inline run works in the caller's thread, keeps nothing on it, and is stopped by
    the watchdog at its deadline or on a cancel: its stoppable waits end at once."""
    caller = threading.get_ident()
    assert run_bounded(threading.get_ident, 5, inline=True) == caller
    with pytest.raises(KeyError):
        run_bounded(lambda: {}["x"], 5, inline=True)
    var: contextvars.ContextVar[str] = contextvars.ContextVar("inline", default="unset")
    run_bounded(lambda: var.set("left by the run"), 5, inline=True)
    assert var.get() == "unset" and _current_run_or_none() is None
    assert abandon.bound() is None

    started = time.monotonic()
    with pytest.raises(TaskTimeout) as timed_out:
        run_bounded(lambda: abandon.pause(30), 0.2, inline=True)
    assert timed_out.value.code == "task_timeout"
    assert time.monotonic() - started < 2 and runs_in_flight() == 0  # nothing left running

    asked = threading.Event()

    def wait_for_the_cancel() -> None:
        asked.set()
        abandon.pause(30)

    started = time.monotonic()
    with pytest.raises(RunCancelled):
        run_bounded(wait_for_the_cancel, 30, should_stop=asked.is_set, inline=True)
    assert time.monotonic() - started < 2 and runs_in_flight() == 0


def test_the_watchdog_polls_all_its_runs_in_one_round_trip(stack: Stack) -> None:
    store = stack.runtime.store
    batches: list[int] = []
    one_by_one: list[str] = []
    polled = threading.Event()

    class Spy:
        """Counts the round trips of the real store's calls."""

        def __init__(self) -> None:
            self.redis = store.redis

        def stops_requested(self, runs: list[tuple[str, str]]) -> list[bool]:
            batches.append(len(runs))
            answer = store.stops_requested(runs)
            polled.set()
            return answer

        def stop_requested(self, session_id: str, run_id: str) -> bool:
            one_by_one.append(run_id)
            return store.stop_requested(session_id, run_id)

    spy = Spy()
    dog = Watchdog(0.05)
    stops = [abandon.RunStop() for _ in range(3)]
    watches = [
        dog.watch(s, time.monotonic() + 30, StopPoll(spy, "tl-none", f"run-{i}"))  # type: ignore[arg-type]
        for i, s in enumerate(stops)
    ]
    assert polled.wait(5)
    assert batches[0] == 3 and not one_by_one
    assert not any(s.stopped for s in stops)  # no such run was asked to stop
    assert [dog.unwatch(w) for w in watches] == [None, None, None]


def test_runs_inline_only_where_a_stop_cuts_every_wait(stack: Stack) -> None:
    qa = normalize_spec({"module": "predict", "signature": QA})
    react = normalize_spec(
        {"module": "react", "signature": QA, "config": {"tools": ["calculator"]}}
    )
    http = stack.runtime.lms.resolve({"profile": "default"}, {})
    assert runs_inline(qa, http)
    assert not runs_inline(react, http)  # its tools are code a stop cannot cut short
    echo = LMRegistry({"e": LMProfileConfig(name="e", model="dspex/echo")})
    assert not runs_inline(qa, echo.resolve({"profile": "e"}, {}))  # an in-process model


def test_a_predict_task_runs_in_its_pool_thread(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No hand-off to a run thread for an HTTP LM's Predict: the task's own thread runs it."""
    handed_off: list[object] = []
    real = runtime_module._run_executor

    def spy() -> Any:
        handed_off.append(threading.get_ident())
        return real()

    monkeypatch.setattr(runtime_module, "_run_executor", spy)
    sid = f"tl-{uuid.uuid4().hex[:10]}"
    stack.runtime.store.create_session(sid, ttl_s=300)
    ok = mark()
    result = stack.app.send_task(PREDICT_TASK, args=[sid, QA, _question(ok)]).get(timeout=15)
    assert result["outputs"] == {"answer": f"answer for MARK[{ok}]"}
    assert handed_off == []


def test_a_stopped_request_is_not_retried_after_a_back_off(stack: Stack) -> None:
    """DSPy retries a request that failed in transit after sleeping 1 s: a request a stop
    shut down is not retried, so an inline run's thread is back at once."""
    lm = stack.runtime.lms.resolve({"profile": "default"}, {})
    assert lm.num_retries >= 1
    module = build_module(normalize_spec({"module": "predict", "signature": QA}))
    hung = mark()
    stop_now = threading.Event()
    cancelled: list[float] = []

    def should_stop() -> bool:
        if hung in stack.fake.hanging and not stop_now.is_set():
            stop_now.set()
            cancelled.append(time.monotonic())
        return stop_now.is_set()

    with pytest.raises(RunCancelled):
        run_bounded(
            lambda: run_module(module, lm, _question(hung, hang=True)),
            30,
            should_stop,
            inline=True,
        )
    assert time.monotonic() - cancelled[0] < 0.9  # no 1 s back-off slept
    assert stack.fake.hanging.count(hung) == 1
    wait_for(lambda: hung in stack.fake.abandoned, 5, "the LM server to see the client go")
