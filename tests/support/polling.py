"""Polling with a deadline: wait for the real condition, never sleep a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["wait_until"]

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None],
    timeout_s: float = 10.0,
    *,
    interval: float = 0.05,
    what: str = "",
    diagnose: Callable[[], str] | None = None,
    retry_on: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    Fails with AssertionError after ``timeout_s`` seconds (naming ``what`` and adding
    ``diagnose()`` if given). Exceptions of the ``retry_on`` types count as "not yet"
    (the last one is reported on timeout); any other exception propagates.
    """
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while True:
        try:
            value = predicate()
        except retry_on as e:
            last = e
        else:
            if value:
                return value
        if time.monotonic() > deadline:
            extra = f" (last error: {last!r})" if last is not None else ""
            extra += f"\n{diagnose()}" if diagnose else ""
            name = what or getattr(predicate, "__name__", "condition")
            raise AssertionError(f"timed out after {timeout_s} s waiting for {name}{extra}")
        time.sleep(interval)


def holds_for(
    predicate: Callable[[], object], duration_s: float, *, interval: float = 0.05, what: str = ""
) -> None:
    """Assert that ``predicate`` stays truthy for ``duration_s`` seconds (an absence check:
    choose ``duration_s`` to cover the whole window in which the unwanted event would
    happen, not a part of it)."""
    deadline = time.monotonic() + duration_s
    while True:
        if not predicate():
            name = what or getattr(predicate, "__name__", "condition")
            raise AssertionError(f"{name} stopped holding within {duration_s} s")
        if time.monotonic() > deadline:
            return
        time.sleep(interval)
