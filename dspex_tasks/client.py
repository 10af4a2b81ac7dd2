"""The producer API. Imports Celery and redis-py only, never DSPy.

State operations (sessions, variables, programs) go straight to the SessionStore: no
queue round trip. LM work is enqueued by task name and answered through a
:class:`TaskHandle`. Everything a producer can get wrong (unknown session, a bad
variable value, a malformed signature, inputs that do not fit it) is raised here,
before anything is enqueued.

    client = Client.from_env()
    s = client.create_session("user-42", ttl_s=3600)
    s.register_variable("temperature", "float", 0.7, constraints={"min": 0, "max": 2})
    h = s.chain_of_thought("question -> answer", question="Why is the sky blue?")
    h.get(timeout=60)     # {"reasoning": ..., "answer": ...}
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult, GroupResult
from kombu.utils.functional import lazy

from dspex_tasks import handoff
from dspex_tasks.app import COT_TASK, PREDICT_TASK, RUN_PROGRAM_TASK, make_celery
from dspex_tasks.errors import DspexError, InvalidInputs, PayloadTooLarge, RunNotFound
from dspex_tasks.settings import Settings
from dspex_tasks.specs import check_inputs, check_options, inputs_json, normalize_spec
from dspex_tasks.store import (
    Event,
    Run,
    Session,
    SessionStore,
    StreamEvent,
    Variable,
    VariableVersion,
)
from dspex_tasks.store.scripts import Status
from dspex_tasks.store.streams import TERMINAL_TYPES

__all__ = ["BatchHandle", "Client", "SessionHandle", "StreamEvent", "TaskHandle", "close_app"]

_MISSING: Any = object()
_TASK_BY_KIND = {"predict": PREDICT_TASK, "chain_of_thought": COT_TASK}


def close_app(app: Celery) -> None:
    """Close a producer app without leaving sockets for the garbage collector.

    ``Celery.close()`` (5.6/5.7) only forgets the app's broker pool: the result
    backend's pub/sub subscriber and its Redis pool, and the pooled broker connections,
    stay open until the garbage collector frees them (a ``ResourceWarning`` in
    whatever code runs then). This closes them.

    kombu's broker pools are shared by every app of the process with the same broker
    (``kombu.pools.connections`` is keyed by the broker's address), so only the
    *idle* pooled connections are closed and replaced by unopened placeholders; a
    connection another app holds right now is left alone, and the pool stays usable.
    """
    backend = app.backend
    consumer = getattr(backend, "result_consumer", None)
    if consumer is not None:
        # Forget the subscriptions first: handles garbage-collected after close
        # would otherwise reconnect just to unsubscribe, leaking a socket.
        consumer.subscribed_to.clear()
        consumer.stop()
    # The backend's Redis client is a cached property: do not create one just to close it.
    client = vars(backend).get("client")
    if client is not None:
        client.connection_pool.disconnect()
    amqp = app.__dict__.get("amqp")
    producers = getattr(amqp, "_producer_pool", None)
    for pool in (producers and producers.connections, app._pool):
        if pool is not None:
            _close_idle_connections(pool)
    app.close()


def _close_idle_connections(pool: Any) -> None:
    """Close the pooled connections nobody holds; refill with unopened placeholders."""
    queue = pool._resource  # kombu Resource: a LifoQueue of connections and placeholders
    with queue.mutex:
        idle = [c for c in queue.queue if not isinstance(c, lazy)]
        queue.queue[:] = [c for c in queue.queue if isinstance(c, lazy)]
    for connection in idle:
        with contextlib.suppress(Exception):
            pool.close_resource(connection)
    pool.setup()


class TaskHandle:
    """An enqueued task: poll it, wait for it (sync or ``await``), or revoke it."""

    def __init__(
        self,
        result: AsyncResult,
        *,
        store: SessionStore | None = None,
        session_id: str | None = None,
    ) -> None:
        self._result = result
        #: Where the run's stream lives (``options={"stream": True}``): see :meth:`stream`.
        self._store = store
        self.session_id = session_id

    @property
    def id(self) -> str:
        return str(self._result.id)

    @property
    def status(self) -> str:
        """PENDING, STARTED, RETRY, SUCCESS, FAILURE or REVOKED."""
        return str(self._result.status)

    def ready(self) -> bool:
        return bool(self._result.ready())

    def get_result(self, timeout: float | None = None) -> dict[str, Any]:
        """The whole result JSON: ``{"session_id", "outputs", "lm", "duration_ms"}``.

        Raises:
            DspexError: the worker's error, same class and code.
            TimeoutError: no result within ``timeout`` seconds.
        """
        try:
            value = self._result.get(timeout=timeout, propagate=True)
        except CeleryTimeout:
            raise TimeoutError(f"task {self.id} did not finish within {timeout} s") from None
        return dict(value)

    def get(self, timeout: float | None = None) -> dict[str, Any]:
        """The task's outputs (e.g. ``{"reasoning": ..., "answer": ...}``)."""
        return dict(self.get_result(timeout)["outputs"])

    async def wait_result(self, timeout: float | None = None) -> dict[str, Any]:
        """``await``-able :meth:`get_result` that never blocks the event loop.

        Polls the result backend (one GET per poll, backing off from 5 ms to 200 ms),
        rather than running Celery's blocking wait in a thread.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while not self._result.ready():
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"task {self.id} did not finish within {timeout} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
        return self.get_result(timeout=1)

    async def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """``await``-able :meth:`get`."""
        return dict((await self.wait_result(timeout))["outputs"])

    def stream(
        self, after: str | None = None, *, block_s: float | None = None
    ) -> Iterator[StreamEvent]:
        """The run's stream events (``options={"stream": True}``) as they come, until
        ``done`` or ``error``; resume with ``after=<the last id seen>`` (no gap, no
        duplicate). Ends after ``block_s`` with no event (None: waits for ever).

        A run that failed without ending its stream (cancelled or dropped while it was
        queued, so no worker ever ran it; a worker lost mid-run) ends with an ``error``
        event made from its result, whose id is the last event's (or ``0-0``). A run
        without ``stream`` that succeeded ends with no event.
        """
        store, sid = self._stream_target()
        events = store.watch_run_stream(
            sid, self.id, after=after, block_s=block_s, finished=self._result.ready
        )
        return self._until_end(events, after)

    def _until_end(self, events: Iterator[StreamEvent], last: str | None) -> Iterator[StreamEvent]:
        for event in events:
            yield event
            if event.type in TERMINAL_TYPES:
                return
            last = event.id
        end = self._failed_event(last)
        if end is not None:
            yield end

    def astream(
        self, after: str | None = None, *, block_s: float | None = None
    ) -> AsyncIterator[StreamEvent]:
        """The asyncio twin of :meth:`stream` (never blocks the event loop)."""
        store, sid = self._stream_target()
        events = store.awatch_run_stream(
            sid, self.id, after=after, block_s=block_s, finished=self._finished_async
        )
        return self._auntil_end(events, after)

    async def _auntil_end(
        self, events: AsyncIterator[StreamEvent], last: str | None
    ) -> AsyncIterator[StreamEvent]:
        async for event in events:
            yield event
            if event.type in TERMINAL_TYPES:
                return
            last = event.id
        end = self._failed_event(last)
        if end is not None:
            yield end

    def _failed_event(self, last: str | None) -> StreamEvent | None:
        """The ``error`` event of a run that failed without writing it (None if the run
        did not fail, or is not over: the watch ended on ``block_s``)."""
        if not self._result.failed():
            return None
        error = self._result.result
        code = getattr(error, "code", None)
        message = str(error.args[0]) if getattr(error, "args", None) else type(error).__name__
        return StreamEvent(
            id=last or "0-0",
            type="error",
            data={
                "code": code if isinstance(code, str) and code else "unknown",
                "message": message,
            },
        )

    def _finished_async(self) -> bool:
        # The backend's state is a GET: cheap, once per second of silence at most.
        return bool(self._result.ready())

    def _stream_target(self) -> tuple[SessionStore, str]:
        if self._store is None or self.session_id is None:
            raise InvalidInputs(
                f"task {self.id}: a handle needs its session to stream "
                "(use client.result(task_id, session_id=...))"
            )
        return self._store, self.session_id

    def revoke(self) -> None:
        """Revoke the task: a queued task will not run (a running one is not killed)."""
        self._result.revoke()

    def cancel(self, action: str = "interrupt") -> str:
        """Stop this run: a queued one never starts, a running one stops within a second
        (its LM call abandoned). ``action="rollback"``: its store writes are undone.
        Returns ``"stopped"`` (it had not started), ``"signalled"`` (its worker stops it)
        or ``"finished"`` (it had ended: nothing to do). ``get()`` then raises
        ``RunCancelled``."""
        if self._store is None or self.session_id is None:
            raise InvalidInputs("this handle does not know its session: use client.cancel")
        return cancel_run(self._result.app, self._store, self.session_id, self.id, action)

    def run(self) -> Run:
        """The run's record: status, times, error code."""
        if self._store is None or self.session_id is None:
            raise InvalidInputs("this handle does not know its session")
        return self._store.get_run(self.session_id, self.id)

    def __repr__(self) -> str:
        return f"TaskHandle(id={self.id!r})"


class BatchHandle:
    """Many tasks submitted together (a Celery group)."""

    def __init__(self, group: GroupResult) -> None:
        self._group = group

    @property
    def ids(self) -> list[str]:
        return [str(r.id) for r in self._group.results]

    def __len__(self) -> int:
        return len(self._group.results)

    def completed_count(self) -> int:
        """Tasks finished (successfully or not)."""
        return sum(1 for r in self._group.results if r.ready())

    def ready(self) -> bool:
        return bool(self._group.ready())

    def handles(self) -> list[TaskHandle]:
        return [TaskHandle(r) for r in self._group.results]

    def results(self, timeout: float | None = None) -> list[dict[str, Any] | DspexError]:
        """Every task's result JSON, in submission order; failures as their error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[dict[str, Any] | DspexError] = []
        for handle in self.handles():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                out.append(handle.get_result(timeout=left))
            except DspexError as e:
                out.append(e)
        return out


def cancel_run(app: Celery, store: SessionStore, session_id: str, run_id: str, action: str) -> str:
    """Cancel one run and carry out what that decided (results, the next run's turn)."""
    decision = store.cancel_run(session_id, run_id, action=action)
    if decision.verdict == Status.STOPPED:
        handoff.record_stopped(app, run_id, decision.status)
    handoff.follow(app, store, decision)
    return "finished" if decision.verdict == Status.FINAL else decision.verdict


class SessionHandle:
    """One session's state and tasks. Mapping-style access reads and writes values."""

    def __init__(self, client: Client, session_id: str) -> None:
        self._client = client
        self._store = client.store
        self.id = session_id

    def __repr__(self) -> str:
        return f"SessionHandle(id={self.id!r})"

    # --- session ---------------------------------------------------------------------

    def info(self) -> Session:
        return self._store.get_session(self.id)

    def touch(self) -> Session:
        return self._store.touch(self.id)

    def delete(self) -> bool:
        return self._store.delete_session(self.id)

    def configure_lm(self, profile: str = "default", **params: Any) -> Session:
        """Choose the worker LM profile and safe params (temperature, max_tokens, ...)."""
        return self._store.set_session_lm(self.id, profile=profile, **params)

    def usage(self) -> dict[str, int]:
        """The LM usage of the session's runs: prompt_tokens, completion_tokens, calls,
        cached_calls."""
        return self._store.usage(self.id)

    def set_budget(self, max_tokens_total: int | None) -> Session:
        """A token budget for the session's runs (None: none); see ``store.set_budget``."""
        return self._store.set_budget(self.id, max_tokens_total)

    # --- variables -------------------------------------------------------------------

    def register_variable(
        self,
        name: str,
        type: str,
        value: Any,
        *,
        constraints: Mapping[str, Any] | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        history: int | None = None,
    ) -> Variable:
        return self._store.register_variable(
            self.id,
            name,
            type,
            value,
            constraints=constraints,
            description=description,
            metadata=metadata,
            history=history,
        )

    def variable(self, name: str) -> Variable:
        return self._store.get_variable(self.id, name)

    def history(self, name: str, *, limit: int | None = None) -> list[VariableVersion]:
        """The kept versions of a variable, newest first."""
        return self._store.variable_history(self.id, name, limit=limit)

    def rollback(self, name: str, version: int, *, expected_version: int | None = None) -> Variable:
        """Write the value ``name`` had at ``version`` as a new version."""
        return self._store.rollback_variable(
            self.id, name, version, expected_version=expected_version
        )

    # --- events, snapshot, restore -------------------------------------------------

    def events(
        self, *, after: str = "0", types: Collection[str] | None = None, limit: int = 100
    ) -> list[Event]:
        """The session's events after the id ``after``, oldest first."""
        return self._store.events(self.id, after=after, types=types, limit=limit)

    def watch(
        self,
        *,
        names: Collection[str] | None = None,
        types: Collection[str] | None = None,
        after: str = "$",
        block_s: float | None = None,
    ) -> Iterator[Event]:
        """Events as they happen; resume with ``after=<last id seen>``."""
        return self._store.watch(self.id, names=names, types=types, after=after, block_s=block_s)

    def awatch(
        self,
        *,
        names: Collection[str] | None = None,
        types: Collection[str] | None = None,
        after: str = "$",
        block_s: float | None = None,
    ) -> AsyncIterator[Event]:
        """The asyncio twin of :meth:`watch`."""
        return self._store.awatch(self.id, names=names, types=types, after=after, block_s=block_s)

    def snapshot(self) -> dict[str, Any]:
        """Variables, programs and LM settings as one JSON document (for :meth:`restore`)."""
        return self._store.snapshot(self.id)

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        """Back to a snapshot's state, all or nothing; versions keep growing."""
        self._store.restore(self.id, snapshot)

    def get(self, name: str, default: Any = _MISSING) -> Any:
        """A variable's value (``default`` if given and the variable does not exist)."""
        return self._store.get_value(self.id, name, default)

    def set(
        self,
        name: str,
        value: Any,
        *,
        expected_version: int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Variable:
        """Validate and write; with ``expected_version`` a compare-and-set."""
        return self._store.update_variable(
            self.id, name, value, expected_version=expected_version, metadata=metadata
        )

    def update_variables(
        self, values: Mapping[str, Any], *, atomic: bool = True
    ) -> dict[str, Variable | DspexError]:
        return self._store.update_variables(self.id, values, atomic=atomic)

    def variables(self, pattern: str = "*") -> dict[str, Variable]:
        """Variables by name, in creation order."""
        return {v.name: v for v in self._store.list_variables(self.id, pattern)}

    def delete_variable(self, name: str) -> None:
        self._store.delete_variable(self.id, name)

    def __getitem__(self, name: str) -> Any:
        return self._store.get_value(self.id, name)

    def __setitem__(self, name: str, value: Any) -> None:
        self._store.update_variable(self.id, name, value)

    def __delitem__(self, name: str) -> None:
        self._store.delete_variable(self.id, name)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return bool(self._store.get_variables(self.id, [name])[0])

    def __iter__(self) -> Iterator[str]:
        return iter(self.variables())

    def __len__(self) -> int:
        return len(self.variables())

    # --- programs --------------------------------------------------------------------

    def create_program(
        self,
        program_id: str,
        module: str,
        signature: Any,
        *,
        config: Mapping[str, Any] | None = None,
        state: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Store (or replace) a program spec in the session; returns it normalized."""
        spec = {"module": module, "signature": signature, "config": config or {}, "state": state}
        return self._store.store_program(self.id, program_id, spec)

    def program(self, program_id: str) -> dict[str, Any]:
        return self._store.get_program(self.id, program_id)

    def list_programs(self) -> list[str]:
        return self._store.list_programs(self.id)

    def delete_program(self, program_id: str) -> bool:
        return self._store.delete_program(self.id, program_id)

    # --- runs ------------------------------------------------------------------------

    def configure(self, *, multitask: str | None = None) -> Session:
        """Session-wide settings: the default ``multitask`` strategy of its runs."""
        return self._store.configure_session(self.id, multitask=multitask)

    def runs(self, *, status: str | None = None, limit: int = 100) -> list[Run]:
        """The session's runs, newest first."""
        return self._store.list_runs(self.id, status=status, limit=limit)

    # --- tasks -----------------------------------------------------------------------

    def predict(
        self, signature: Any, /, *, options: Mapping[str, Any] | None = None, **inputs: Any
    ) -> TaskHandle:
        """Enqueue ``dspex.predict``. Raises on bad input before enqueueing."""
        return self._client.submit("predict", self.id, signature, inputs, options)

    def chain_of_thought(
        self, signature: Any, /, *, options: Mapping[str, Any] | None = None, **inputs: Any
    ) -> TaskHandle:
        """Enqueue ``dspex.chain_of_thought``."""
        return self._client.submit("chain_of_thought", self.id, signature, inputs, options)

    def run_program(
        self, program_id: str, /, *, options: Mapping[str, Any] | None = None, **inputs: Any
    ) -> TaskHandle:
        """Enqueue ``dspex.run_program`` for a stored program."""
        return self._client.submit("run_program", self.id, program_id, inputs, options)


class Client:
    """Producer entry point: the store for state, the Celery app for LM work."""

    def __init__(
        self,
        redis_url: str | None = None,
        broker_url: str | None = None,
        *,
        result_backend: str | None = None,
        settings: Settings | None = None,
    ) -> None:
        overrides: dict[str, Any] = {
            k: v
            for k, v in {
                "redis_url": redis_url,
                "broker_url": broker_url,
                "result_backend": result_backend,
            }.items()
            if v
        }
        if settings is None:
            settings = Settings.from_env(**overrides)
        elif overrides:
            raise ValueError("pass either settings or URLs, not both")
        self.settings = settings
        self.store = SessionStore.from_settings(settings)
        self.app: Celery = make_celery(settings)

    @classmethod
    def from_env(cls) -> Client:
        """Configured from ``DSPEX_REDIS_URL``, ``DSPEX_BROKER_URL`` and friends."""
        return cls(settings=Settings.from_env())

    def close(self) -> None:
        """Release the store's pool, the result backend's subscriber and the broker pool."""
        self.store.close()
        close_app(self.app)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- sessions --------------------------------------------------------------------

    def create_session(
        self,
        session_id: str | None = None,
        *,
        ttl_s: float | None = None,
        metadata: Mapping[str, Any] | None = None,
        exist_ok: bool = False,
    ) -> SessionHandle:
        """Create a session (a random id when none is given)."""
        sid = session_id or f"s-{uuid.uuid4().hex}"
        self.store.create_session(sid, ttl_s=ttl_s, metadata=metadata, exist_ok=exist_ok)
        return SessionHandle(self, sid)

    def session(self, session_id: str) -> SessionHandle:
        """A handle on an existing session. Raises ``SessionNotFound``."""
        self.store.get_session(session_id)
        return SessionHandle(self, session_id)

    def delete_session(self, session_id: str) -> bool:
        return self.store.delete_session(session_id)

    def list_sessions(self) -> list[str]:
        return self.store.list_sessions()

    def stats(self) -> dict[str, Any]:
        return self.store.stats()

    # --- tasks -----------------------------------------------------------------------

    def _prepare(
        self, kind: str, session_id: str, target: Any, inputs: Any, options: Any
    ) -> tuple[str, list[Any]]:
        """Validate one task request like the worker will; returns (task name, args)."""
        size = len(inputs_json(inputs))
        if size > self.settings.max_inputs_bytes:
            raise PayloadTooLarge(
                f"inputs are {size} bytes, over the limit of {self.settings.max_inputs_bytes}",
                {"size_bytes": size, "limit_bytes": self.settings.max_inputs_bytes},
            )
        if kind == "run_program":
            spec = self.store.get_program(session_id, target)  # also checks the session
        elif kind in _TASK_BY_KIND:
            spec = normalize_spec({"module": kind, "signature": target})
            self.store.get_session(session_id)
        else:
            raise InvalidInputs(f"unknown task kind {kind!r}")
        check_inputs(spec["signature"], inputs)
        check_options(options, spec["signature"])
        args = [session_id, target, dict(inputs)]
        if options:
            args.append(dict(options))
        return _TASK_BY_KIND.get(kind, RUN_PROGRAM_TASK), args

    def submit(
        self,
        kind: str,
        session_id: str,
        target: Any,
        inputs: Mapping[str, Any],
        options: Mapping[str, Any] | None = None,
    ) -> TaskHandle:
        """Enqueue one task: ``kind`` is predict, chain_of_thought or run_program;
        ``target`` the signature (or the program id for run_program)."""
        name, args = self._prepare(kind, session_id, target, inputs, options)
        task_id = str(uuid.uuid4())
        self._record([(task_id, name, args)])
        try:
            decision = self.store.queue_run(
                session_id,
                task_id,
                name,
                {"task": name, "args": args, "kwargs": {}},
                multitask=(options or {}).get("multitask"),
            )
        except DspexError:
            self._forget([task_id])  # refused (session_busy): never sent
            raise
        handoff.follow(self.app, self.store, decision)
        handle = TaskHandle(self.app.AsyncResult(task_id), store=self.store, session_id=session_id)
        if decision.verdict == Status.PARKED:
            return handle  # published by the run ahead of it when that one ends
        try:
            self.app.send_task(name, args=args, task_id=task_id)
        except Exception:
            self._forget([task_id])  # not sent (or its reply lost): do not resend it
            raise
        return handle

    def cancel(
        self, run_id: str, action: str = "interrupt", *, session_id: str | None = None
    ) -> str:
        """Cancel a run by id (see :meth:`TaskHandle.cancel`). The session is found from
        the task ledger when not given.

        Raises:
            RunNotFound: no unfinished run with that id is known (give ``session_id``).
        """
        if session_id is None:
            message = self.store.sent_task(run_id)
            if message is None or not message.get("args"):
                raise RunNotFound(
                    f"no unfinished run {run_id!r} is recorded: pass its session_id",
                    {"run_id": run_id},
                )
            session_id = str(message["args"][0])
        return cancel_run(self.app, self.store, session_id, run_id, action)

    def _forget(self, task_ids: list[str]) -> None:
        if self.settings.task_ledger:
            with contextlib.suppress(DspexError):
                self.store.forget_sent(*task_ids)

    def _record(self, tasks: list[tuple[str, str, list[Any]]]) -> None:
        """Put tasks in the ledger before sending them, so a message the broker loses is
        sent again (``store/ledger.py``)."""
        if self.settings.task_ledger:
            self.store.record_sent(
                [(tid, name, args, {}) for tid, name, args in tasks],
                self.settings.resend_after_s,
            )

    def submit_batch(self, requests: Iterable[Mapping[str, Any]]) -> BatchHandle:
        """Enqueue many tasks at once (a Celery group); every request is validated first.

        Each request: ``{"task": "predict" | "chain_of_thought" | "run_program",
        "session_id", "signature" | "program_id", "inputs", "options"?}``.
        """
        prepared = []
        for n, req in enumerate(requests):
            kind = req.get("task", "predict")
            target = req.get("program_id") if kind == "run_program" else req.get("signature")
            try:
                prepared.append(
                    self._prepare(
                        kind,
                        req.get("session_id", ""),
                        target,
                        req.get("inputs"),
                        req.get("options"),
                    )
                )
            except DspexError as e:
                e.details.setdefault("request_index", n)
                raise
        if not prepared:
            raise InvalidInputs("submit_batch needs at least one request")
        # One producer connection for the whole batch; sending one by one was measured
        # faster than group().apply_async() on this broker.
        ids = [str(uuid.uuid4()) for _ in prepared]
        self._record([(tid, name, args) for tid, (name, args) in zip(ids, prepared, strict=True)])
        sent: set[str] = set()
        try:
            with self.app.producer_or_acquire() as producer:
                for tid, (name, args) in zip(ids, prepared, strict=True):
                    options = args[3] if len(args) > 3 else {}
                    decision = self.store.queue_run(
                        args[0],
                        tid,
                        name,
                        {"task": name, "args": args, "kwargs": {}},
                        multitask=options.get("multitask"),
                    )
                    handoff.follow(self.app, self.store, decision)
                    sent.add(tid)  # admitted: published now or by the run ahead of it
                    if decision.verdict != Status.PARKED:
                        self.app.send_task(name, args=args, producer=producer, task_id=tid)
        except Exception:
            # The rest were never admitted nor sent: do not resend them.
            self._forget([tid for tid in ids if tid not in sent])
            raise
        results = [self.app.AsyncResult(tid) for tid in ids]
        return BatchHandle(self.app.GroupResult(str(uuid.uuid4()), results))

    def result(self, task_id: str, session_id: str | None = None) -> TaskHandle:
        """A handle on a task enqueued earlier (by id; with its session, it can
        :meth:`~TaskHandle.stream`)."""
        return TaskHandle(self.app.AsyncResult(task_id), store=self.store, session_id=session_id)

    def workers(self, timeout_s: float = 1.0) -> Sequence[str]:
        """Names of the workers that answered a ping."""
        replies = self.app.control.ping(timeout=timeout_s) or []
        return sorted(name for reply in replies for name in reply)
