"""The Celery tasks: thin, like web views. Names are a wire contract (DESIGN.md §4).

Arguments are bound here by hand rather than by Celery so that a foreign producer's
wrong arity becomes ``invalid_inputs`` with a readable message, not a bare TypeError.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import random
import threading
from collections.abc import Callable
from typing import Any

from celery import Celery, Task, states
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded
from kombu.exceptions import OperationalError

from dspex_tasks import handoff
from dspex_tasks.app import COMPILE_TASK, COT_TASK, EXPIRE_TASK, PREDICT_TASK, RUN_PROGRAM_TASK
from dspex_tasks.compile_job import run_compile
from dspex_tasks.compile_request import check_examples, check_request
from dspex_tasks.errors import (
    RETRYABLE_ERRORS,
    DspexError,
    DuplicateDelivery,
    InvalidInputs,
    LMRateLimited,
    RunCancelled,
    SessionBusy,
    TaskTimeout,
)
from dspex_tasks.resultbackend import TaskRecords, started_result, writes_to
from dspex_tasks.runtime import Runtime
from dspex_tasks.settings import Settings
from dspex_tasks.store import SessionStore
from dspex_tasks.store.runs import RunDecision, RunHeld, RunTicket, check_multitask
from dspex_tasks.store.scripts import Status

__all__ = ["DspexTask", "register_tasks", "resend_overdue"]

log = logging.getLogger(__name__)
#: Request attribute: the task already left the ledger (``Runtime.run(forget_sent=True)``).
_LEFT_LEDGER = "_dspex_left_ledger"


class DspexTask(Task):  # type: ignore[misc]
    """A task whose retry survives a broker outage, and that leaves the task ledger
    (``store/ledger.py``) once it reaches a final state.

    Celery retries by publishing a new message; when that publish fails (Redis is down:
    with one Redis for store and broker, exactly when a ``store_unavailable`` retry is
    due) it raises ``Reject(requeue=False)``, which records a FAILURE and drops the
    message, so the task is lost. Here the message is left to the broker instead
    (``requeue=True``: requeued if Redis is back, otherwise it stays unacknowledged and
    comes back after the visibility timeout) and no failure is recorded.
    """

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().retry(*args, **kwargs)
        except Reject as e:
            if e.requeue or not isinstance(e.reason, (OperationalError, OSError)):
                raise
            log.warning(
                "task %s: cannot publish its retry (%s); leaving the message to the broker",
                self.request.id,
                e.reason,
            )
            raise Reject(e.reason, requeue=True) from None

    #: The process's Runtime accessor (set per app by ``register_tasks``).
    runtime: Callable[[], Runtime] | None = None

    def after_return(
        self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        # Celery calls this for SUCCESS and FAILURE only (not RETRY, IGNORED, REJECTED):
        # the task is final, so the ledger must not send it again.
        if self.runtime is None or not task_id or self.name == EXPIRE_TASK:
            return
        if not self.app.dspex_settings.task_ledger or getattr(self.request, _LEFT_LEDGER, False):
            return
        try:
            self.runtime().store.forget_sent(task_id)
        except DspexError as e:
            log.warning("task %s: cannot clear its ledger entry (%s); it may be resent", task_id, e)


def resend_overdue(app: Celery, store: SessionStore | None) -> int:
    """Send again every ledger task still unfinished after ``resend_after_s`` (same id)."""
    settings: Settings = app.dspex_settings
    if not settings.task_ledger or store is None:
        return 0
    due = store.due_resends(settings.resend_after_s)
    for task_id, message in due:
        log.warning(
            "task %s has not finished %d s after it was sent: sending it again",
            task_id,
            settings.resend_after_s,
        )
        app.send_task(
            message["task"], args=message["args"], kwargs=message["kwargs"], task_id=task_id
        )
    return len(due)


def _message(task: Any) -> dict[str, Any]:
    """The task message as the ledger keeps it (to publish a parked run again)."""
    return {
        "task": task.name,
        "args": list(task.request.args or ()),
        "kwargs": dict(task.request.kwargs or {}),
    }


def _multitask(options: Any) -> str | None:
    strategy = options.get("multitask") if isinstance(options, dict) else None
    return check_multitask(strategy)


@functools.cache
def _signature(shape: Callable[..., None]) -> inspect.Signature:
    return inspect.signature(shape)  # built once per shape, not on every task


def _bind(shape: Callable[..., None], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        return _signature(shape).bind(*args, **kwargs).arguments
    except TypeError as e:
        raise InvalidInputs(f"bad task arguments: {e}") from None


def _lm_args(session_id: Any, signature: Any, inputs: Any, options: Any = None) -> None: ...
def _program_args(session_id: Any, program_id: Any, inputs: Any, options: Any = None) -> None: ...
def _compile_args(session_id: Any, program_id: Any, trainset: Any, options: Any = None) -> None: ...
def _no_args() -> None: ...


def register_tasks(app: Celery, runtime: Callable[[], Runtime]) -> None:
    """Define the dspex tasks on ``app``; ``runtime`` returns the process's Runtime."""
    settings = app.dspex_settings
    base = type("AppTask", (DspexTask,), {"runtime": staticmethod(runtime)})
    retry = {
        "base": base,
        "autoretry_for": RETRYABLE_ERRORS,
        "retry_backoff": 1,
        "retry_backoff_max": 60,
        "retry_jitter": True,
        "max_retries": settings.task_max_retries,
    }
    # Tasks that claim their id write their STARTED state themselves (``_records``).
    claiming = {**retry, "track_started": False}

    def run(task: Any, spec: dict[str, Any] | None, a: dict[str, Any], pid: Any) -> Any:
        return as_run(
            task, a, lambda ticket, should_stop: _run(task, spec, a, pid, should_stop, ticket)
        )

    def as_run(
        task: Any,
        a: dict[str, Any],
        work: Callable[[RunTicket | None, Callable[[], bool] | None], Any],
        precheck: Callable[[], None] | None = None,
    ) -> Any:
        """``work`` as a run of the session: admitted (multitask), recorded, finished.

        Without ``precheck``, ``work`` starts the run itself, in the round trip that
        claims its task, and ends it (succeeded, no variables written) in the one that
        records the result (``Runtime.run`` with the ticket; ``store/runs.py``). With it
        (work that claims no task: a compile), the run is started here, once
        ``precheck`` passed.
        """
        rt = runtime()
        run_id, sid = task.request.id, a["session_id"]
        if not run_id:  # called directly (tests, eager mode): no run to coordinate
            return work(None, None)
        options = a.get("options")
        ticket = RunTicket(
            task.name,
            _multitask(options),
            lambda: _message(task),
            lambda decision: handoff.follow(task.app, rt.store, decision),
        )
        outcome, code = "failed", None
        try:
            if precheck is not None:
                # Bad input fails as it always did, before the run is recorded.
                precheck()
                _start(rt, sid, run_id, ticket)
            result = work(ticket, rt.store.stop_poll(sid, run_id))
            outcome = "succeeded"
            return result
        except RunHeld as held:
            outcome = ""
            raise _held(task, rt, held.decision, sid, run_id, options) from None
        except DuplicateDelivery:
            outcome = ""  # the other delivery of this run ends it
            raise Ignore() from None
        except RunCancelled as e:
            outcome, code = "stopped", e.code
            raise
        except Retry:
            outcome = ""  # deferred by the LM limiter (defer_rate_limited): the run goes on
            raise
        except Reject as e:
            if e.requeue:
                outcome = ""  # left to the broker: the run goes on
            raise
        except DspexError as e:
            code = e.code
            retrying = task.request.retries < task.max_retries
            if isinstance(e, RETRYABLE_ERRORS) and retrying:
                outcome = ""  # retried later: the run goes on
            if not ticket.admitted:
                # Refused before the run started (bad input, no session): as before any
                # run existed, its stream (if any) ends with the error.
                rt.refuse_stream(run_id, sid, options, e, retry=retrying)
            raise
        except BaseException as e:
            code = getattr(e, "code", None) or type(e).__name__
            raise
        finally:
            if outcome and ticket.admitted:
                with contextlib.suppress(DspexError):
                    ended = ticket.finished or rt.store.finish_run(sid, run_id, outcome, code)
                    handoff.follow(task.app, rt.store, ended)

    def _start(rt: Runtime, sid: str, run_id: str, ticket: RunTicket) -> None:
        """Start ``ticket``'s run in a round trip of its own (``RunHeld`` if it may not go)."""
        decision = rt.store.start_run(
            sid, run_id, ticket.task, ticket.message(), multitask=ticket.multitask
        )
        if decision.verdict != Status.OK:
            raise RunHeld(decision)
        ticket.admitted = True
        if decision.dropped:
            ticket.follow(decision)

    def _held(
        task: Any, rt: Runtime, decision: RunDecision, sid: str, run_id: str, options: Any
    ) -> BaseException:
        """What a task raises for a run that may not go now (``RunHeld``)."""
        handoff.follow(task.app, rt.store, decision)
        if decision.verdict == Status.PARKED:
            # Not its turn: the message is kept in Redis and sent again when the run
            # ahead ends; this delivery holds no worker thread while it waits.
            ignore: BaseException = Ignore()
            return ignore
        if decision.verdict == Status.REJECTED:
            busy = SessionBusy(
                f"session {sid!r} has a run queued or running (multitask=reject)",
                {"session_id": sid, "run_id": run_id},
            )
            return rt.refuse_stream(run_id, sid, options, busy)
        stopped = RunCancelled(
            f"run {run_id} was {decision.status} before it started",
            {"run_id": run_id, "status": decision.status},
        )
        return rt.refuse_stream(run_id, sid, options, stopped)

    # Who writes a claiming task's STARTED record: "store" (with SUCCESS, in its claim and
    # finish round trips), "backend" (here, as Celery writes it) or "none" (no
    # task_track_started). Decided once: the settings, backend and store do not move.
    started_by: list[str] = []

    def _records(task: Any) -> TaskRecords | None:
        """The task's STARTED and SUCCESS records for the store to write: two round trips
        less per task. None when the store cannot (another Redis, Cluster, another
        serializer): Celery writes SUCCESS, and STARTED is written here before the task's
        claim, as Celery would have written it before the task."""
        request = task.request
        if request.is_eager or not request.id or request.ignore_result:
            return None
        if not started_by:
            if not app.conf.task_track_started:
                started_by.append("none")
            else:
                shared = writes_to(task.backend, runtime().store.redis)
                started_by.append("store" if shared else "backend")
        if started_by[0] == "store":
            return TaskRecords(task.backend, request)
        if started_by[0] == "backend":
            task.backend.store_result(
                request.id, started_result(request), states.STARTED, request=request
            )
        return None

    def _run(
        task: Any,
        spec: dict[str, Any] | None,
        a: dict[str, Any],
        pid: Any,
        should_stop: Callable[[], bool] | None,
        ticket: RunTicket | None,
    ) -> Any:
        ledger = settings.task_ledger and bool(task.request.id)
        try:
            result = runtime().run(
                task.request.id,
                a["session_id"],
                spec,
                a["inputs"],
                a.get("options"),
                program_id=pid,
                attempt=task.request.retries or 0,
                # Leaving the ledger with the finish record saves after_return a round trip.
                forget_sent=ledger,
                should_stop=should_stop,
                run=ticket,
                records=_records(task),
            )
            if ledger:
                setattr(task.request, _LEFT_LEDGER, True)
            return result
        except LMRateLimited as e:
            defer_rate_limited(task, e)
            raise
        except SoftTimeLimitExceeded:
            # Pools that enforce Celery's limits (prefork) end here; the threads pool
            # ends in Runtime's own deadline with the same error.
            raise TaskTimeout(
                f"the task passed its soft time limit ({settings.task_soft_time_limit_s} s)",
                {"timeout_s": settings.task_soft_time_limit_s},
            ) from None

    # shared=False: a shared task would also be added to every Celery app finalized later
    # in this process, bound to *this* runtime, so a second app's worker would run the
    # first app's runtime (its store, prefix and LMs) under the dspex.* names.
    @app.task(name=PREDICT_TASK, bind=True, shared=False, **claiming)  # type: ignore[untyped-decorator]
    def predict(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        a = _bind(_lm_args, args, kwargs)
        return run(self, runtime().spec_for("predict", a["signature"]), a, None)  # type: ignore[no-any-return]

    @app.task(name=COT_TASK, bind=True, shared=False, **claiming)  # type: ignore[untyped-decorator]
    def chain_of_thought(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        a = _bind(_lm_args, args, kwargs)
        spec = runtime().spec_for("chain_of_thought", a["signature"])
        return run(self, spec, a, None)  # type: ignore[no-any-return]

    @app.task(name=RUN_PROGRAM_TASK, bind=True, shared=False, **claiming)  # type: ignore[untyped-decorator]
    def run_program(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        a = _bind(_program_args, args, kwargs)
        return run(self, None, a, a["program_id"])  # type: ignore[no-any-return]

    @app.task(name=COMPILE_TASK, bind=True, shared=False, **retry)  # type: ignore[untyped-decorator]
    def compile_program(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        a = _bind(_compile_args, args, kwargs)
        if a.get("options") is None or isinstance(a["options"], dict):
            # A compile always has a stream: a refusal before it runs ends it too.
            a["options"] = {**(a.get("options") or {}), "stream": True}

        def precheck() -> None:
            check_request(a["options"])
            if not isinstance(a["trainset"], str):
                check_examples(a["trainset"])

        def work(should_stop: Callable[[], bool] | None) -> Any:
            # Progress comes from the run's own thread, where Celery's (thread-local)
            # request is empty: the id is taken here.
            task_id = None if self.request.called_directly else self.request.id

            def progress(meta: dict[str, Any]) -> None:
                if task_id:
                    self.update_state(task_id=task_id, state="PROGRESS", meta=meta)

            try:
                return run_compile(
                    runtime(),
                    self.request.id or f"direct-{id(a)}",
                    a["session_id"],
                    a["program_id"],
                    a["trainset"],
                    a["options"],
                    attempt=self.request.retries or 0,
                    should_stop=should_stop,
                    on_progress=progress,
                )
            except LMRateLimited as e:
                defer_rate_limited(self, e)
                raise

        return as_run(  # type: ignore[no-any-return]
            self, a, lambda _ticket, should_stop: work(should_stop), precheck
        )

    @app.task(name=EXPIRE_TASK, bind=True, shared=False, **retry)  # type: ignore[untyped-decorator]
    def expire_sessions(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        _bind(_no_args, args, kwargs)
        result = runtime().expire_sessions()
        # The maintenance sweep also sends again the tasks the broker lost.
        resend_overdue(self.app, getattr(runtime(), "store", None))
        return result


def defer_rate_limited(task: Any, error: LMRateLimited) -> None:
    """A call the LM limiter could not fit in ``max_wait_s``: retry the task when its
    turn may come (``retry_after_s``), however often: delayed, never failed.

    Raises celery's Retry; returns for a provider's own 429 (no ``retry_after_s``), which
    retries with backoff, within ``max_retries``, like any retryable error.
    """
    after = error.details.get("retry_after_s")
    if not isinstance(after, (int, float)):
        return
    # The limiter spaced the deferred calls' returns one turn apart: a little jitter only.
    countdown = min(300.0, max(1.0, float(after))) + random.uniform(0.0, 0.25)
    request = task.request
    if request.called_directly:
        return
    # Sent like Task.retry sends a retry, but with ``retries`` unchanged: a deferral never
    # counts against max_retries, nor in the backoff of a later failure's retries. (And
    # not retry(max_retries=...): that leaves an override on the task object, which the
    # pool's threads share, for the next autoretry of any task to pick up.)
    again = task.signature_from_request(request, countdown=countdown, retries=request.retries)
    try:
        again.apply_async()
    except Exception as e:  # as DspexTask.retry: a broker outage leaves the message to it
        raise Reject(e, requeue=isinstance(e, (OperationalError, OSError))) from None
    raise Retry(exc=error, when=countdown, sig=again)


def lazy_runtime(factory: Callable[[], Runtime]) -> Callable[[], Runtime]:
    """A thread-safe, build-once accessor for the process's Runtime."""
    lock = threading.Lock()
    holder: list[Runtime] = []

    def get() -> Runtime:
        if not holder:
            with lock:
                if not holder:
                    holder.append(factory())
        return holder[0]

    return get
