"""LM usage and token budgets per session (DESIGN.md §11).

Counters and budget are fields of the session record (``u_prompt``, ``u_completion``,
``u_calls``, ``u_cached``, ``max_tokens_total``), so they go with the session when it is
deleted or expires, and a task reads them in the round trip that loads its context.
"""

from __future__ import annotations

from collections.abc import Mapping

from dspex_tasks.errors import BudgetExceeded, ValidationFailed
from dspex_tasks.keys import check_session_id
from dspex_tasks.store.base import StoreCore
from dspex_tasks.store.models import Session, session_from_record
from dspex_tasks.store.scripts import Status

__all__ = ["UsageMixin", "check_budget"]


def check_budget(session: Session) -> None:
    """Raise :class:`BudgetExceeded` if ``session`` spent its ``max_tokens_total``."""
    budget = session.max_tokens_total
    if budget is None:
        return
    spent = session.usage.get("prompt_tokens", 0) + session.usage.get("completion_tokens", 0)
    if spent >= budget:
        raise BudgetExceeded(
            f"session {session.id!r} spent {spent} tokens of its budget of {budget}",
            {"session_id": session.id, "max_tokens_total": budget, "spent_tokens": spent},
        )


class UsageMixin(StoreCore):
    """Per-session LM usage counters and token budget."""

    def usage(self, session_id: str) -> dict[str, int]:
        """``{prompt_tokens, completion_tokens, calls, cached_calls}`` of the session's runs
        so far (read without touching the session)."""
        sid = check_session_id(session_id)
        reply = self._session_script("GET_SESSION", sid, False)
        return dict(session_from_record(sid, reply[1]).usage)

    def add_usage(self, session_id: str, usage: Mapping[str, int]) -> Session | None:
        """Add one run's usage; None if the session is gone (nothing is recorded)."""
        sid = check_session_id(session_id)
        reply = self._script(
            "ADD_USAGE",
            self.keys.session_keys(sid),
            [
                *self._prelude_args(False),
                int(usage.get("prompt_tokens", 0)),
                int(usage.get("completion_tokens", 0)),
                int(usage.get("calls", 0)),
                int(usage.get("cached_calls", 0)),
            ],
        )
        if reply[0] != Status.OK:
            return None
        return session_from_record(sid, reply[1])

    def set_budget(self, session_id: str, max_tokens_total: int | None) -> Session:
        """A token budget (prompt + completion) for the session's runs; a run that starts
        once it is spent fails with ``budget_exceeded``. ``None`` removes the budget.
        (``configure_session(sid, max_tokens_total=...)`` does the same.)

        Raises:
            SessionNotFound, ValidationFailed.
        """
        sid = check_session_id(session_id)
        if max_tokens_total is not None and (
            isinstance(max_tokens_total, bool)
            or not isinstance(max_tokens_total, int)
            or max_tokens_total < 0
        ):
            raise ValidationFailed(
                f"max_tokens_total must be a non-negative integer or None, got "
                f"{max_tokens_total!r}",
                {"rule": "max_tokens_total"},
            )
        arg = "" if max_tokens_total is None else str(max_tokens_total)
        reply = self._session_script("SET_BUDGET", sid, True, arg)
        return session_from_record(sid, reply[1])
