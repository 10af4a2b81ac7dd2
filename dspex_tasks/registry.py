"""A worker-side registry of Python functions by name (tools, metrics).

Producers name a function and never send code; which modules register functions is
worker configuration (a ``DSPEX_*_MODULES`` setting), imported once at start-up.
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from dspex_tasks.errors import ConfigError

__all__ = ["Registry"]

F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """Functions of one kind (``"tool"``, ``"metric"``), thread-safe."""

    def __init__(self, kind: str, setting: str, name_re: re.Pattern[str]) -> None:
        self.kind = kind
        self._setting = setting
        self._name_re = name_re
        self._funcs: dict[str, Callable[..., Any]] = {}
        self._lock = threading.Lock()

    def decorator(self, func: F | None, name: str | None) -> F | Callable[[F], F]:
        """What ``@tool`` / ``@tool(name=...)`` returns."""

        def register(f: F) -> F:
            registered = name or f.__name__
            if not self._name_re.fullmatch(registered):
                raise ValueError(f"invalid {self.kind} name {registered!r}")
            with self._lock:
                self._funcs[registered] = f
            return f

        return register(func) if func is not None else register

    def unregister(self, name: str) -> None:
        with self._lock:
            self._funcs.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._funcs)

    def lookup(self, names: Iterable[str]) -> tuple[list[Callable[..., Any]], list[str]]:
        """The functions registered for ``names`` and the names that are not."""
        with self._lock:
            wanted = list(names)
            return (
                [self._funcs[n] for n in wanted if n in self._funcs],
                [n for n in wanted if n not in self._funcs],
            )

    def load_modules(self, modules: Iterable[str]) -> None:
        """Import the configured modules (each registers its functions)."""
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ConfigError(f"{self._setting}: cannot import {module!r}: {e}") from e
