"""Stops runs that work in their caller's thread at their deadline, or when they are
asked to stop, from one daemon thread per worker process.

A run whose only waits are HTTP LM calls and stoppable pauses (``lm/abandon.py``) needs
no thread of its own to be bounded: stopping its :class:`~dspex_tasks.lm.abandon.RunStop`
shuts down the request in flight and refuses the next call, so its own code unwinds at
once. ``run_bounded(inline=True)`` (``runtime.py``) runs such a run in the pool thread
that took its task and leaves the watching to this module. That spares every task the
hand-off to a run thread and back: two waits for the GIL behind the pool's other
threads, which cost an LM-bound worker ~4 % of its throughput at 64 threads.

The cancel polls of all watched runs are asked in one round trip per store
(:meth:`~dspex_tasks.store.runs.RunsMixin.stops_requested`) every ``poll_s``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from dspex_tasks.lm.abandon import RunStop
from dspex_tasks.store.runs import StopPoll

__all__ = ["CANCELLED", "TIMED_OUT", "Watch", "Watchdog"]

log = logging.getLogger(__name__)

#: Why a watched run was stopped.
TIMED_OUT = "timed_out"
CANCELLED = "cancelled"


class Watch:
    """One watched run: its stop switch, its deadline (``time.monotonic()``) and the
    check that says whether it was asked to stop."""

    __slots__ = ("deadline", "reason", "should_stop", "stop")

    def __init__(
        self, stop: RunStop, deadline: float, should_stop: Callable[[], bool] | None
    ) -> None:
        self.stop = stop
        self.deadline = deadline
        self.should_stop = should_stop
        #: Set, under the watchdog's lock, before the run is stopped.
        self.reason: str | None = None


class Watchdog:
    """The watcher of a process's inline runs (started on first use)."""

    def __init__(self, poll_s: float) -> None:
        self.poll_s = poll_s
        self._cond = threading.Condition()
        self._watches: set[Watch] = set()
        self._wake_at = math.inf  # when the loop wakes next, unless notified
        self._thread: threading.Thread | None = None

    def watch(
        self, stop: RunStop, deadline: float, should_stop: Callable[[], bool] | None
    ) -> Watch:
        """Watch a run until :meth:`unwatch`; stops it at ``deadline`` or once
        ``should_stop`` says so."""
        watch = Watch(stop, deadline, should_stop)
        due = deadline if should_stop is None else min(deadline, time.monotonic() + self.poll_s)
        with self._cond:
            self._watches.add(watch)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="dspex-watchdog", daemon=True
                )
                self._thread.start()
            elif due < self._wake_at:  # most runs join a loop already due within poll_s
                self._cond.notify()
        return watch

    def unwatch(self, watch: Watch) -> str | None:
        """Stop watching; why the run was stopped (``TIMED_OUT``, ``CANCELLED``) or None."""
        with self._cond:
            self._watches.discard(watch)
            return watch.reason

    def _loop(self) -> None:
        next_poll = time.monotonic() + self.poll_s
        while True:
            with self._cond:
                while True:  # scanned and waited on under one lock hold: no watch is missed
                    now = time.monotonic()
                    live = [w for w in self._watches if w.reason is None]
                    if not live:
                        self._wake_at = math.inf
                        self._cond.wait()
                        next_poll = time.monotonic() + self.poll_s
                        continue
                    wake = min(w.deadline for w in live)
                    if any(w.should_stop for w in live):
                        wake = min(wake, next_poll)
                    if wake <= now:
                        break
                    self._wake_at = wake
                    self._cond.wait(wake - now)
                self._wake_at = -math.inf  # awake: the next scan sees a new watch
                expired = [w for w in live if w.deadline <= now]
                for w in expired:
                    w.reason = TIMED_OUT
                polled: list[Watch] = []
                if now >= next_poll:
                    next_poll = now + self.poll_s
                    polled = [w for w in live if w.should_stop and w.reason is None]
            for w in expired:
                w.stop.stop()
            if polled:
                self._poll(polled)

    def _poll(self, polled: list[Watch]) -> None:
        """Ask every polled run's check; stop those that say so."""
        by_store: dict[int, list[tuple[Watch, StopPoll]]] = {}
        answers: list[tuple[Watch, bool]] = []
        for w in polled:
            check = w.should_stop
            if isinstance(check, StopPoll):
                by_store.setdefault(id(check.store), []).append((w, check))
                continue
            try:
                answers.append((w, bool(check and check())))
            except Exception as e:
                log.warning("cannot ask whether a run was cancelled: %s", e)
        for group in by_store.values():
            store = group[0][1].store
            try:
                flags = store.stops_requested([(c.session_id, c.run_id) for _, c in group])
            except Exception as e:  # Redis down: the runs go on; asked again next poll
                log.warning("cannot ask whether runs were cancelled: %s", e)
                continue
            answers.extend((w, flag) for (w, _), flag in zip(group, flags, strict=True))
        stopped = []
        with self._cond:
            for w, flag in answers:
                if flag and w.reason is None and w in self._watches:
                    w.reason = CANCELLED
                    stopped.append(w)
        for w in stopped:
            w.stop.stop()
