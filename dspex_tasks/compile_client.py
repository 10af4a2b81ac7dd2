"""The producer's half of a compile: every check a ``dspex.compile`` request passes before
it is enqueued (the worker checks again: a foreign producer skips these). Celery and
redis-py only, never DSPy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dspex_tasks.compile_request import BUILTIN_METRICS, check_request, example_fields
from dspex_tasks.errors import InvalidInputs
from dspex_tasks.store import SessionStore
from dspex_tasks.store.compile import locked

__all__ = ["compile_args"]


def compile_args(
    store: SessionStore,
    session_id: str,
    program_id: str,
    trainset: Any,
    options: Mapping[str, Any],
) -> list[Any]:
    """The task's arguments, once the request is known to be good.

    Raises:
        InvalidInputs: an unknown optimizer, option or metric; examples that do not fit
            the program's signature.
        SessionNotFound, ProgramNotFound, DatasetNotFound, PayloadTooLarge.
        OptimizationInProgress: a compile of the program is running.
    """
    checked = check_request(options)
    metric = checked["metric"]
    if metric not in BUILTIN_METRICS and not store.metric_known(metric):
        raise InvalidInputs(
            f"no worker registered metric {metric!r} (built-in: {', '.join(BUILTIN_METRICS)})",
            {"option": "metric"},
        )
    spec = store.get_program(session_id, program_id)  # also checks the session
    for what, value in (("trainset", trainset), ("valset", checked.get("valset"))):
        if value is not None:
            example_fields(store.examples(session_id, value, what), spec["signature"], what)
    lease = store.program_lease(session_id, program_id)
    if lease is not None:
        raise locked(session_id, program_id, lease["run_id"])
    train = trainset if isinstance(trainset, str) else [dict(e) for e in trainset]
    return [session_id, program_id, train, dict(options)]
