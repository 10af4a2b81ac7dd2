"""Handles on what a producer enqueued: one run (:class:`TaskHandle`: wait, stream,
cancel), a batch (:class:`BatchHandle`), and closing a producer's Celery app cleanly.

Imports Celery and redis-py only, never DSPy.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult, GroupResult
from kombu.utils.functional import lazy

from dspex_tasks import handoff
from dspex_tasks.errors import DspexError, InvalidInputs, error_from_code
from dspex_tasks.store import Run, SessionStore, StreamEvent
from dspex_tasks.store.scripts import Status
from dspex_tasks.store.streams import TERMINAL_TYPES

__all__ = ["BatchHandle", "TaskHandle", "cancel_run", "close_app"]


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
        """PENDING, STARTED, PROGRESS (a compile), RETRY, SUCCESS, FAILURE or REVOKED."""
        return str(self._result.status)

    def ready(self) -> bool:
        return bool(self._result.ready())

    @property
    def progress(self) -> dict[str, Any] | None:
        """A running compile's last progress, ``{"step", "total", "best_score"}``
        (Celery's ``PROGRESS`` state, which Flower shows), else None."""
        if self._result.state != "PROGRESS":
            return None
        info = self._result.info
        return dict(info) if isinstance(info, dict) else None

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

    def outcome(self) -> dict[str, Any] | DspexError | None:
        """Where the task stands, in one read and without waiting: its result JSON if
        it succeeded, its error if it failed (or was cancelled), None if not finished.

        Unlike :meth:`get_result`, this never subscribes to the result's channel: a
        server answering "how is run X?" many times pays one GET each.
        """
        state = self._result.state
        if state == "SUCCESS":
            return dict(self._result.result)
        if state not in ("FAILURE", "REVOKED"):
            return None
        error = self._result.result
        if isinstance(error, DspexError):
            return error
        code = getattr(error, "code", None)
        message = str(error.args[0]) if getattr(error, "args", None) else type(error).__name__
        return error_from_code(code if isinstance(code, str) else "", message)

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

    async def _finished_async(self) -> bool:
        # The backend's state is a synchronous GET (once per second of silence at most):
        # in a thread, so a server holding many streams never waits on it in its loop.
        return bool(await asyncio.to_thread(self._result.ready))

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
