"""SessionStore: sessions, typed variables, programs (and their versions), datasets and
expiry on Redis."""

from __future__ import annotations

from typing import Any

from dspex_tasks.errors import RunNotFound
from dspex_tasks.settings import Settings
from dspex_tasks.store.base import translate_errors
from dspex_tasks.store.compile import CompileMixin, CompileStart, ProgramVersion
from dspex_tasks.store.connection import close_client, redis_client, redis_client_for
from dspex_tasks.store.events import EventsMixin
from dspex_tasks.store.expiry import ExpiryMixin
from dspex_tasks.store.history import HistoryMixin
from dspex_tasks.store.ledger import LedgerMixin
from dspex_tasks.store.models import Event, Run, Session, Variable, VariableVersion
from dspex_tasks.store.outcomes import OutcomesMixin
from dspex_tasks.store.programs import ProgramsMixin
from dspex_tasks.store.runs import RunsMixin
from dspex_tasks.store.sessions import SessionsMixin
from dspex_tasks.store.streams import StreamEvent, StreamsMixin, check_run_id
from dspex_tasks.store.taskstate import TaskContext, TaskStateMixin
from dspex_tasks.store.usage import UsageMixin
from dspex_tasks.store.variables import VariablesMixin
from dspex_tasks.store.varwrites import VariableWritesMixin

#: ``configure_session``: leave the budget as it is.
_UNSET: Any = object()

__all__ = [
    "CompileStart",
    "Event",
    "ProgramVersion",
    "Run",
    "Session",
    "SessionStore",
    "StreamEvent",
    "TaskContext",
    "Variable",
    "VariableVersion",
    "redis_client",
    "redis_client_for",
]


class SessionStore(
    SessionsMixin,
    TaskStateMixin,
    VariableWritesMixin,
    HistoryMixin,
    VariablesMixin,
    EventsMixin,
    StreamsMixin,
    RunsMixin,
    CompileMixin,
    ProgramsMixin,
    ExpiryMixin,
    LedgerMixin,
    OutcomesMixin,
    UsageMixin,
):
    """The Redis-backed SessionStore shared by producers and workers.

    ``SessionStore(redis_client, prefix="dspex", default_ttl_s=3600)`` takes any redis-py
    client (``Redis``, a Sentinel master, ``RedisCluster``), whatever its
    ``decode_responses``.
    """

    def configure_session(
        self,
        session_id: str,
        *,
        multitask: str | None = None,
        max_tokens_total: Any = _UNSET,
    ) -> Session:
        """Session-wide settings: the default ``multitask`` strategy of its runs
        (``store/runs.py``) and a token budget, ``max_tokens_total`` (``store/usage.py``;
        ``None`` removes it). With neither, the session as it is (touched).

        Raises:
            SessionNotFound, ValidationFailed.
        """
        if max_tokens_total is _UNSET:
            return RunsMixin.configure_session(self, session_id, multitask=multitask)
        session = self.set_budget(session_id, max_tokens_total)
        if multitask is not None:
            session = RunsMixin.configure_session(self, session_id, multitask=multitask)
        return session

    def find_run_session(self, run_id: str) -> str:
        """The session of a run: from the run index (``index_run``), else from the task
        ledger (a run a Client sent that has not finished).

        Raises:
            RunNotFound: neither knows it; InvalidInputs: not a run id.
        """
        rid = check_run_id(run_id)
        with translate_errors():
            sid = self.redis.get(self.keys.run_session(rid))
        if sid is None:
            message = self.sent_task(rid)
            if message and message.get("args"):
                sid = str(message["args"][0])
        if sid is None:
            raise RunNotFound(f"no run {rid!r} is known", {"run_id": rid})
        return str(sid)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> SessionStore:
        """A store on its own connection pool to ``url``."""
        timeout = kwargs.pop("socket_timeout_s", 5.0)
        return cls(redis_client(url, socket_timeout_s=timeout), **kwargs)

    @classmethod
    def from_settings(cls, settings: Settings) -> SessionStore:
        """A store configured from the process's Settings."""
        return cls(
            redis_client_for(settings),
            prefix=settings.key_prefix,
            default_ttl_s=settings.session_ttl_s,
            expiry_grace_s=settings.expiry_grace_s,
            max_sessions=settings.max_sessions,
            max_value_bytes=settings.max_value_bytes,
            global_program_ttl_s=settings.global_program_ttl_s,
            idempotency_keep_s=max(settings.idempotency_ttl_s, settings.visibility_timeout_s * 2),
            events_maxlen=settings.events_maxlen,
            variable_history=settings.variable_history,
            program_history=settings.program_history,
            max_dataset_bytes=settings.max_dataset_bytes,
        )

    def close(self) -> None:
        """Close the store's client and every connection pool it holds."""
        close_client(self.redis)
