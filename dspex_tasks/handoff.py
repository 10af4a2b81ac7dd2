"""Carrying out what a run decision says (``store/runs.py``), from a worker or a producer.

Only processes that hold the Celery app act on a decision: the run ahead publishes the
next parked run of its session when it ends (same task id, so its ``TaskHandle`` sees the
real result), and runs that ended before they ever started get their final result stored
(``run_cancelled``), so nobody waits on them for ever.
"""

from __future__ import annotations

import logging

from celery import Celery

from dspex_tasks.errors import RunCancelled
from dspex_tasks.store import SessionStore
from dspex_tasks.store.runs import RunDecision

__all__ = ["follow", "record_stopped"]

log = logging.getLogger(__name__)


def record_stopped(app: Celery, run_id: str, status: str | None) -> None:
    """Store ``run_cancelled`` as the result of a run that never reached a worker."""
    error = RunCancelled(
        f"run {run_id} was {status or 'cancelled'} before it started",
        {"run_id": run_id, "status": status},
    )
    app.backend.mark_as_failure(run_id, error)


def follow(app: Celery, store: SessionStore, decision: RunDecision) -> None:
    """Publish the run ``decision`` released; record the results of the runs it dropped."""
    for run_id in decision.dropped:
        record_stopped(app, run_id, None)
    if decision.release is None:
        return
    run_id, message = decision.release
    log.info("run %s: its turn came; publishing it", run_id)
    app.send_task(
        message["task"], args=message["args"], kwargs=message.get("kwargs") or {}, task_id=run_id
    )
