"""The run a worker thread is doing right now, for tools that read or write its session.

A ReAct tool (``dspex_tasks.tools``) runs inside a run; ``current_run()`` gives it that
run's session, so it can keep state there. Its writes are attributed to the run (events
carry its ``run_id``) and recorded so that a ``rollback`` (strategy or cancel) puts back
what the run replaced::

    from dspex_tasks.runcontext import current_run
    from dspex_tasks.tools import tool

    @tool
    def remember(fact: str) -> str:
        "Store a fact in the session."
        current_run().set("last_fact", fact)
        return "stored"
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dspex_tasks.errors import DspexError
from dspex_tasks.store import SessionStore, Variable

__all__ = ["RunContext", "current_run", "set_current_run"]


@dataclass(frozen=True)
class RunContext:
    """One run: its session, its id, and the store, for tools."""

    session_id: str
    run_id: str | None
    store: SessionStore

    def get(self, name: str, default: Any = None) -> Any:
        """A variable's value in the run's session (``default`` if it does not exist)."""
        return self.store.get_value(self.session_id, name, default)

    def set(self, name: str, value: Any) -> Variable:
        """Write a variable of the run's session, attributed to the run."""
        return self.update({name: value})[name]

    def update(self, values: Mapping[str, Any]) -> dict[str, Variable]:
        """Write several variables at once (all or nothing), attributed to the run."""
        written = self.store.update_variables(self.session_id, values, run_id=self.run_id)
        out: dict[str, Variable] = {}
        for name, item in written.items():
            if isinstance(item, DspexError):  # pragma: no cover - atomic writes raise
                raise item
            out[name] = item
        return out


class _Current(threading.local):
    run: RunContext | None = None


_current = _Current()


def set_current_run(context: RunContext | None) -> None:
    """Make ``context`` this thread's current run (the runtime does, around a run)."""
    _current.run = context


def current_run() -> RunContext:
    """The run this thread is doing. Raises ``RuntimeError`` outside a run."""
    if _current.run is None:
        raise RuntimeError("current_run() is only available while a run executes")
    return _current.run
