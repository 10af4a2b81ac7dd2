"""Flower's Celery app: ``celery -A workers.monitor flower`` (or ``dspex-tasks flower``).

Flower's ``/api/task/apply/<name>`` and ``/api/task/async-apply/<name>`` look the task up
in Flower's *own* app and answer 404 for a name it does not know (only ``send-task``
works by bare name). This app declares the service's task names, so every API path works,
with bodies that never run here: Flower only enqueues them, and workers run the real
tasks. It imports neither DSPy nor the worker's runtime. Routing (``dspex.expire_sessions``
to the maintenance queue) comes from ``make_celery`` like everywhere else.
"""

from __future__ import annotations

from typing import Any

from dspex_tasks.app import TASK_NAMES, make_celery
from dspex_tasks.errors import ConfigError
from dspex_tasks.settings import Settings

settings = Settings.from_env()
app = make_celery(settings)


def _declare(name: str) -> None:
    def run_elsewhere(*args: Any, **kwargs: Any) -> None:
        raise ConfigError(f"{name} runs on dspex workers (workers.worker), not in {__name__}")

    app.task(name=name)(run_elsewhere)


for _name in TASK_NAMES:
    _declare(_name)
