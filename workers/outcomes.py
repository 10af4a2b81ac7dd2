"""Task outcome counters in Redis, for the exporter (``dspex_task_outcomes_total``).

``install(app, redis_client, keys)`` connects Celery's task signals in the worker and
counts each outcome with one ``HINCRBY`` on ``keys.task_outcomes``, field
``<task name>:<state>``. The hash is shared by every worker, so the exporter reads
fleet-wide totals with one ``HGETALL`` and no event receiver (Flower keeps its counts in
memory, per Flower process, and loses them on restart).

States: ``success``, ``failure`` (including time limits and the final failure after
retries), ``retry`` (one per retry scheduled) and ``revoked``. Counting never fails a
task: a Redis error is logged and the count is lost.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery
from celery.signals import task_failure, task_retry, task_revoked, task_success

from dspex_tasks.keys import Keys

__all__ = ["STATES", "install"]

STATES = ("success", "failure", "retry", "revoked")

log = logging.getLogger(__name__)


def install(app: Celery, redis_client: redis.Redis, keys: Keys) -> Callable[[], None]:
    """Count ``app``'s task outcomes into ``keys.task_outcomes``.

    Returns:
        A function that disconnects the handlers again (tests install and remove them).
    """
    uid = uuid.uuid4().hex

    def count(task: Any, state: str) -> None:
        # Signals are process-wide: count only tasks of this app.
        if task is None or getattr(task, "app", None) is not app:
            return
        try:
            redis_client.hincrby(keys.task_outcomes, f"{task.name}:{state}", 1)
        except redis.RedisError as e:
            log.warning("cannot count %s of %s: %s", state, getattr(task, "name", "?"), e)

    def on_success(sender: Any = None, **_: Any) -> None:
        count(sender, "success")

    def on_failure(sender: Any = None, **_: Any) -> None:
        count(sender, "failure")

    def on_retry(sender: Any = None, **_: Any) -> None:
        count(sender, "retry")

    def on_revoked(sender: Any = None, **_: Any) -> None:
        count(sender, "revoked")

    connections = (
        (task_success, on_success),
        (task_failure, on_failure),
        (task_retry, on_retry),
        (task_revoked, on_revoked),
    )
    for signal, handler in connections:
        signal.connect(handler, weak=False, dispatch_uid=f"dspex-outcomes-{signal.name}-{uid}")

    def uninstall() -> None:
        for signal, _ in connections:
            signal.disconnect(dispatch_uid=f"dspex-outcomes-{signal.name}-{uid}")

    return uninstall
