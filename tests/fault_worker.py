"""Worker entry for fault tests: ``celery -A fault_worker worker`` with ``tests/`` on
``PYTHONPATH``. It is the production worker (``workers.worker``: settings from
``DSPEX_*``, heartbeat, outcome counters) plus one test-only built-in LM engine,
``test/slow`` (see ``slow_lm.py``), so a profile ``{"model": "test/slow"}`` gives tasks
that sleep on request and log their LM calls.
"""

from __future__ import annotations

from slow_lm import MODEL, SlowEngine

from dspex_tasks.lm import BUILTIN_ENGINES

BUILTIN_ENGINES[MODEL] = lambda profile: SlowEngine()

from workers.worker import app  # noqa: E402  (the engine must be registered first)

__all__ = ["app"]
