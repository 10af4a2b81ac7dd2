"""One compile run on a worker (DESIGN.md §12): lease, LM, steps, checkpoints, stream.

The run holds its program's optimization lease for its whole life, renewed from a
thread of its own (:class:`LeaseKeeper`), and released on every end: the commit of the
new version releases it in the same script; a failure or a cancel releases it here; a
killed worker renews nothing, so the lease lapses within ``claim_lease_s``. The
broker hands the message out again; that delivery takes the lapsed lease, gets the
run's checkpoint back and runs only the steps not done yet. Every LM call of a compile
goes through the shared LM cache (the profile's, else one of the session's), so the
calls of a step cut short are answered from Redis when it runs again.

A compile run always has a stream: a ``progress`` event ``{"step", "total",
"best_score"}`` after each step (the same meta goes to Celery's ``PROGRESS`` state), then
``done`` (the result) or ``error``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import dspy

from dspex_tasks.compile_request import check_request, example_fields
from dspex_tasks.errors import (
    RETRYABLE_ERRORS,
    DspexError,
    DuplicateDelivery,
    LMError,
)
from dspex_tasks.lm import SAFE_LM_PARAMS, abandon, bound_params
from dspex_tasks.lm.traffic import RunUsage, TrafficLM, counted
from dspex_tasks.metrics import get_metric
from dspex_tasks.optimize import compile_program, examples
from dspex_tasks.programs import redact
from dspex_tasks.runcontext import RunContext
from dspex_tasks.runtime import Runtime, run_bounded
from dspex_tasks.settings import LMCacheConfig
from dspex_tasks.specs import normalize_spec
from dspex_tasks.store import CompileStart, SessionStore
from dspex_tasks.store.compile import locked
from dspex_tasks.store.scripts import Status
from dspex_tasks.streaming import RunStreamWriter, stream_failed

__all__ = ["CompileRun", "LeaseKeeper", "run_compile"]

log = logging.getLogger(__name__)
#: How often a delivery that found its run's lease held elsewhere asks again.
_LEASE_POLL_S = 0.5
#: ``on_progress(meta)``: the task's hook for Celery's ``PROGRESS`` state.
OnProgress = Callable[[dict[str, Any]], None]


class LeaseKeeper:
    """Renews one compile's lease every third of it until stopped; notes a lost lease
    (the run then stops: another delivery owns the program now)."""

    def __init__(self, store: SessionStore, sid: str, pid: str, token: str, lease_s: float):
        self.store, self.sid, self.pid, self.token, self.lease_s = store, sid, pid, token, lease_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dspex-lease", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if not self.store.renew_compile(self.sid, self.pid, self.token, self.lease_s):
                    self.lost.set()
                    return
            except DspexError as e:  # Redis down: the next round tries again
                log.warning("cannot renew the optimization lease of %s: %s", self.pid, e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _take_lease(rt: Runtime, sid: str, pid: str, run_id: str, token: str) -> CompileStart:
    """The lease for this delivery, waiting while another delivery of the run holds it."""
    deadline = time.monotonic() + rt.claims.max_hold_s + rt.claims.lease_s
    while True:
        start = rt.store.begin_compile(sid, pid, run_id, token, rt.claims.lease_s)
        if start.status == Status.LOCKED:
            raise locked(sid, pid, start.holder or "?")
        if start.status != Status.RUNNING:
            return start
        if time.monotonic() >= deadline:
            raise DuplicateDelivery(
                f"compile {run_id} is still running elsewhere", {"run_id": run_id}
            )
        time.sleep(_LEASE_POLL_S)


def _compile_lm(rt: Runtime, sid: str, used: RunUsage, stop: abandon.RunStop) -> Any:
    """The session's LM, bound to this run, every call through a shared cache."""
    session = rt.store.get_session(sid)
    found, _ = rt.store.get_variables(sid, list(SAFE_LM_PARAMS))
    lm = rt.lms.resolve(session.lm, bound_params(found))
    if not isinstance(lm, TrafficLM):  # an installed LM object (tests, embedding apps)
        return lm
    gate = lm._dspex_gate
    traffic = rt.lms.traffic
    if gate is not None and traffic is not None:
        s = rt.settings
        keep_s = max(3600, s.visibility_timeout_s * 2 + s.task_time_limit_s)
        config = LMCacheConfig(ttl_s=keep_s, scope="session", any_temperature=True)
        gate = traffic.with_cache(gate, config)
    return lm.carrying(used, stop, gate)


def run_compile(
    rt: Runtime,
    run_id: str,
    session_id: str,
    program_id: str,
    trainset: Any,
    options: Any,
    *,
    attempt: int = 0,
    should_stop: Callable[[], bool] | None = None,
    on_progress: OnProgress | None = None,
) -> dict[str, Any]:
    """Compile ``program_id`` of ``session_id``; returns the task's result.

    Raises:
        InvalidInputs, DatasetNotFound, ProgramNotFound, PayloadTooLarge,
        OptimizationInProgress (another run holds the program), RunCancelled,
        TaskTimeout, DuplicateDelivery, and what an LM call raises.
    """
    run = CompileRun(rt, run_id, session_id, program_id, should_stop, on_progress)
    opts = check_request(options)
    get_metric(opts["metric"])  # an unknown metric fails before the lease is taken
    train = rt.store.examples(session_id, trainset, "trainset")
    val = rt.store.examples(session_id, opts["valset"], "valset") if "valset" in opts else train
    try:
        start = _take_lease(rt, session_id, program_id, run_id, run.token)
        if start.status == Status.DONE:  # this run committed before its worker died
            assert start.committed is not None
            committed = start.committed
            result = run.result(committed.version, committed.score, committed.baseline_score, {})
        else:
            result = run.held(start, train, val, opts)
    except DuplicateDelivery:
        raise  # the other delivery owns the stream
    except BaseException as e:
        retry = isinstance(e, RETRYABLE_ERRORS) and attempt < rt.settings.task_max_retries
        with contextlib.suppress(DspexError):
            run.writer.close(stream_failed(e, retry=retry))
        raise
    with contextlib.suppress(DspexError):  # the result stands even so
        run.writer.close([("done", result)])
    return result


class CompileRun:
    """One delivery of a compile run: its identity, lease token, stream and hooks."""

    def __init__(
        self,
        rt: Runtime,
        run_id: str,
        session_id: str,
        program_id: str,
        should_stop: Callable[[], bool] | None,
        on_progress: OnProgress | None,
    ) -> None:
        self.rt, self.run_id, self.sid, self.pid = rt, run_id, session_id, program_id
        self.should_stop, self.on_progress = should_stop, on_progress
        self.started = time.perf_counter()
        self.token = uuid.uuid4().hex
        s = rt.settings
        self.writer = RunStreamWriter(
            rt.store,
            session_id,
            run_id,
            running_keep_s=s.task_time_limit_s + s.stream_keep_s,
            keep_s=s.stream_keep_s,
        )

    def result(
        self, version: int, score: float | None, baseline: float | None, lm: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "session_id": self.sid,
            "program_id": self.pid,
            "version": version,
            "score": score,
            "baseline_score": baseline,
            "lm": lm,
            "duration_ms": round((time.perf_counter() - self.started) * 1000, 3),
        }

    def progress(self, step: int, total: int, best: float | None) -> None:
        meta = {"step": step, "total": total, "best_score": best}
        self.writer.add("progress", meta)
        if self.on_progress is not None:
            with contextlib.suppress(Exception):  # Flower's view only: never fatal
                self.on_progress(meta)

    def save(self, state: dict[str, Any]) -> None:
        self.rt.store.save_checkpoint(self.sid, self.pid, self.run_id, self.token, state)

    def held(
        self,
        start: CompileStart,
        train: list[dict[str, Any]],
        val: list[dict[str, Any]],
        opts: Mapping[str, Any],
    ) -> dict[str, Any]:
        """The compile proper, with the lease held (released here on any failure)."""
        rt, sid, pid = self.rt, self.sid, self.pid
        keeper = LeaseKeeper(rt.store, sid, pid, self.token, rt.claims.lease_s)
        used, stop = RunUsage(sid), abandon.RunStop()
        committed = False
        try:
            assert start.spec is not None
            spec = normalize_spec(start.spec)
            example_fields(train, spec["signature"], "trainset")
            example_fields(val, spec["signature"], "valset")
            lm = _compile_lm(rt, sid, used, stop)

            def work() -> Any:
                with dspy.context(lm=lm):
                    return compile_program(
                        spec,
                        examples(train, spec["signature"]),
                        examples(val, spec["signature"]),
                        opts,
                        metric=get_metric(opts["metric"]),
                        checkpoint=start.checkpoint,
                        save=self.save,
                        progress=self.progress,
                    )

            def stopping() -> bool:
                asked = self.should_stop is not None and self.should_stop()
                return keeper.lost.is_set() or asked

            left_s = rt.settings.task_soft_time_limit_s - (time.perf_counter() - self.started)
            context = RunContext(sid, self.run_id, rt.store)
            try:
                outcome = run_bounded(lambda: counted(used, work), left_s, stopping, context, stop)
            except DspexError:
                raise
            except Exception as e:
                # DSPy's optimizers raise plain errors (too many failed calls, a bad
                # setting). No chaining: a cause's text can echo the prompt or the key.
                text = redact(str(e).splitlines()[0] if str(e) else "", lm)[:300]
                raise LMError(f"the optimizer failed: {type(e).__name__}: {text}") from None
            if keeper.lost.is_set():
                raise locked(sid, pid, "another delivery")
            compiled = normalize_spec({**spec, "state": outcome.state})
            version = rt.store.commit_compile(
                sid, pid, self.run_id, self.token, compiled, outcome.score, outcome.baseline_score
            )
            committed = True
        except BaseException as e:
            keep = isinstance(e, RETRYABLE_ERRORS)  # the retry resumes from the checkpoint
            with contextlib.suppress(DspexError):
                rt.store.release_compile(sid, pid, self.token, keep_checkpoint=keep)
            raise
        finally:
            keeper.stop()
            rt.record_usage(used)
            if not committed:
                stop.stop()  # an abandoned step makes no further LM call
        model = getattr(lm, "model", "unknown")
        usage = {"model": model, "usage": used.as_dict()}
        return self.result(version, outcome.score, outcome.baseline_score, usage)
