"""Task events sent in batches: the same events, a few per broker message instead of one.

With an event loop (the threads and prefork pools on Redis) Celery already buffers task
events (``task-received``, ``task-started``, ``task-succeeded``, ...) and sends the buffer
as one ``task.multi`` message, but it asks the loop to flush after every single event, so
nearly every buffer holds one event: three broker messages per task, each a JSON
encoding, a Redis client and a ``PUBLISH``. Profiled on an LM-bound worker at 64
concurrent tasks that was ~0.37 ms of worker CPU per task, the largest single cost after
DSPy.

:class:`BatchingConsumer` flushes at most every ``FLUSH_INTERVAL_S`` instead (and, as
before, at once when a buffer reaches Celery's limit of 24 events). Every event is still
sent, in order, with its own timestamp and clock; monitors (Flower, ``celery events``)
already read ``task.multi`` messages and see each event at most ``FLUSH_INTERVAL_S``
later. What is still buffered when the worker shuts down is flushed before its event
connection closes (Celery itself drops it).

Selected with ``app.conf.worker_consumer`` (see ``workers/worker.py``).

Upstream: Celery 5.7.0's consumer flushes the event buffer after each event (no issue
filed that we know of); its buffered events are also the subject of Celery issue #10434
and PR #10401/#10417 (events lost on a failed flush), which this module does not change.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.worker.consumer import Consumer

__all__ = ["CONSUMER", "FLUSH_INTERVAL_S", "BatchingConsumer"]

#: Longest an event waits in the buffer; short next to Flower's refresh, long next to a
#: task's events (three within a few ms of each other at the start and the end).
FLUSH_INTERVAL_S = 0.1
#: The ``worker_consumer`` setting that selects it.
CONSUMER = f"{__name__}:BatchingConsumer"

log = logging.getLogger(__name__)


class BatchingConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, flushing buffered task events on a short timer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._flush_lock = threading.Lock()
        self._flush_due = False

    def on_send_event_buffered(self) -> None:
        # Called by whichever thread sent the event (pool threads, the loop).
        if not self.hub:
            return
        with self._flush_lock:
            if self._flush_due:
                return
            self._flush_due = True
        # The timer belongs to the loop thread: schedule the flush from there. At most
        # one of these is pending (the flag), so the loop is woken once per batch.
        self.hub.call_soon(self._schedule_flush)

    def _schedule_flush(self) -> None:
        self.hub.call_later(FLUSH_INTERVAL_S, self._timed_flush)

    def _timed_flush(self) -> None:
        with self._flush_lock:
            # Cleared before flushing: an event buffered during the flush either goes
            # out with it or schedules the next one; none waits for a flush that passed.
            self._flush_due = False
        self._flush_events()

    def shutdown(self) -> None:
        try:
            self._flush_events()
        except Exception as e:  # never stand in the way of a shutdown
            log.warning("could not send the last buffered task events: %r", e)
        super().shutdown()
