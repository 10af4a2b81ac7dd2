"""Flower configuration: ``celery -A workers.monitor flower --conf=<this file>``.

``dspex-tasks flower`` and ``dspex-tasks dev`` pass it for you. Flower (tornado) executes
this file and applies every top-level name that matches one of its options, so helpers
here start with an underscore. Precedence: command-line flags after ``flower`` win over
this file, and this file wins over ``FLOWER_*`` environment variables (Flower applies it
after them); configure through ``DSPEX_FLOWER_*`` instead.

Security:
- Basic auth is required: ``DSPEX_FLOWER_USER`` (default ``admin``) and
  ``DSPEX_FLOWER_PASSWORD``. Without a password this file refuses to start Flower, unless
  ``DSPEX_FLOWER_ALLOW_NO_AUTH=true`` (then the UI is open and Flower keeps its API
  locked with 401). ``/metrics`` and ``/healthcheck`` are never authenticated in Flower
  2.2, so bind to loopback (the default) or put a proxy in front.
- Flower shows task args, kwargs and results as sent. dspex tasks never take secrets
  (LM keys stay in the worker's environment, never in task arguments), but inputs and
  outputs are user data: ``format_task`` below truncates them in the UI.
"""

from __future__ import annotations

from typing import Any

from dspex_tasks.settings import Settings

_settings = Settings.from_env()
#: Longest args / kwargs / result text the UI shows for one task.
_MAX_SHOWN_CHARS = 300

address = _settings.flower_address
port = _settings.flower_port
# Task history lives in memory only; nothing about sessions is written to disk here.
persistent = False
# The task list shows the args (a task's first arg is its session id, so the search box
# finds a session's tasks), the result and the error; Flower's default shows neither.
tasks_columns = "name,state,args,result,exception,uuid,received,runtime,worker"

if _settings.flower_password:
    basic_auth = [f"{_settings.flower_user}:{_settings.flower_password.get()}"]
elif not _settings.flower_allow_no_auth:
    raise SystemExit(
        "flowerconfig: refusing to start Flower without a password: set "
        "DSPEX_FLOWER_PASSWORD (and optionally DSPEX_FLOWER_USER), or "
        "DSPEX_FLOWER_ALLOW_NO_AUTH=true for an open UI on a trusted interface"
    )


def format_task(task: Any) -> Any:
    """Shorten long args / kwargs / result reprs in Flower's task views (a copy is passed)."""
    for attr in ("args", "kwargs", "result"):
        value = getattr(task, attr, None)
        if isinstance(value, str) and len(value) > _MAX_SHOWN_CHARS:
            setattr(task, attr, f"{value[:_MAX_SHOWN_CHARS]}... ({len(value)} chars)")
    return task
