"""The Celery tasks: thin, like web views. Names are a wire contract (DESIGN.md §4).

Arguments are bound here by hand rather than by Celery so that a foreign producer's
wrong arity becomes ``invalid_inputs`` with a readable message, not a bare TypeError.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.exceptions import Ignore

from dspex_tasks.app import COT_TASK, EXPIRE_TASK, PREDICT_TASK, RUN_PROGRAM_TASK
from dspex_tasks.errors import RETRYABLE_ERRORS, DuplicateDelivery, InvalidInputs
from dspex_tasks.runner import Runtime

__all__ = ["register_tasks"]


def _bind(shape: Callable[..., None], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        return inspect.signature(shape).bind(*args, **kwargs).arguments
    except TypeError as e:
        raise InvalidInputs(f"bad task arguments: {e}") from None


def _lm_args(session_id: Any, signature: Any, inputs: Any, options: Any = None) -> None: ...
def _program_args(session_id: Any, program_id: Any, inputs: Any, options: Any = None) -> None: ...
def _no_args() -> None: ...


def register_tasks(app: Celery, runtime: Callable[[], Runtime]) -> None:
    """Define the dspex tasks on ``app``; ``runtime`` returns the process's Runtime."""
    settings = app.dspex_settings
    retry = {
        "autoretry_for": RETRYABLE_ERRORS,
        "retry_backoff": 1,
        "retry_backoff_max": 60,
        "retry_jitter": True,
        "max_retries": settings.task_max_retries,
    }

    def run(task: Any, spec: dict[str, Any] | None, a: dict[str, Any], pid: Any) -> Any:
        try:
            return runtime().run(
                task.request.id,
                a["session_id"],
                spec,
                a["inputs"],
                a.get("options"),
                program_id=pid,
                attempt=task.request.retries or 0,
            )
        except DuplicateDelivery:
            # Another delivery of this very task is running: this copy does nothing and
            # leaves the task's state to that one.
            raise Ignore() from None

    # shared=False: a shared task would also be added to every Celery app finalized later
    # in this process, bound to *this* runtime, so a second app's worker would run the
    # first app's runtime (its store, prefix and LMs) under the dspex.* names.
    @app.task(name=PREDICT_TASK, bind=True, shared=False, **retry)  # type: ignore[untyped-decorator]
    def predict(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        a = _bind(_lm_args, args, kwargs)
        return run(self, runtime().spec_for("predict", a["signature"]), a, None)  # type: ignore[no-any-return]

    @app.task(name=COT_TASK, bind=True, shared=False, **retry)  # type: ignore[untyped-decorator]
    def chain_of_thought(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        a = _bind(_lm_args, args, kwargs)
        spec = runtime().spec_for("chain_of_thought", a["signature"])
        return run(self, spec, a, None)  # type: ignore[no-any-return]

    @app.task(name=RUN_PROGRAM_TASK, bind=True, shared=False, **retry)  # type: ignore[untyped-decorator]
    def run_program(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        a = _bind(_program_args, args, kwargs)
        return run(self, None, a, a["program_id"])  # type: ignore[no-any-return]

    @app.task(name=EXPIRE_TASK, bind=True, shared=False, **retry)  # type: ignore[untyped-decorator]
    def expire_sessions(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        _bind(_no_args, args, kwargs)
        return runtime().expire_sessions()


def lazy_runtime(factory: Callable[[], Runtime]) -> Callable[[], Runtime]:
    """A thread-safe, build-once accessor for the process's Runtime."""
    lock = threading.Lock()
    holder: list[Runtime] = []

    def get() -> Runtime:
        if not holder:
            with lock:
                if not holder:
                    holder.append(factory())
        return holder[0]

    return get
