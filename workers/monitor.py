"""Flower's Celery app: ``celery -A workers.monitor flower`` (or ``dspex-tasks flower``).

Flower's ``/api/task/apply/<name>`` and ``/api/task/async-apply/<name>`` look the task up
in Flower's *own* app and answer 404 for a name it does not know (only ``send-task``
works by bare name). This app declares the service's task names, so every API path works,
with bodies that never run here: Flower only enqueues them, and workers run the real
tasks. It imports neither DSPy nor the worker's runtime. Routing (``dspex.expire_sessions``
to the maintenance queue) comes from ``make_celery`` like everywhere else.

A failed task's error comes back from the API as JSON (``workers/fix_flower_failure_repr.py``),
in the shape of a raw Celery result, not as a Python repr.

Tasks enqueued through Flower's API go into the task ledger (``store/ledger.py``) just
before they are published, as the Client's do: if the broker loses the message, beat
sends it again with the same id, and a worker forgets it once the task is final.
"""

from __future__ import annotations

import functools
from typing import Any

from celery.signals import before_task_publish

from dspex_tasks.app import EXPIRE_TASK, TASK_NAMES, make_celery
from dspex_tasks.errors import ConfigError
from dspex_tasks.settings import Settings
from dspex_tasks.store import SessionStore
from workers import fix_flower_failure_repr

fix_flower_failure_repr.install()

settings = Settings.from_env()
app = make_celery(settings)


def _declare(name: str) -> None:
    def run_elsewhere(*args: Any, **kwargs: Any) -> None:
        raise ConfigError(f"{name} runs on dspex workers (workers.worker), not in {__name__}")

    app.task(name=name)(run_elsewhere)


for _name in TASK_NAMES:
    _declare(_name)


@functools.cache
def _store() -> SessionStore:
    return SessionStore.from_settings(settings)


def record_in_ledger(
    sender: str | None = None,
    headers: dict[str, Any] | None = None,
    body: Any = None,
    **_: Any,
) -> None:
    """Record a service task in the ledger before Flower publishes it.

    A failure here (the store unreachable) is logged by Celery's signal dispatch and the
    task is still sent, unrecorded: refusing it would not make the broker more reliable.
    """
    if sender not in TASK_NAMES or sender == EXPIRE_TASK or not headers or not body:
        return
    args, kwargs = body[0], body[1]  # message protocol 2: (args, kwargs, embed)
    _store().record_sent([(headers["id"], sender, args, kwargs)], settings.resend_after_s)


if settings.task_ledger:
    before_task_publish.connect(record_in_ledger, weak=False)
