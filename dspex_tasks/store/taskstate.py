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
from dspex_tasks.store.runs import (
    RunHeld,
    RunTicket,
    check_multitask,
    finish_decision,
    start_decision,
)
from dspex_tasks.store.scripts import Status
from dspex_tasks.store.usage import UsageMixin
from dspex_tasks.store.variables import VariablesMixin

__all__ = ["ResultRecord", "TaskContext", "TaskStateMixin"]


@dataclass(frozen=True)
class ResultRecord:
    """A task state's record in Celery's result backend, ready to write (as
    ``resultbackend.py`` writes it: never over a stored SUCCESS, published)."""

    key: str
    value: str | bytes
    #: The record's expiry; 0: none.
    expires_s: int


@dataclass(frozen=True)
class TaskContext:
    """What a task needs before it runs: its session, program and LM-bound variables."""

    session: Session
    variables: Mapping[str, Variable]
    program: dict[str, Any] | None


def _usage_args(usage: Mapping[str, int] | None) -> list[int]:
    if not usage:
        return []
    names = ("prompt_tokens", "completion_tokens", "calls", "cached_calls")
    return [int(usage.get(name, 0)) for name in names]


class TaskStateMixin(VariablesMixin, UsageMixin):
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
        run: RunTicket | None = None,
        started: ResultRecord | None = None,
    ) -> TaskContext:
        """Load a task's context and claim its id, in one round trip; given ``run``
        (``task_id`` is its id), start that run first, in the same round trip.

        ``started``: the task's STARTED record in Celery's result backend (on the store's
        Redis; never with Cluster, whose slots it would cross), written in the same round
        trip once the claim is taken, so a task does not spend one on it before it starts
        (``task_track_started``).

        Raises:
            DuplicateDelivery: ``details["state"]`` is ``"running"`` (another delivery of
                this task holds the claim) or ``"done"`` (``details["result"]`` is the
                first run's result JSON).
            RunHeld: ``run`` may not go now (parked, rejected or stopped); nothing claimed.
            SessionNotFound, SessionExpired, ProgramNotFound.
        """
        sid = check_session_id(session_id)
        pid = check_program_id(program_id) if program_id is not None else ""
        tokens = list(variables)
        run_args: tuple[str, str, str | bytes] = ("", "", "")
        if run is not None:
            run_args = (run.task, check_multitask(run.multitask) or "", "")
        record: tuple[str | bytes | int, ...] = ("", 0)
        after: list[str] = []
        if started is not None:
            record, after = (started.value, started.expires_s), [started.key]
        while True:
            reply = self._session_script(
                "TASK_CONTEXT",
                sid,
                True,
                task_id or "",
                attempt,
                int(lease_s * 1000),
                pid,
                *run_args,
                *record,
                *tokens,
                keys_after=after,
            )
            if reply[0] != Status.RUN or reply[1][0] != Status.NEEDMSG or run is None:
                break
            # A foreign producer's run that may be parked: its message must be kept.
            run_args = (run_args[0], run_args[1], dumps(run.message()))
        status = reply[0]
        if status == Status.RUN:
            assert run is not None
            raise RunHeld(start_decision(reply[1]))
        if run is not None and len(reply) > 4 and reply[4]:
            run.admitted = True
            admission = start_decision(reply[4])
            if admission.dropped:
                run.follow(admission)
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
        run: RunTicket | None = None,
        usage: Mapping[str, int] | None = None,
        succeeded: ResultRecord | None = None,
    ) -> dict[str, Any] | None:
        """Record that ``task_id`` finished with ``result`` (for tasks that wrote nothing);
        given the ``run`` it started, end that run as succeeded in the same round trip
        (``run.finished`` then holds the decision). ``usage``: the task's LM usage, added
        to the session in the same round trip (as :meth:`add_usage` does).

        ``result`` may be given already JSON-encoded (bytes), as the runtime has it.
        Returns None, or the result of another delivery that finished first (the caller
        answers that one). A session deleted or expired meanwhile records nothing.
        ``forget_sent``: the task also leaves the task ledger (``store/ledger.py``), in
        the same round trip outside Cluster mode. ``succeeded``: the task's SUCCESS
        record in Celery's result backend (as ``started`` for :meth:`begin_task`), written
        in the same round trip unless another delivery finished first (None returned:
        written).
        """
        sid = check_session_id(session_id)
        raw = result if isinstance(result, bytes) else dumps(result)
        keys = self.keys.session_keys(sid)
        if forget_sent and not self.cluster:
            keys += [self.keys.ledger, self.keys.ledger_due]
        record: tuple[str | bytes, int] = ("", 0)
        if succeeded is not None:
            keys.append(succeeded.key)
            record = (succeeded.value, succeeded.expires_s)
        reply = self._script(
            "FINISH_TASK",
            keys,
            [
                *self._prelude_args(False),
                task_id,
                int(self.idempotency_keep_s * 1000),
                raw,
                "1" if run is not None and run.admitted else "",
                *record,
                *_usage_args(usage),
            ],
        )
        if forget_sent and self.cluster:
            with translate_errors():
                pipe = self.redis.pipeline(transaction=False)
                pipe.hdel(self.keys.ledger, task_id)
                pipe.zrem(self.keys.ledger_due, task_id)
                pipe.execute()
        if reply[0] == Status.DUPLICATE:
            if usage:  # this delivery's LM calls were made all the same
                self.add_usage(sid, usage)
            first: dict[str, Any] = loads(reply[1])
            return first
        if run is not None and len(reply) > 1:
            run.finished = finish_decision(reply[1:])
        return None

    def release_task(self, session_id: str, task_id: str) -> None:
        """Drop a failed attempt's claim so a retry or redelivery can run at once."""
        sid = check_session_id(session_id)
        self._script(
            "RELEASE_TASK", self.keys.session_keys(sid), [*self._prelude_args(False), task_id]
        )
