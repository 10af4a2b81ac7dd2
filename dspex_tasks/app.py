"""``make_celery(settings)``: the Celery app shared by producers and workers.

Producers only send tasks by name, so this module imports neither DSPy nor the tasks.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery
from celery.signals import before_task_publish
from kombu.entity import Queue

from dspex_tasks.resultbackend import use_one_trip_result_store
from dspex_tasks.settings import Settings
from dspex_tasks.store.connection import celery_connection_conf

__all__ = [
    "COMPILE_TASK",
    "EXPIRE_TASK",
    "LM_QUEUE",
    "MAINTENANCE_QUEUE",
    "SENT_AT_HEADER",
    "TASK_NAMES",
    "make_celery",
]

LM_QUEUE = "dspex"
MAINTENANCE_QUEUE = "dspex.maintenance"
PREDICT_TASK = "dspex.predict"
COT_TASK = "dspex.chain_of_thought"
RUN_PROGRAM_TASK = "dspex.run_program"
COMPILE_TASK = "dspex.compile"
EXPIRE_TASK = "dspex.expire_sessions"
TASK_NAMES = (PREDICT_TASK, COT_TASK, RUN_PROGRAM_TASK, COMPILE_TASK, EXPIRE_TASK)
#: Message header with the send time (epoch seconds): kombu messages carry none, and the
#: metrics exporter needs it for the age of the oldest waiting task.
SENT_AT_HEADER = "dspex_sent_at"


@before_task_publish.connect(weak=False, dispatch_uid="dspex-sent-at")  # type: ignore[untyped-decorator]
def _stamp_sent_at(headers: dict[str, Any] | None = None, **_: Any) -> None:
    # Stamped on every publish from this process: producers, beat, Flower and retries.
    if headers is not None:
        headers.setdefault(SENT_AT_HEADER, time.time())


def make_celery(settings: Settings, *, main: str = "dspex_tasks") -> Celery:
    """Build the Celery app: Redis broker and backend, JSON only, late acks, two queues.

    Connection options (TLS, Sentinel, transport timeouts) come from ``store/connection.py``.
    """
    app = Celery(main, broker=settings.broker_url, backend=settings.result_backend)
    use_one_trip_result_store(app)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        enable_utc=True,
        timezone="UTC",
        # Reliability: a task is acknowledged only after it ran; a killed worker's task
        # goes back to the queue; one task reserved per process slot.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        result_backend_always_retry=True,
        result_backend_max_retries=10,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        result_expires=settings.result_expires_s,
        result_extended=True,
        # Flower needs events; STARTED lets producers tell queued from running.
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        task_default_queue=LM_QUEUE,
        task_queues=(Queue(LM_QUEUE), Queue(MAINTENANCE_QUEUE)),  # type: ignore[no-untyped-call]
        task_routes={EXPIRE_TASK: {"queue": MAINTENANCE_QUEUE}},
        worker_pool=settings.worker_pool,
        worker_concurrency=settings.worker_concurrency,
        beat_schedule={
            "dspex-expire-sessions": {
                "task": EXPIRE_TASK,
                "schedule": settings.expiry_interval_s,
                # A sweep that could not start before the next one is due is dropped.
                "options": {"queue": MAINTENANCE_QUEUE, "expires": settings.expiry_interval_s},
            }
        },
    )
    app.conf.update(celery_connection_conf(settings))
    app.dspex_settings = settings
    return app
