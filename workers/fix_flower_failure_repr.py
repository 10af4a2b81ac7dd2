"""Flower's task API answers a failed task's error as JSON, not as a Python repr.

``/api/task/result/<id>`` and ``/api/task/apply/<name>`` put ``result.result`` through
``safe_result``, which answers ``repr(exc)`` for anything ``json.dumps`` refuses: an
exception always. A producer in another language then gets
``"SessionNotFound(code='session_not_found', message='...')"`` and has to parse Python.
Here an exception is answered in the shape Celery itself stores in the result backend,
so Flower and a raw result read the same way::

    {"exc_type": "SessionNotFound", "exc_module": "dspex_tasks.errors",
     "exc_message": ["no session 'user-42'",
                     {"code": "session_not_found", "details": {"session_id": "user-42"}}]}

Upstream: Flower 2.2.0's ``BaseTaskHandler.safe_result`` (``flower/api/tasks.py``) falls
back to ``repr`` by design; remove this module if Flower starts serialising exceptions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from flower.api.tasks import BaseTaskHandler

__all__ = ["exception_json", "install"]

_MARK = "_dspex_exception_json"


def exception_json(exc: BaseException) -> dict[str, Any]:
    """``exc`` as Celery's JSON result backend stores it (``exc_type``, ``exc_message``...)."""
    args: list[Any] = list(exc.args)
    try:
        json.dumps(args)
    except (TypeError, ValueError):
        args = [a if isinstance(a, (str, int, float, bool)) else repr(a) for a in args]
    cls = type(exc)
    return {"exc_type": cls.__qualname__, "exc_module": cls.__module__, "exc_message": args}


def install() -> None:
    """Patch Flower's task handlers once per process (idempotent)."""
    original: Callable[[Any, Any], Any] = BaseTaskHandler.safe_result
    if getattr(original, _MARK, False):
        return

    def safe_result(self: Any, result: Any) -> Any:
        if isinstance(result, BaseException):
            return exception_json(result)
        return original(self, result)

    setattr(safe_result, _MARK, True)
    setattr(BaseTaskHandler, "safe_result", safe_result)  # noqa: B010 (a method: mypy refuses =)
