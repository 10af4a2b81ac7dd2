"""Worker entry point: ``celery -A workers.worker worker`` (or ``dspex-tasks worker``).

Settings come from ``DSPEX_*``; DSPy is configured once per process, when its Runtime is
built (at process start, so prefork children each build their own after the fork).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_process_init, worker_ready

from dspex_tasks.app import make_celery
from dspex_tasks.lm import keep_litellm_offline
from dspex_tasks.runtime import Runtime
from dspex_tasks.settings import Settings
from dspex_tasks.store import SessionStore
from dspex_tasks.tasks import lazy_runtime, register_tasks
from workers import (
    fix_ack_per_message,
    fix_broker_reconnect_crash,
    fix_client_per_command,
    fix_event_flush_per_event,
    fix_result_repr,
    heartbeat,
    outcomes,
)

keep_litellm_offline()  # before any LM is built; prefork children inherit it
fix_broker_reconnect_crash.install()  # before any broker connection exists
fix_ack_per_message.install()  # after it: a closed transport's ack keeps its guard
fix_client_per_command.install()
fix_result_repr.install()
settings = Settings.from_env()
app = make_celery(settings)
# Task events in batches of a few per broker message (see workers/fix_event_flush_per_event.py).
app.conf.worker_consumer = fix_event_flush_per_event.CONSUMER
runtime = lazy_runtime(lambda: Runtime(settings))
register_tasks(app, runtime)
# The liveness probe reads the heartbeat file; it must be hooked up before the worker
# builds its heartbeat service, i.e. at import.
heartbeat.install(app)
outcomes.install(app, SessionStore.from_settings(settings))
log = logging.getLogger("dspex_tasks.worker")


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _init_child(**_: Any) -> None:
    runtime()


@worker_ready.connect  # type: ignore[untyped-decorator]
def _ready(**_: Any) -> None:
    rt = runtime()
    log.info("dspex worker ready; LM profiles: %s", ", ".join(rt.lms.profile_names))
