"""dspex-tasks: run DSPy programs as Celery tasks over a Redis-backed SessionStore."""

from __future__ import annotations

from dspex_tasks.client import Client, SessionHandle, TaskHandle
from dspex_tasks.errors import DspexError
from dspex_tasks.settings import Settings
from dspex_tasks.store import Session, SessionStore, Variable
from dspex_tasks.types import register_type

__all__ = [
    "Client",
    "DspexError",
    "Session",
    "SessionHandle",
    "SessionStore",
    "Settings",
    "TaskHandle",
    "Variable",
    "register_type",
]
__version__ = "0.1.0"
