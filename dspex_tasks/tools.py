"""Tools for ReAct programs: Python functions registered on the worker by name.

Producers refer to tools by name only; they can never send code or make the worker
import anything. Which modules register tools is worker configuration
(``DSPEX_TOOL_MODULES``), imported once at start-up.
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

from dspex_tasks.errors import ConfigError, ToolNotFound

__all__ = ["get_tools", "load_tool_modules", "registered_tools", "tool", "unregister_tool"]

F = TypeVar("F", bound=Callable[..., Any])
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_TOOLS: dict[str, Callable[..., Any]] = {}
_LOCK = threading.Lock()


@overload
def tool(func: F) -> F: ...
@overload
def tool(*, name: str | None = None) -> Callable[[F], F]: ...
def tool(func: F | None = None, *, name: str | None = None) -> F | Callable[[F], F]:
    """Register ``func`` as a tool (``@tool`` or ``@tool(name="search")``).

    The function's docstring and type hints are what the LM sees.
    """

    def register(f: F) -> F:
        tool_name = name or f.__name__
        if not _NAME.fullmatch(tool_name):
            raise ValueError(f"invalid tool name {tool_name!r}")
        with _LOCK:
            _TOOLS[tool_name] = f
        return f

    return register(func) if func is not None else register


def unregister_tool(name: str) -> None:
    with _LOCK:
        _TOOLS.pop(name, None)


def registered_tools() -> list[str]:
    with _LOCK:
        return sorted(_TOOLS)


def get_tools(names: Iterable[str]) -> list[Callable[..., Any]]:
    """The registered functions for ``names``. Raises ``ToolNotFound`` for any unknown."""
    with _LOCK:
        missing = [n for n in names if n not in _TOOLS]
        if missing:
            raise ToolNotFound(
                f"tool(s) not registered on this worker: {', '.join(missing)} "
                f"(registered: {', '.join(sorted(_TOOLS)) or 'none'})",
                {"tools": missing},
            )
        return [_TOOLS[n] for n in names]


def load_tool_modules(modules: Iterable[str]) -> None:
    """Import the configured tool modules (each registers its tools with ``@tool``)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"DSPEX_TOOL_MODULES: cannot import {module!r}: {e}") from e
