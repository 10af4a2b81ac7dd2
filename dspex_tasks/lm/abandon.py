"""Stopping a run's LM work from outside its thread: no further LM call, and the HTTP
request in flight abandoned (its socket shut down, so the provider sees the client go).

``run_bounded`` (``runtime.py``) runs a run's LM work in its own thread with a
:class:`RunStop` bound to it; stopping it (a cancel, a time limit) makes every later LM
call of that thread raise ``RunCancelled`` before it starts, and shuts down the socket
of the request the thread is waiting on, so the wait ends at once instead of at the
request's timeout. ``install()`` hooks both into DSPy once per process: DSPy swallows
exceptions raised by callbacks, so the check wraps ``BaseLM.__call__``; the socket is
the one DSPy's own HTTP transport (lm15's ``StdlibTransport``) sends the request on, and
a request of a stopped run is not retried (DSPy would sleep its back-off first).

Waits of a run's own (its turn at a rate limit, another worker's answer to a shared
cache entry) are stoppable too: :func:`pause`.
"""

from __future__ import annotations

import contextlib
import importlib
import socket
import threading
import time
from typing import Any

from dspex_tasks.errors import RunCancelled

__all__ = ["RunStop", "bind", "bound", "check", "install", "pause", "shuts_down"]


class RunStop:
    """The stop switch of one run's LM work, shared by its thread and its waiter."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._conn: Any = None
        self._shut: list[Any] = []  # connections stop() shut down, for release() to close
        self._released = False  # the run's thread has ended its LM work

    @property
    def stopped(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` or until stopped; whether it was stopped."""
        return self._event.wait(seconds)

    def stop(self) -> None:
        """No further LM call; shut down the request in flight, if any."""
        self._event.set()
        # The connection is handed to release() before its socket is shut down: the
        # shutdown wakes the reader, whose thread may end and release at once, and a
        # connection handed over after that would be left to the garbage collector.
        with self._lock:
            conn, self._conn = self._conn, None
            owner_gone = self._released
            if conn is not None and not owner_gone:
                self._shut.append(conn)
        sock = getattr(conn, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if conn is not None and owner_gone:
            with contextlib.suppress(Exception):
                conn.close()

    def release(self) -> None:
        """Close the connections :meth:`stop` shut down. Called by the run's own thread
        once its LM work has ended: the transport drops a connection that failed
        mid-request without closing it, which would leave its socket to the garbage
        collector; closing it from the stopping thread while the reader still runs
        could race the reader, so a later stop() closes what it shuts down itself."""
        with self._lock:
            self._released = True
            shut, self._shut = self._shut, []
        for conn in shut:
            with contextlib.suppress(Exception):
                conn.close()

    def _in_flight(self, conn: Any) -> None:
        with self._lock:
            self._conn = conn
        if self._event.is_set():  # stopped while the request was being sent
            self.stop()

    def _done(self, conn: Any) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn = None


class _Bound(threading.local):
    stop: RunStop | None = None


_bound = _Bound()
_installed = threading.Lock()
_done = False
#: DSPy's HTTP transport is hooked: a stop shuts down the request in flight.
_tracked = False


def bind(stop: RunStop | None) -> None:
    """Make ``stop`` the switch of the LM work this thread does."""
    _bound.stop = stop


def bound() -> RunStop | None:
    """The switch bound to this thread, if any."""
    return _bound.stop


def check() -> None:
    """Raise ``RunCancelled`` if this thread's run was stopped (before an LM call)."""
    stop = _bound.stop
    if stop is not None and stop.stopped:
        raise RunCancelled("the run was stopped before its next LM call")


def pause(seconds: float) -> None:
    """``time.sleep(seconds)`` that a stop of this thread's run cuts short.

    Raises:
        RunCancelled: the run was stopped (before or during the pause).
    """
    stop = _bound.stop
    if stop is None:
        time.sleep(seconds)
    elif stop.wait(seconds):
        raise RunCancelled("the run was stopped while it waited")


def shuts_down(lm: Any) -> bool:
    """Whether stopping a run shuts down the request ``lm`` has in flight, so the run's
    own thread gets it back at once: its calls go through DSPy's HTTP transport, which
    :func:`install` hooks. False for in-process engines (their work cannot be cut
    short) and for calls DSPy routes elsewhere (LiteLLM); known once per LM object."""
    known = getattr(lm, "_dspex_shuts_down", None)
    if known is None:
        known = _tracked and _native(lm)
        with contextlib.suppress(AttributeError, TypeError):
            lm._dspex_shuts_down = known
    return bool(known)


def _native(lm: Any) -> bool:
    try:
        selection: Any = importlib.import_module("dspy.clients.backend_selection")
        return bool(selection.select_backend(lm).native)
    except Exception:  # a custom engine, or another DSPy layout
        return False


def install() -> None:
    """Hook the stop switch into DSPy's LM calls and HTTP transport (once)."""
    global _done
    with _installed:
        if _done:
            return
        _wrap_lm_calls()
        _track_requests()
        _no_retry_once_stopped()
        _done = True


def _wrap_lm_calls() -> None:
    import dspy

    original = dspy.BaseLM.__call__

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        check()
        return original(self, *args, **kwargs)

    dspy.BaseLM.__call__ = call


def _track_requests() -> None:
    global _tracked
    try:  # DSPy's vendored transport: a private module, so looked up, not imported by name
        transport: Any = importlib.import_module("dspy._vendor.lm15.transports._sync")
    except ImportError:  # another DSPy layout: calls are still abandoned, not shut down
        return
    stdlib_transport = transport.StdlibTransport
    send, make_release = stdlib_transport._send_request, stdlib_transport._make_release

    def send_request(self: Any, conn: Any, *args: Any, **kwargs: Any) -> Any:
        stop = _bound.stop
        if stop is None:
            return send(self, conn, *args, **kwargs)
        stop._in_flight(conn)  # connected already: a stop from now on shuts it down
        check()  # a stopped run sends nothing
        return send(self, conn, *args, **kwargs)

    def release_for(self: Any, conn: Any, keep_alive: bool) -> Any:
        release = make_release(self, conn, keep_alive)
        stop = _bound.stop

        def released(body_consumed: bool) -> None:
            if stop is not None:
                stop._done(conn)
            release(body_consumed)

        return released

    setattr(stdlib_transport, "_send_request", send_request)  # noqa: B010
    setattr(stdlib_transport, "_make_release", release_for)  # noqa: B010
    _tracked = True


def _no_retry_once_stopped() -> None:
    # DSPy retries a request that failed in transit after a back-off sleep (1 s, then
    # 2, 4...): a request a stop shut down would be retried, refused, and the run's
    # thread held for the sleeps.
    try:
        execution: Any = importlib.import_module("dspy.clients.execution")
        retryable = execution._retryable
    except (ImportError, AttributeError):
        return

    def not_once_stopped(*args: Any, **kwargs: Any) -> bool:
        stop = _bound.stop
        if stop is not None and stop.stopped:
            return False
        return bool(retryable(*args, **kwargs))

    execution._retryable = not_once_stopped
