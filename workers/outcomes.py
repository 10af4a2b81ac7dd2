"""Task outcome counters in Redis, for the exporter (``dspex_task_outcomes_total`` and
``dspex_task_failures_total``).

``install(app, store)`` connects Celery's task signals in the worker and counts each
outcome, and each failure's error code, into the store's counters (``store/outcomes.py``). The hash
is shared by every worker, so the exporter reads fleet-wide totals with one ``HGETALL``
and no event receiver (Flower keeps its counts in memory, per Flower process, and loses
them on restart).

Counts are added up in the process and written every ``FLUSH_INTERVAL_S`` (one
``HINCRBY`` per field that moved, in one round trip) rather than one round trip per task:
an exporter scraped every 15-60 s sees the same totals, and an LM-bound worker saves
~0.09 ms of CPU per task. What is pending is written when the worker (or a prefork
child) shuts down; a process killed outright loses at most one interval's counts.

States: ``success``, ``failure`` (including time limits and the final failure after
retries), ``retry`` (one per retry scheduled) and ``revoked``. A failure also counts its
code: the ``DspexError`` code (``session_not_found``, ``lm_error``...) or ``unknown`` for
anything else (a bug, a time limit), written in the same batch. Counting never fails a
task: a Redis error is logged and the counts are kept for the next write.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.signals import (
    task_failure,
    task_retry,
    task_revoked,
    task_success,
    worker_process_shutdown,
    worker_shutdown,
)

from dspex_tasks.errors import DspexError
from dspex_tasks.store import SessionStore

__all__ = ["FLUSH_INTERVAL_S", "STATES", "UNKNOWN_CODE", "failure_code", "install"]

STATES = ("success", "failure", "retry", "revoked")
#: The failure code of an exception that is not a DspexError.
UNKNOWN_CODE = "unknown"
#: How often pending counts are written.
FLUSH_INTERVAL_S = 1.0

log = logging.getLogger(__name__)


class _Counts:
    """Outcome counts not yet written, and the daemon thread that writes them."""

    def __init__(self, store: SessionStore, interval_s: float) -> None:
        self.store = store
        self.interval_s = interval_s
        self._reset()

    def _reset(self) -> None:
        # Again in a forked child (prefork): the parent's thread does not exist there, and
        # its lock and pending counts are the parent's.
        self._pid = os.getpid()
        self._pending: Counter[tuple[str, str]] = Counter()
        self._codes: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False

    def add(self, outcome: tuple[str, str], code: str | None = None) -> None:
        if self._pid != os.getpid():
            self._reset()
        with self._lock:
            self._pending[outcome] += 1
            if code is not None:
                self._codes[(outcome[0], code)] += 1
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._loop, name="dspex-outcomes", daemon=True
                )
                self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()

    def flush(self) -> None:
        if self._pid != os.getpid():
            self._reset()
        with self._lock:
            batch, self._pending = self._pending, Counter()
            codes, self._codes = self._codes, Counter()
        if not batch and not codes:
            return
        try:
            self.store.add_task_outcomes(batch, codes)
            self._warned = False
        except DspexError as e:
            with self._lock:
                self._pending.update(batch)  # written with the next flush
                self._codes.update(codes)
            if not self._warned:
                log.warning("cannot write task outcome counts (kept for later): %s", e)
                self._warned = True

    def close(self) -> None:
        self._stop.set()
        self.flush()


def failure_code(exc: BaseException | None) -> str:
    """The error code a failure is counted under: a DspexError's code, else ``unknown``."""
    return exc.code if isinstance(exc, DspexError) else UNKNOWN_CODE


def install(
    app: Celery, store: SessionStore, *, interval_s: float = FLUSH_INTERVAL_S
) -> Callable[[], None]:
    """Count ``app``'s task outcomes into ``store``'s outcome counters.

    Returns:
        A function that writes what is pending and disconnects the handlers again (tests
        install and remove it).
    """
    uid = uuid.uuid4().hex
    counts = _Counts(store, interval_s)

    def count(task: Any, state: str, code: str | None = None) -> None:
        # Signals are process-wide: count only tasks of this app.
        if task is None or getattr(task, "app", None) is not app:
            return
        counts.add((task.name, state), code)

    def on_success(sender: Any = None, **_: Any) -> None:
        count(sender, "success")

    def on_failure(sender: Any = None, exception: BaseException | None = None, **_: Any) -> None:
        count(sender, "failure", failure_code(exception))

    def on_retry(sender: Any = None, **_: Any) -> None:
        count(sender, "retry")

    def on_revoked(sender: Any = None, **_: Any) -> None:
        count(sender, "revoked")

    def on_shutdown(**_: Any) -> None:
        counts.flush()

    connections = (
        (task_success, on_success),
        (task_failure, on_failure),
        (task_retry, on_retry),
        (task_revoked, on_revoked),
        (worker_shutdown, on_shutdown),
        (worker_process_shutdown, on_shutdown),
    )
    for signal, handler in connections:
        signal.connect(handler, weak=False, dispatch_uid=f"dspex-outcomes-{signal.name}-{uid}")
    atexit.register(counts.flush)

    def uninstall() -> None:
        for signal, _ in connections:
            signal.disconnect(dispatch_uid=f"dspex-outcomes-{signal.name}-{uid}")
        atexit.unregister(counts.flush)
        counts.close()

    return uninstall
