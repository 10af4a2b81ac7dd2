"""The text of a task's result for its ``task-succeeded`` event, built by ``repr`` when
the result is small JSON data.

Celery renders every successful task's return value with its own pure-Python
``saferepr`` (for the ``task-succeeded`` event Flower shows, and the success log line),
token by token, so that an odd object cannot hang or flood the worker. For the nested
dict a dspex task returns that was ~35 us of worker CPU per task (6 % of an LM-bound
task's profile at 64 concurrent tasks, four times the glue's flat answer), where the
built-in ``repr`` takes ~3 us.

A result made of JSON types only (dicts, lists, strings, numbers, booleans, None: checked
by ``orjson``, which refuses anything else, subclasses included) whose JSON is at most
the length limit (``resultrepr_maxsize``) cannot hang or flood ``repr``, so it gets
``repr``: the same text ``saferepr`` writes, except that nesting deeper than three levels
is shown instead of cut to ``{...}``. Anything else, or longer, goes to ``saferepr`` as
before.

Upstream: Celery 5.7.0 renders every result with ``saferepr`` (no issue filed that we
know of).
"""

from __future__ import annotations

from typing import Any

import orjson
from celery.app import trace
from celery.utils.saferepr import saferepr

from dspex_tasks.resultbackend import JSON_TYPES_ONLY

__all__ = ["install", "result_repr"]


def result_repr(o: Any, maxlen: int | None = None, maxlevels: int = 3, seen: Any = None) -> str:
    """``saferepr``'s signature and text; ``repr`` for small JSON data."""
    if maxlen is not None and type(o) in (dict, list):
        try:
            size = len(orjson.dumps(o, option=JSON_TYPES_ONLY))
        except TypeError:
            size = maxlen + 1
        if size <= maxlen:
            text = repr(o)
            if len(text) <= maxlen:
                return text
    shown: str = saferepr(o, maxlen, maxlevels, seen)
    return shown


def install() -> None:
    """Make Celery's task tracer render results with :func:`result_repr` (idempotent)."""
    trace.saferepr = result_repr
