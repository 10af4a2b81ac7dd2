"""Task bookkeeping in the session: one-round-trip task context and at-most-once claims.

A task claims its id when it loads its context, with a short lease that the holder
renews while it runs (:meth:`TaskStateMixin.renew_task`). A redelivery of a message whose
first delivery is still running (the broker's visibility timeout passed) sees the live
claim; one whose first delivery finished (:meth:`TaskStateMixin.finish_task`, or the
``store_outputs`` write) gets that run's result back. A claim whose holder died stops
being renewed, so its lease lapses and the redelivered message takes it over. Retries
carry a higher attempt number and take the claim over.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dspex_tasks.errors import DuplicateDelivery, ProgramNotFound
from dspex_tasks.keys import check_program_id, check_session_id
from dspex_tasks.store.base import dumps, loads, translate_errors
from dspex_tasks.store.models import Session, Variable, session_from_record
from dspex_tasks.store.scripts import Status
from dspex_tasks.store.variables import VariablesMixin

__all__ = ["TaskContext", "TaskStateMixin"]


@dataclass(frozen=True)
class TaskContext:
    """What a task needs before it runs: its session, program and LM-bound variables."""

    session: Session
    variables: Mapping[str, Variable]
    program: dict[str, Any] | None


class TaskStateMixin(VariablesMixin):
    """Claims on task ids, kept in the session's ``done`` hash."""

    def begin_task(
        self,
        session_id: str,
        *,
        task_id: str | None = None,
        attempt: int = 0,
        lease_s: float = 600,
        program_id: str | None = None,
        variables: Sequence[str] = (),
    ) -> TaskContext:
        """Load a task's context and claim its id, in one round trip.

        Raises:
            DuplicateDelivery: ``details["state"]`` is ``"running"`` (another delivery of
                this task holds the claim) or ``"done"`` (``details["result"]`` is the
                first run's result JSON).
            SessionNotFound, SessionExpired, ProgramNotFound.
        """
        sid = check_session_id(session_id)
        pid = check_program_id(program_id) if program_id is not None else ""
        tokens = list(variables)
        reply = self._session_script(
            "TASK_CONTEXT",
            sid,
            True,
            task_id or "",
            attempt,
            int(lease_s * 1000),
            pid,
            *tokens,
        )
        status = reply[0]
        if status == Status.RUNNING:
            raise DuplicateDelivery(
                f"task {task_id} is already running elsewhere", {"state": "running"}
            )
        if status == Status.DONE:
            raise DuplicateDelivery(
                f"task {task_id} already finished", {"state": "done", "result": reply[1]}
            )
        if status == Status.NOPROGRAM:
            raise ProgramNotFound(f"session {sid!r} has no program {pid!r}", {"program_id": pid})
        rows = self._variables_from_rows(sid, tokens, reply[1])
        found = {t: v for t, v in zip(tokens, rows, strict=True) if v is not None}
        program = dict(loads(reply[3])) if reply[3] else None
        return TaskContext(session_from_record(sid, reply[2]), found, program)

    def renew_task(self, session_id: str, task_id: str, attempt: int, lease_s: float) -> bool:
        """Extend a running claim's lease to now + ``lease_s``; False if not held any more."""
        sid = check_session_id(session_id)
        reply = self._script(
            "RENEW_TASK",
            self.keys.session_keys(sid),
            [*self._prelude_args(False), task_id, str(attempt), int(lease_s * 1000)],
        )
        return bool(reply)

    def finish_task(
        self,
        session_id: str,
        task_id: str,
        result: Mapping[str, Any] | bytes,
        *,
        forget_sent: bool = False,
    ) -> dict[str, Any] | None:
        """Record that ``task_id`` finished with ``result`` (for tasks that wrote nothing).

        ``result`` may be given already JSON-encoded (bytes), as the runtime has it.
        Returns None, or the result of another delivery that finished first (the caller
        answers that one). A session deleted or expired meanwhile records nothing.
        ``forget_sent``: the task also leaves the task ledger (``store/ledger.py``), in
        the same round trip outside Cluster mode.
        """
        sid = check_session_id(session_id)
        raw = result if isinstance(result, bytes) else dumps(result)
        keys = self.keys.session_keys(sid)
        if forget_sent and not self.cluster:
            keys += [self.keys.ledger, self.keys.ledger_due]
        reply = self._script(
            "FINISH_TASK",
            keys,
            [*self._prelude_args(False), task_id, int(self.idempotency_keep_s * 1000), raw],
        )
        if forget_sent and self.cluster:
            with translate_errors():
                pipe = self.redis.pipeline(transaction=False)
                pipe.hdel(self.keys.ledger, task_id)
                pipe.zrem(self.keys.ledger_due, task_id)
                pipe.execute()
        if reply[0] == Status.DUPLICATE:
            first: dict[str, Any] = loads(reply[1])
            return first
        return None

    def release_task(self, session_id: str, task_id: str) -> None:
        """Drop a failed attempt's claim so a retry or redelivery can run at once."""
        sid = check_session_id(session_id)
        self._script(
            "RELEASE_TASK", self.keys.session_keys(sid), [*self._prelude_args(False), task_id]
        )
