"""Runs (DESIGN.md §9) on a real worker: the registry, the multitask strategies, cancel.

The fake LM blocks each call on a gate the test opens, so "a run is in its LM call" is a
real condition the test waits for, never a sleep.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from support.polling import wait_until
from support.worker import Call, DspexWorker, default_answer, mark

from dspex_tasks.app import PREDICT_TASK
from dspex_tasks.client import Client
from dspex_tasks.errors import DspexError, InvalidInputs, RunCancelled, RunNotFound, SessionBusy

SIG = "question -> answer"


class Gates:
    """Per-marker gates: a call carrying the marker waits until its gate opens."""

    def __init__(self) -> None:
        self._gates: dict[str, threading.Event] = {}
        self.started: list[str] = []
        self._lock = threading.Lock()

    def gate(self, dspex: DspexWorker, marker: str) -> threading.Event:
        event = threading.Event()
        self._gates[marker] = event

        def respond(call: Call) -> dict[str, str]:
            with self._lock:
                self.started.append(marker)
            event.wait(60)
            return default_answer(call)

        dspex.recorder.script(marker, respond)
        return event

    def open_all(self) -> None:
        for event in self._gates.values():
            event.set()


@pytest.fixture
def gates() -> Iterator[Gates]:
    g = Gates()
    yield g
    g.open_all()  # abandoned LM threads end too


@pytest.fixture(scope="module")
def client(dspex: DspexWorker) -> Iterator[Client]:
    with Client(settings=dspex.settings) as c:
        yield c


def _q(marker: str) -> dict[str, str]:
    return {"question": f"MARK[{marker}] why?"}


def _in_lm(gates: Gates, marker: str) -> None:
    wait_until(lambda: marker in gates.started, 20, what=f"run {marker} in its LM call")


# --- the registry -------------------------------------------------------------------------


def test_every_run_is_recorded_queued_running_final(
    dspex: DspexWorker, client: Client, gates: Gates
) -> None:
    sid = dspex.session()
    m = mark()
    gate = gates.gate(dspex, m)
    h = client.session(sid).predict(SIG, **_q(m))
    _in_lm(gates, m)
    running = dspex.store.get_run(sid, h.id)
    assert (running.status, running.task) == ("running", PREDICT_TASK)
    assert running.started_at is not None and running.finished_at is None
    gate.set()
    h.get(timeout=20)
    done = dspex.store.get_run(sid, h.id)
    assert done.status == "succeeded" and done.finished_at is not None
    assert [r.id for r in client.session(sid).runs()] == [h.id]
    kinds = [e.type for e in dspex.store.events(sid, types=None) if e.type.startswith("run.")]
    assert kinds == ["run.queued", "run.started", "run.succeeded"]
    broken = mark()

    def fail(call: Call) -> dict[str, str]:
        raise ValueError("the provider broke")

    dspex.recorder.script(broken, fail)
    failed = client.session(sid).predict(SIG, **_q(broken))
    with pytest.raises(DspexError):
        failed.get(timeout=20)
    record = dspex.store.get_run(sid, failed.id)
    assert (record.status, record.error_code) == ("failed", "lm_error")
    with pytest.raises(RunNotFound):
        dspex.store.get_run(sid, "nope")


def test_unknown_strategy_is_refused_before_enqueue(dspex: DspexWorker, client: Client) -> None:
    sid = dspex.session()
    with pytest.raises(InvalidInputs):
        client.session(sid).predict(SIG, options={"multitask": "sometimes"}, question="x")
    with pytest.raises(InvalidInputs):
        client.session(sid).configure(multitask="sometimes")
    assert client.session(sid).runs() == []


# --- strategies -----------------------------------------------------------------------------


def test_parallel_runs_overlap(dspex: DspexWorker, client: Client, gates: Gates) -> None:
    sid = dspex.session()
    a, b = mark(), mark()
    ga, gb = gates.gate(dspex, a), gates.gate(dspex, b)
    ha = client.session(sid).predict(SIG, **_q(a))
    hb = client.session(sid).predict(SIG, **_q(b))
    _in_lm(gates, a)
    _in_lm(gates, b)  # both in their LM call at once
    ga.set()
    gb.set()
    assert ha.get(timeout=20)["answer"] and hb.get(timeout=20)["answer"]


def test_reject_refuses_while_busy_and_exactly_one_racer_wins(
    dspex: DspexWorker, client: Client, gates: Gates
) -> None:
    sid = dspex.session()
    s = client.session(sid)
    s.configure(multitask="reject")
    first = mark()
    gate = gates.gate(dspex, first)
    h = s.predict(SIG, **_q(first))
    _in_lm(gates, first)
    calls_before = dspex.recorder.count()
    with pytest.raises(SessionBusy) as info:
        s.predict(SIG, question="second")
    assert info.value.code == "session_busy"
    # A foreign producer's task (by name, no Client) ends FAILURE with the same code.
    foreign = dspex.send(PREDICT_TASK, sid, SIG, {"question": "foreign"})
    with pytest.raises(SessionBusy):
        foreign.get(timeout=20)
    assert dspex.recorder.count() == calls_before  # neither reached the LM
    statuses = sorted(r.status for r in s.runs())
    assert statuses == ["rejected", "rejected", "running"]
    gate.set()
    h.get(timeout=20)
    # Racing producers on an idle session: exactly one wins.
    idle = dspex.session()
    client.session(idle).configure(multitask="reject")
    racer = mark()
    gates.gate(dspex, racer)
    barrier = threading.Barrier(8)
    won: list[Any] = []
    lost: list[Any] = []

    def race() -> None:
        barrier.wait()
        try:
            won.append(client.session(idle).predict(SIG, **_q(racer)))
        except SessionBusy as e:
            lost.append(e)

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(won), len(lost)) == (1, 7)


def test_enqueue_runs_one_at_a_time_in_order_and_frees_other_sessions(
    dspex: DspexWorker, client: Client, gates: Gates
) -> None:
    sid = dspex.session()
    s = client.session(sid)
    s.configure(multitask="enqueue")
    markers = [mark() for _ in range(5)]
    events = [gates.gate(dspex, m) for m in markers]
    handles = [s.predict(SIG, **_q(m)) for m in markers]
    _in_lm(gates, markers[0])
    # Another session's run flows freely while these wait (no worker thread held).
    other = mark()
    gates.gate(dspex, other).set()
    assert client.session(dspex.session()).predict(SIG, **_q(other)).get(timeout=20)
    for i, event in enumerate(events):
        assert gates.started.count(markers[i]) == 1
        assert not any(m in gates.started for m in markers[i + 1 :])  # nobody overtook
        event.set()
        handles[i].get(timeout=20)
        if i + 1 < len(markers):
            _in_lm(gates, markers[i + 1])
    order = [m for m in gates.started if m in markers]
    assert order == markers
    assert [r.status for r in s.runs()] == ["succeeded"] * 5


@pytest.mark.parametrize(
    ("strategy", "status"), [("interrupt", "interrupted"), ("rollback", "rolled_back")]
)
def test_interrupt_and_rollback_stop_the_running_run_then_start(
    dspex: DspexWorker, client: Client, gates: Gates, strategy: str, status: str
) -> None:
    sid = dspex.session()
    s = client.session(sid)
    old, new = mark(), mark()
    gates.gate(dspex, old)  # never opened: only a stop ends it
    gates.gate(dspex, new).set()
    h_old = s.predict(SIG, **_q(old))
    _in_lm(gates, old)
    started = time.monotonic()
    h_new = s.predict(SIG, options={"multitask": strategy}, **_q(new))
    with pytest.raises(RunCancelled) as info:
        h_old.get(timeout=20)
    assert info.value.code == "run_cancelled"
    assert h_new.get(timeout=20)["answer"]
    assert time.monotonic() - started < 5
    assert dspex.store.get_run(sid, h_old.id).status == status
    assert dspex.store.get_run(sid, h_new.id).status == "succeeded"


# --- cancel -----------------------------------------------------------------------------


def test_cancel_a_running_run_stops_it_within_a_second(
    dspex: DspexWorker, client: Client, gates: Gates
) -> None:
    sid = dspex.session()
    m = mark()
    gates.gate(dspex, m)  # the LM never answers
    h = client.session(sid).predict(SIG, **_q(m))
    _in_lm(gates, m)
    t0 = time.monotonic()
    assert h.cancel() == "signalled"
    with pytest.raises(RunCancelled):
        h.get(timeout=10)
    assert time.monotonic() - t0 < 1.5
    assert dspex.store.get_run(sid, h.id).status == "cancelled"
    # Cancelling it again is a no-op, not an error.
    assert client.cancel(h.id, session_id=sid) == "finished"


def test_a_cancelled_queued_run_never_starts(
    dspex: DspexWorker, client: Client, gates: Gates
) -> None:
    sid = dspex.session()
    s = client.session(sid)
    s.configure(multitask="enqueue")
    first, second = mark(), mark()
    gate = gates.gate(dspex, first)
    gates.gate(dspex, second).set()
    h1 = s.predict(SIG, **_q(first))
    h2 = s.predict(SIG, **_q(second))
    _in_lm(gates, first)
    assert client.cancel(h2.id) == "stopped"  # found through the task ledger
    with pytest.raises(RunCancelled):
        h2.get(timeout=10)
    gate.set()
    h1.get(timeout=20)
    assert second not in gates.started
    assert dspex.store.get_run(sid, h2.id).status == "cancelled"
    with pytest.raises(RunNotFound):
        client.cancel("no-such-run", session_id=sid)


# --- rollback undoes what the run wrote ----------------------------------------------------


@pytest.mark.parametrize("how", ["cancel", "strategy"])
def test_rollback_of_a_run_that_wrote_restores_the_identical_state(
    dspex: DspexWorker, client: Client, gates: Gates, how: str
) -> None:
    """A ReAct run writes through its tool, then is stopped in its second LM call."""
    import json

    from dspex_tasks.runcontext import current_run
    from dspex_tasks.tools import tool, unregister_tool

    sid = dspex.session()
    s = client.session(sid)
    s.register_variable("notes", "string", "before", metadata={"k": 1})
    s.register_variable("count", "integer", 7)
    before = {v.name: (v.id, v.type, v.value, v.metadata) for v in s.variables().values()}
    versions = {v.name: v.version for v in s.variables().values()}

    @tool(name="take_note")
    def take_note(text: str) -> str:
        """Write a note to the session."""
        run = current_run()
        run.update({"notes": text, "count": 8})
        return "noted"

    m = mark()
    second = threading.Event()

    def script(call: Call) -> dict[str, str]:
        if "observation_0" not in call.user:
            return {
                "next_thought": "note it",
                "next_tool_name": "take_note",
                "next_tool_args": json.dumps({"text": "written by the run"}),
            }
        gates.started.append(m)
        second.wait(60)  # the second LM call hangs until the run is stopped
        return default_answer(call)

    dspex.recorder.script(m, script)
    spec = {
        "module": "react",
        "signature": SIG,
        "config": {"tools": ["take_note"], "max_iters": 3},
    }
    try:
        s.create_program("agent", "react", spec["signature"], config=spec["config"])
        h = s.run_program("agent", **_q(m))
        _in_lm(gates, m)
        assert s.get("notes") == "written by the run"  # the run wrote, mid-run
        if how == "cancel":
            assert h.cancel("rollback") == "signalled"
        else:
            gates.gate(dspex, other := mark()).set()
            follow = s.predict(SIG, options={"multitask": "rollback"}, **_q(other))
        with pytest.raises(RunCancelled):
            h.get(timeout=20)
        if how == "strategy":
            assert follow.get(timeout=20)["answer"]
    finally:
        second.set()
        unregister_tool("take_note")
    after = {v.name: (v.id, v.type, v.value, v.metadata) for v in s.variables().values()}
    assert after == before
    assert dspex.store.get_run(sid, h.id).status == "rolled_back"
    for name, version in s.variables().items():
        assert version.version > versions[name]  # new versions, never reused
    kinds = [e.type for e in s.events(types=["variable.rolled_back"])]
    assert len(kinds) == 2
