"""Tools for ReAct programs: Python functions registered on the worker by name.

Producers refer to tools by name only; they can never send code or make the worker
import anything. Which modules register tools is worker configuration
(``DSPEX_TOOL_MODULES``), imported once at start-up.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

from dspex_tasks.errors import ToolNotFound
from dspex_tasks.registry import Registry

__all__ = ["get_tools", "load_tool_modules", "registered_tools", "tool", "unregister_tool"]

F = TypeVar("F", bound=Callable[..., Any])
_TOOLS = Registry("tool", "DSPEX_TOOL_MODULES", re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}"))


@overload
def tool(func: F) -> F: ...
@overload
def tool(*, name: str | None = None) -> Callable[[F], F]: ...
def tool(func: F | None = None, *, name: str | None = None) -> F | Callable[[F], F]:
    """Register ``func`` as a tool (``@tool`` or ``@tool(name="search")``).

    The function's docstring and type hints are what the LM sees.
    """
    return _TOOLS.decorator(func, name)


def unregister_tool(name: str) -> None:
    _TOOLS.unregister(name)


def registered_tools() -> list[str]:
    return _TOOLS.names()


def get_tools(names: Iterable[str]) -> list[Callable[..., Any]]:
    """The registered functions for ``names``. Raises ``ToolNotFound`` for any unknown."""
    found, missing = _TOOLS.lookup(names)
    if missing:
        raise ToolNotFound(
            f"tool(s) not registered on this worker: {', '.join(missing)} "
            f"(registered: {', '.join(_TOOLS.names()) or 'none'})",
            {"tools": missing},
        )
    return found


def load_tool_modules(modules: Iterable[str]) -> None:
    """Import the configured tool modules (each registers its tools with ``@tool``)."""
    _TOOLS.load_modules(modules)
