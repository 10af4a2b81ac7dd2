"""Beat entry point: ``celery -A workers.beat beat`` (or ``dspex-tasks beat``).

Beat only schedules ``dspex.expire_sessions`` on the maintenance queue; it never imports
DSPy. Run exactly one beat per deployment (a second one only doubles harmless sweeps).
"""

from __future__ import annotations

from dspex_tasks.app import make_celery
from dspex_tasks.settings import Settings

settings = Settings.from_env()
app = make_celery(settings)
