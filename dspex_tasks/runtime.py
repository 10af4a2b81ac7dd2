"""One task's work, end to end (worker side): session -> LM -> module -> JSON result.

The Celery tasks stay thin and call :meth:`Runtime.run`. A Runtime is built once per
worker process (it holds the store's connection pool, the LM objects and the module
cache) and is safe to share between the pool's threads.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import dspy
import orjson

from dspex_tasks.errors import (
    DspexError,
    DuplicateDelivery,
    LMError,
    PayloadTooLarge,
    RunCancelled,
    TaskTimeout,
)
from dspex_tasks.lm import SAFE_LM_PARAMS, LMRegistry, abandon, bound_params
from dspex_tasks.lm.traffic import LMTraffic, RunUsage, counted
from dspex_tasks.lru import LRU
from dspex_tasks.metrics import load_metric_modules, registered_metrics
from dspex_tasks.programs import (
    DigestedSpec,
    ModuleCache,
    build_module,
    outputs_to_json,
    run_module,
)
from dspex_tasks.runcontext import RunContext, set_current_run
from dspex_tasks.settings import Settings
from dspex_tasks.specs import check_inputs, check_options, inputs_json, normalize_spec
from dspex_tasks.store import SessionStore, TaskContext
from dspex_tasks.store.runs import RunHeld, RunTicket
from dspex_tasks.store.taskstate import ResultRecord
from dspex_tasks.store.usage import check_budget
from dspex_tasks.streaming import RunStreamWriter, run_streamed, stream_failed, streamed_fields
from dspex_tasks.tools import load_tool_modules
from dspex_tasks.watchdog import CANCELLED, TIMED_OUT, Watchdog

__all__ = [
    "ClaimRenewer",
    "Runtime",
    "configure_dspy_once",
    "run_bounded",
    "runs_in_flight",
    "runs_inline",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
#: How often a delivery that found its task running elsewhere checks the claim again.
_CLAIM_POLL_S = 0.5
#: Normalized specs kept per (module, signature text) by ``Runtime.spec_for``.
_MAX_CACHED_SPECS = 1024
_configured = threading.Lock()
_done = False
#: The stream writer of the streamed run this thread is serving (``Runtime._run_streamed``);
#: False while a run that must not stream (again) is served.
_STREAM: contextvars.ContextVar[RunStreamWriter | bool | None] = contextvars.ContextVar(
    "dspex_stream", default=None
)


def configure_dspy_once() -> None:
    """Process-wide DSPy settings, applied once (never per task).

    History off (a long-running worker would keep up to 10,000 full prompts per LM), and
    no disk cache (it grows on disk and is pickle-based); a bounded in-memory cache stays.
    """
    global _done
    with _configured:
        if _done:
            return
        dspy.configure(disable_history=True)
        dspy.configure_cache(
            enable_disk_cache=False, enable_memory_cache=True, memory_max_entries=10_000
        )
        abandon.install()
        _done = True


class ClaimRenewer:
    """Renews the leases of the task claims this process holds, from one daemon thread.

    A claim's lease is short (``Settings.claim_lease_s``) and renewed every third of it
    while the task runs, for at most ``max_hold_s`` (the hard time limit plus grace: the
    threads pool cannot kill a task, so a hung one stops being renewed and its claim
    lapses). A killed worker renews nothing, so its claims lapse within one lease.
    """

    def __init__(self, store: SessionStore, lease_s: float, max_hold_s: float) -> None:
        self.store = store
        self.lease_s = lease_s
        self.max_hold_s = max_hold_s
        self._held: dict[tuple[str, str], tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, session_id: str, task_id: str, attempt: int) -> None:
        with self._lock:
            self._held[(session_id, task_id)] = (attempt, time.monotonic())
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="dspex-claim-renewer", daemon=True
                )
                self._thread.start()

    def drop(self, session_id: str, task_id: str) -> None:
        with self._lock:
            self._held.pop((session_id, task_id), None)

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.lease_s / 3)
            now = time.monotonic()
            with self._lock:
                held = [
                    (sid, tid, attempt)
                    for (sid, tid), (attempt, since) in self._held.items()
                    if now - since < self.max_hold_s
                ]
            for sid, tid, attempt in held:
                try:
                    self.store.renew_task(sid, tid, attempt, self.lease_s)
                except DspexError as e:  # Redis down: the next round tries again
                    log.warning("cannot renew the claim of task %s: %s", tid, e)


#: How often a running task checks whether its run was asked to stop.
STOP_POLL_S = 0.25

#: Most threads running runs at once in a worker process (``run_bounded``): the pool's
#: concurrency plus runs abandoned by a cancel or a time limit that have not ended yet
#: (their LM request is shut down, so they end promptly). Threads start only when none is
#: idle, so this is a ceiling, not a size.
RUN_THREADS_MAX = 1024

_run_threads: ThreadPoolExecutor | None = None
_watchdog = Watchdog(STOP_POLL_S)
_run_threads_lock = threading.Lock()
_in_flight = 0


def runs_in_flight() -> int:
    """Runs of this process whose code is still going, abandoned ones included."""
    return _in_flight


def _count_in_flight(delta: int) -> None:
    global _in_flight
    with _run_threads_lock:
        _in_flight += delta


def _run_executor() -> ThreadPoolExecutor:
    """This process's run threads. Reused rather than one started per run: a thread's
    start and end cost ~0.35 ms of worker CPU per run, DSPy's own time for a short
    answer being ~2 ms."""
    global _run_threads
    if _run_threads is None:
        with _run_threads_lock:
            if _run_threads is None:
                _run_threads = ThreadPoolExecutor(RUN_THREADS_MAX, thread_name_prefix="dspex-run")
    return _run_threads


def _forget_run_threads() -> None:
    # A prefork child inherits the parent's executor and watchdog but none of their threads.
    global _run_threads, _in_flight, _run_threads_lock, _watchdog
    _run_threads, _in_flight, _run_threads_lock = None, 0, threading.Lock()
    _watchdog = Watchdog(STOP_POLL_S)


os.register_at_fork(after_in_child=_forget_run_threads)


class BackendRecords(Protocol):
    """A running task's records in Celery's result backend that the store writes in the
    round trips it makes anyway (``resultbackend.TaskRecords``)."""

    def started(self) -> ResultRecord:
        """The STARTED record, for the claim."""

    def succeeded(self, result: Any) -> ResultRecord:
        """The SUCCESS record of ``result``, for the finish record."""

    def mark_succeeded(self) -> None:
        """The finish record's round trip wrote it."""


def run_bounded(
    fn: Callable[[], T],
    timeout_s: float,
    should_stop: Callable[[], bool] | None = None,
    context: RunContext | None = None,
    stop: abandon.RunStop | None = None,
    *,
    inline: bool = False,
) -> T:
    """``fn()`` as one run: bound to a stop switch, given at most ``timeout_s``.

    Celery's threads pool enforces no time limit (it has no way to stop a thread), so a
    run that outlives its budget is abandoned instead: the caller gets
    :class:`TaskTimeout` at once and its pool thread serves the next task, while the
    abandoned thread ends at its LM call's own timeout (``timeout_s`` of the profile,
    capped by the soft limit) and its result is dropped.

    ``stop``: the run's switch, when the caller shares it with an LM (``TrafficLM.carrying``).

    The same mechanism cancels: ``should_stop`` is asked every ``STOP_POLL_S`` while
    ``fn`` runs; when it says yes the run is abandoned at once (its LM call is not
    waited for: its request's socket is shut down) and no further LM call of it starts
    (``lm/abandon.py``).

    ``inline``: ``fn`` runs in the caller's thread, for a run whose only waits are LM
    calls that a stop shuts down (``abandon.shuts_down``) and stoppable pauses: the
    process's watchdog stops it at the deadline or on a cancel, and its own code unwinds
    at once (``watchdog.py``). Otherwise ``fn`` runs in a run thread the caller waits on,
    which bounds the caller whatever ``fn`` does (a tool of a ReAct run, an in-process
    model).

    Raises:
        TaskTimeout: ``fn`` did not finish in ``timeout_s``.
        RunCancelled: ``should_stop`` said so first.
    """
    stop = stop or abandon.RunStop()
    if inline:
        return _run_inline(fn, timeout_s, should_stop, context, stop)
    done = threading.Event()
    outcome: list[tuple[bool, Any]] = []

    def target() -> None:
        outcome.append(_as_run(fn, stop, context))
        done.set()

    # In a context of its own, as in a thread of its own: nothing a run sets in context
    # variables (DSPy's settings overrides) reaches the next run of the same thread.
    _run_executor().submit(contextvars.Context().run, target)
    deadline = time.monotonic() + max(0.0, timeout_s)
    while True:
        left = deadline - time.monotonic()
        if done.wait(max(0.0, min(left, STOP_POLL_S) if should_stop else left)):
            break
        if should_stop is not None and should_stop():
            stop.stop()
            raise _stopped(CANCELLED, timeout_s)
        if time.monotonic() >= deadline:
            stop.stop()
            raise _stopped(TIMED_OUT, timeout_s)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def _as_run(
    fn: Callable[[], T], stop: abandon.RunStop, context: RunContext | None
) -> tuple[bool, Any]:
    """(True, ``fn()``) or (False, what it raised), run with the run's switch and
    context bound to this thread, and nothing of them left on it after."""
    _count_in_flight(1)
    abandon.bind(stop)
    set_current_run(context)
    try:
        return True, fn()
    except BaseException as e:
        return False, e
    finally:
        stop.release()  # this thread's LM work is over: close what a stop shut down
        abandon.bind(None)
        set_current_run(None)
        _count_in_flight(-1)


def _run_inline(
    fn: Callable[[], T],
    timeout_s: float,
    should_stop: Callable[[], bool] | None,
    context: RunContext | None,
    stop: abandon.RunStop,
) -> T:
    watch = _watchdog.watch(stop, time.monotonic() + max(0.0, timeout_s), should_stop)
    try:
        # A context of its own, as in a run thread: the pool thread keeps nothing.
        ok, value = contextvars.Context().run(_as_run, fn, stop, context)
    finally:
        reason = _watchdog.unwatch(watch)
    if reason is not None:  # whatever fn made of its stopped LM call
        raise _stopped(reason, timeout_s) from None
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def _stopped(reason: str, timeout_s: float) -> DspexError:
    if reason == CANCELLED:
        return RunCancelled("the run was cancelled while it ran; it was stopped")
    return TaskTimeout(
        f"the run did not finish within the task's soft time limit ({timeout_s:.1f} s "
        "left when it started); it was abandoned",
        {"timeout_s": round(timeout_s, 3)},
    )


def runs_inline(spec: Mapping[str, Any], lm: Any) -> bool:
    """Whether a run of ``spec`` on ``lm`` can work in its task's own thread
    (``run_bounded(inline=True)``): a stop cuts every wait of it short. Not a ReAct
    run (its tools are code a stop cannot cut short), nor an LM whose requests a stop
    cannot shut down (an in-process model; a call DSPy routes through LiteLLM)."""
    return spec["module"] != "react" and abandon.shuts_down(lm)


def _wants_stream(options: Any) -> bool:
    return isinstance(options, Mapping) and options.get("stream") is True


def _size_check(what: str, raw: bytes, limit: int) -> None:
    if len(raw) > limit:
        raise PayloadTooLarge(
            f"{what} is {len(raw)} bytes, over the limit of {limit}",
            {"size_bytes": len(raw), "limit_bytes": limit},
        )


class Runtime:
    """Everything a worker process needs to run tasks."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: SessionStore | None = None,
        lms: LMRegistry | None = None,
    ) -> None:
        configure_dspy_once()
        self.settings = settings
        self.store = store or SessionStore.from_settings(settings)
        self.lms = lms or LMRegistry(
            settings.lm_profiles,
            max_timeout_s=settings.task_soft_time_limit_s,
            traffic=LMTraffic(self.store.redis, self.store.keys),
        )
        self.modules = ModuleCache()
        self._specs: LRU[tuple[str, str], DigestedSpec] = LRU(_MAX_CACHED_SPECS)
        self.claims = ClaimRenewer(
            self.store, settings.claim_lease_s, settings.task_time_limit_s + 30
        )
        load_tool_modules(settings.tool_modules)
        load_metric_modules(settings.metric_modules)
        try:  # producers check a compile's metric name against this set
            self.store.register_metrics(registered_metrics())
        except DspexError as e:
            log.warning("cannot publish this worker's metric names: %s", e)

    def spec_for(self, module: str, signature: Any) -> dict[str, Any]:
        """The normalized spec of a ``module`` task on ``signature`` (read-only).

        Producers send the same few signature strings over and over: the normalized spec
        and its module-cache digest are kept per (module, signature text) in a small
        LRU, so a task neither re-parses the signature nor re-hashes the spec.
        """
        if not isinstance(signature, str):
            return normalize_spec({"module": module, "signature": signature})
        key = (module, signature)
        spec = self._specs.get(key)
        if spec is None:
            spec = DigestedSpec(normalize_spec({"module": module, "signature": signature}))
            self._specs.put(key, spec)
        return spec

    def run(
        self,
        task_id: str | None,
        session_id: str,
        spec: Mapping[str, Any] | None,
        inputs: Any,
        options: Any = None,
        *,
        program_id: str | None = None,
        attempt: int = 0,
        forget_sent: bool = False,
        should_stop: Callable[[], bool] | None = None,
        run: RunTicket | None = None,
        records: BackendRecords | None = None,
    ) -> dict[str, Any]:
        """Run one program for a session; returns the task's JSON result.

        Exactly one of ``spec`` (Predict / ChainOfThought) or ``program_id`` is given.
        ``forget_sent``: a task that returns has also left the task ledger
        (``store/ledger.py``), in the round trip that records it finished when it wrote
        no variables.

        A delivery that finds another delivery of the same task running (the broker
        handed the message out again after its visibility timeout) waits until that one
        finishes (and answers its result) or its claim lapses because its worker died
        (and runs the task itself).

        ``run``: the task is that run; it starts in the round trip that claims the task
        and, if the task writes no variables, ends in the one that records its result.
        ``records``: the task's STARTED and SUCCESS records in Celery's result backend,
        written by the round trips that claim the task and record its end.

        Raises:
            RunHeld: ``run`` may not go now (``decision`` says why); nothing ran.
            DuplicateDelivery: another delivery of ``task_id`` still held a live claim
                after waiting as long as a task may run; the caller drops this one.
        """
        if task_id is not None and _STREAM.get() is None and _wants_stream(options):
            return self._run_streamed(
                task_id,
                session_id,
                spec,
                inputs,
                options,
                program_id,
                attempt,
                forget_sent,
                should_stop,
                run,
                records,
            )
        started = time.perf_counter()
        self.precheck(spec, inputs, options)
        try:
            ctx = self._claim(task_id, session_id, program_id, attempt, run, records)
        except DuplicateDelivery as e:
            if e.details.get("state") != "done":
                raise
            log.info("task %s was delivered again after it finished; answering its result", task_id)
            first: dict[str, Any] = orjson.loads(e.details["result"])
            if forget_sent and task_id is not None:
                self.store.forget_sent(task_id)
            return first
        if task_id is not None:
            self.claims.hold(session_id, task_id, attempt)
        try:
            # The soft limit counts from the claim: time spent waiting for a dead
            # delivery's claim to lapse is not the LM's to lose.
            return self._run_claimed(
                task_id,
                ctx,
                spec,
                inputs,
                options,
                started,
                forget_sent,
                time.perf_counter(),
                should_stop,
                run,
                records,
            )
        except BaseException:
            if task_id is not None:
                with contextlib.suppress(DspexError):
                    self.store.release_task(session_id, task_id)
            raise
        finally:
            if task_id is not None:
                self.claims.drop(session_id, task_id)

    def precheck(self, spec: Mapping[str, Any] | None, inputs: Any, options: Any) -> None:
        """The checks that need no Redis: size, inputs and options against the signature.

        Raises:
            PayloadTooLarge, InvalidInputs.
        """
        _size_check("inputs", inputs_json(inputs), self.settings.max_inputs_bytes)
        if spec is not None:
            check_inputs(spec["signature"], inputs)
            check_options(options, spec["signature"])

    def _claim(
        self,
        task_id: str | None,
        session_id: str,
        program_id: str | None,
        attempt: int,
        run: RunTicket | None,
        records: BackendRecords | None,
    ) -> TaskContext:
        """begin_task, waiting while another delivery of the task holds a live claim."""
        # Longest a live claim can last: renewed up to the hold limit, then one lease.
        deadline = time.monotonic() + self.claims.max_hold_s + self.claims.lease_s
        waited = False
        started = records.started() if records is not None else None
        while True:
            try:
                return self.store.begin_task(
                    session_id,
                    task_id=task_id,
                    attempt=attempt,
                    lease_s=self.claims.lease_s,
                    program_id=program_id,
                    variables=list(SAFE_LM_PARAMS),
                    run=run,
                    started=started,
                )
            except DuplicateDelivery as e:
                if e.details.get("state") == "done" or time.monotonic() >= deadline:
                    raise
                if not waited:
                    log.info("task %s is running elsewhere; waiting for it", task_id)
                    waited = True
                time.sleep(_CLAIM_POLL_S)

    def _run_claimed(
        self,
        task_id: str | None,
        ctx: TaskContext,
        spec: Mapping[str, Any] | None,
        inputs: Any,
        options: Any,
        started: float,
        forget_sent: bool,
        budget_from: float,
        should_stop: Callable[[], bool] | None = None,
        run: RunTicket | None = None,
        records: BackendRecords | None = None,
    ) -> dict[str, Any]:
        if spec is None:
            # Checked again: a producer can write a program around store_program's
            # validation (raw Redis); a bad one must fail as invalid_program.
            assert ctx.program is not None
            spec = normalize_spec(ctx.program)
        inputs = check_inputs(spec["signature"], inputs)
        outputs_map = check_options(options, spec["signature"])
        check_budget(ctx.session)
        lm = self.lms.resolve(ctx.session.lm, bound_params(ctx.variables))
        module = self.modules.get(spec, build_module)
        # The soft limit counts from the claim; the LM work gets what is left.
        left_s = self.settings.task_soft_time_limit_s - (time.perf_counter() - budget_from)
        run_context = RunContext(ctx.session.id, task_id, self.store)
        writer = _STREAM.get()
        used = RunUsage(ctx.session.id)
        try:
            if isinstance(writer, RunStreamWriter):
                streaming = writer
                streaming.str_fields = streamed_fields(spec)
                prediction, usage = run_bounded(
                    lambda: counted(
                        used,
                        lambda: run_streamed(
                            lambda extra: run_module(module, lm, inputs, extra),
                            module,
                            streaming,
                        ),
                    ),
                    left_s,
                    should_stop,
                    run_context,
                )
            else:
                prediction, usage = run_bounded(
                    lambda: counted(used, lambda: run_module(module, lm, inputs)),
                    left_s,
                    should_stop,
                    run_context,
                    inline=runs_inline(spec, lm),
                )
            outputs = outputs_to_json(prediction, spec)
            sid = ctx.session.id
            result = {
                "session_id": sid,
                "outputs": outputs,
                "lm": {"model": getattr(lm, "model", "unknown"), "usage": usage},
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            }
            if used.cache_on:
                result["lm"] = {**result["lm"], "cached": used.all_cached}  # type: ignore[dict-item]
            try:
                encoded = orjson.dumps(result)  # once: for the size check and the task record
            except orjson.JSONEncodeError as e:  # e.g. a lone surrogate in the LM's answer
                raise LMError(f"the LM's answer cannot be encoded as JSON: {e}") from None
            _size_check("result", encoded, self.settings.max_result_bytes)
        except BaseException:
            self.record_usage(used)
            raise
        # A task that records its end with finish_task adds its usage in that round trip.
        usage_later = not outputs_map and task_id is not None and bool(used.calls)
        if not usage_later:
            self.record_usage(used)
        if outputs_map:
            values = {var: outputs[field] for field, var in outputs_map.items()}
            try:
                self.store.update_variables(
                    sid, values, atomic=True, task_id=task_id, task_result=encoded
                )
            except DuplicateDelivery as e:
                # Another delivery of this task wrote first: answer with its result.
                result = orjson.loads(e.details["result"])
            if forget_sent and task_id is not None:
                self.store.forget_sent(task_id)
        elif task_id is not None:
            # Let a later delivery of this message answer this result instead of rerunning.
            earlier = self.store.finish_task(
                sid,
                task_id,
                encoded,
                forget_sent=forget_sent,
                run=run,
                usage=used.as_dict() if usage_later else None,
                succeeded=records.succeeded(result) if records is not None else None,
            )
            if earlier is not None:
                return earlier
            if records is not None:
                records.mark_succeeded()
        return result

    def record_usage(self, used: RunUsage) -> None:
        """Add a run's LM usage to its session (one round trip; none without LM calls)."""
        if not used.calls or used.session_id is None:
            return
        try:
            self.store.add_usage(used.session_id, used.as_dict())
        except DspexError as e:
            log.warning("cannot record the LM usage of session %s: %s", used.session_id, e)

    def refuse_stream(
        self,
        task_id: str,
        session_id: str,
        options: Any,
        error: DspexError,
        *,
        retry: bool = False,
    ) -> DspexError:
        """``error``, after ending the stream of a streamed run refused before it ran
        (bad input, rejected, cancelled while queued) with it: its reader gets ``error``
        as the last event rather than a stream that never was (a retryable error that
        will be retried leaves a ``status`` ``retry`` instead)."""
        if _wants_stream(options):
            writer = RunStreamWriter(
                self.store,
                session_id,
                task_id,
                running_keep_s=self.settings.stream_keep_s,
                keep_s=self.settings.stream_keep_s,
            )
            with contextlib.suppress(DspexError):
                if not self.store.run_stream_ended(session_id, task_id):
                    writer.close(stream_failed(error, retry=retry))
        return error

    def _run_streamed(
        self,
        task_id: str,
        session_id: str,
        spec: Mapping[str, Any] | None,
        inputs: Any,
        options: Any,
        program_id: str | None,
        attempt: int,
        forget_sent: bool,
        should_stop: Callable[[], bool] | None,
        run: RunTicket | None,
        records: BackendRecords | None,
    ) -> dict[str, Any]:
        """:meth:`run` for ``options={"stream": True}``: events go to the run's stream,
        ending with ``done`` (the result) or ``error`` (its code), always last.

        A delivery or retry that finds the stream already ended runs unstreamed. A
        retryable error before any token leaves the stream open for the retry (a
        ``status`` event ``retry``); once tokens went out, it ends the stream.
        """
        writer = RunStreamWriter(
            self.store,
            session_id,
            task_id,
            running_keep_s=self.settings.task_time_limit_s + self.settings.stream_keep_s,
            keep_s=self.settings.stream_keep_s,
        )
        ended = self.store.run_stream_ended(session_id, task_id)
        token = _STREAM.set(False if ended else writer)
        try:
            # Every argument of run() goes through (a new one too).
            result = self.run(
                task_id,
                session_id,
                spec,
                inputs,
                options,
                program_id=program_id,
                attempt=attempt,
                forget_sent=forget_sent,
                should_stop=should_stop,
                run=run,
                records=records,
            )
        except (DuplicateDelivery, RunHeld):
            # Another delivery of this run owns its stream / the run did not start here:
            # a parked one streams when its turn comes, a refused one is ended by the
            # caller (refuse_stream).
            raise
        except BaseException as e:
            if not ended:
                retry = attempt < self.settings.task_max_retries and not writer.streamed
                with contextlib.suppress(DspexError):
                    writer.close(stream_failed(e, retry=retry))
            raise
        finally:
            _STREAM.reset(token)
        if not ended:
            writer.finish_fields(result["outputs"])
            with contextlib.suppress(DspexError):  # the result stands even so
                writer.close([("done", result)])
        return result

    def expire_sessions(self) -> dict[str, Any]:
        started = time.perf_counter()
        expired = self.store.expire_sessions()
        return {"expired": expired, "duration_ms": round((time.perf_counter() - started) * 1000, 3)}
