"""Runs: every task on a session is a run, with a status, a multitask strategy and a cancel.

A run's id is its Celery task id. The registry is a hash in the session's slot (deleted
with the session, capped to the most recent finished runs). The strategy of a run
(``options["multitask"]``, else the session's ``configure_session(multitask=...)``, else
``parallel``) decides at admission, atomically in one script:

- ``parallel``: runs overlap freely;
- ``reject``: refused (``session_busy``) while another run is queued or running;
- ``enqueue``: one at a time in submission order; a run waiting for its turn is not
  published at all (its message is kept in Redis) and holds no worker thread; the run
  ahead publishes it when it ends. A message lost on the way is sent again by the task
  ledger (``store/ledger.py``), so a crash never blocks the session for good;
- ``interrupt`` / ``rollback``: every earlier run is asked to stop (status
  ``interrupted`` / ``rolled_back``), then this one goes, like ``enqueue``.

Cancel: a run that has not started ends at once; a running one is flagged and its worker
stops it (``Runtime`` polls the flag while the LM works).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dspex_tasks.errors import InvalidInputs, RunNotFound, SessionBusy
from dspex_tasks.keys import check_session_id
from dspex_tasks.specs import MULTITASK_STRATEGIES
from dspex_tasks.store.base import StoreCore, translate_errors
from dspex_tasks.store.codec import dumps, loads
from dspex_tasks.store.models import Run, Session, ms_to_datetime, session_from_record
from dspex_tasks.store.scripts import Status
from dspex_tasks.store.streams import check_run_id

__all__ = [
    "MULTITASK_STRATEGIES",
    "RUN_STATUSES",
    "RunDecision",
    "RunHeld",
    "RunTicket",
    "RunsMixin",
    "StopPoll",
    "check_multitask",
    "start_decision",
]

RUN_STATUSES = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "interrupted",
    "rolled_back",
    "rejected",
)
CANCEL_ACTIONS = {"interrupt": "cancel", "rollback": "rollback"}


@dataclass(frozen=True)
class RunDecision:
    """What a run operation decided, and what its caller must do next.

    ``verdict``: go / parked / busy (admission), ok / parked / rejected / stopped (a
    worker starting it), signalled / stopped / final (cancel), or the final status
    (finish). ``status``: the run's final status when it ended here. ``release``: the
    next parked run to publish now, ``(run id, message)``. ``dropped``: parked runs that
    ended before they started (their results are the caller's to record).
    """

    verdict: str
    status: str | None = None
    release: tuple[str, dict[str, Any]] | None = None
    dropped: tuple[str, ...] = ()


def _no_follow(decision: RunDecision) -> None:
    pass


@dataclass
class RunTicket:
    """A run a worker starts and ends inside its task's own round trips.

    ``begin_task`` starts it in the script that claims the task, ``finish_task`` ends it
    (succeeded) in the one that records the result: a run costs no round trip of its
    own on the common path. ``message`` builds the run's message only when its
    admission needs one (a foreign producer's run that may be parked). ``follow`` gets
    a started run's decision when it dropped parked runs (their results are the
    caller's to record). ``admitted``: the run was started here; ``finished``: its end,
    when ``finish_task`` recorded it (otherwise the caller ends it with ``finish_run``).
    """

    task: str
    multitask: str | None
    message: Callable[[], Mapping[str, Any]]
    follow: Callable[[RunDecision], None] = field(default=_no_follow)
    admitted: bool = False
    finished: RunDecision | None = None


class RunHeld(Exception):
    """The run of a task may not go now (parked, rejected or stopped): ``decision`` says
    which, and what its caller must do. Nothing was claimed."""

    def __init__(self, decision: RunDecision) -> None:
        super().__init__(decision.verdict)
        self.decision = decision


def start_decision(reply: list[Any]) -> RunDecision:
    """The decision of ``run_start`` (Lua prelude) from its answer."""
    if reply[0] == Status.STOPPED:
        return RunDecision(Status.STOPPED, str(reply[1]), _released(reply, 2))
    dropped = tuple(str(d) for d in reply[1]) if len(reply) > 1 and reply[1] else ()
    return RunDecision(str(reply[0]), dropped=dropped)


def finish_decision(reply: list[Any]) -> RunDecision:
    """The decision of ``run_finish`` (Lua prelude) from its answer."""
    return RunDecision(str(reply[0]), str(reply[0]), _released(reply, 1))


def check_multitask(value: Any) -> str | None:
    """``value`` if it names a strategy (None: the session's default), else invalid_inputs."""
    if value is None or value in MULTITASK_STRATEGIES:
        return value  # type: ignore[no-any-return]
    raise InvalidInputs(
        f"unknown multitask strategy {value!r}: use one of {', '.join(MULTITASK_STRATEGIES)}",
        {"multitask": repr(value)},
    )


def _run(sid: str, run_id: str, raw: str) -> Run:
    rec = loads(raw)

    def at(name: str) -> Any:
        value = rec.get(name)
        return ms_to_datetime(value) if value is not None else None

    return Run(
        id=run_id,
        session_id=sid,
        task=rec.get("task", ""),
        status=rec["status"],
        created_at=ms_to_datetime(rec["created_ms"]),
        started_at=at("started_ms"),
        finished_at=at("finished_ms"),
        error_code=rec.get("error_code"),
        multitask=rec.get("multitask", "parallel"),
        seq=int(rec.get("seq", 0)),
    )


def _cancel_asked(raw: Any) -> bool:
    """Whether a run's registry record (None: no such run) carries a cancel."""
    return raw is not None and loads(raw).get("cancel") is not None


def _released(reply: list[Any], at: int) -> tuple[str, dict[str, Any]] | None:
    if len(reply) > at + 1 and reply[at]:
        return str(reply[at]), loads(reply[at + 1])
    return None


class RunsMixin(StoreCore):
    """The run registry and the per-session multitask strategies."""

    def configure_session(self, session_id: str, *, multitask: str | None = None) -> Session:
        """Session-wide settings: the default ``multitask`` strategy of its runs."""
        sid = check_session_id(session_id)
        strategy = check_multitask(multitask)
        if strategy is None:
            reply = self._session_script("GET_SESSION", sid, True)
            return session_from_record(sid, reply[1])
        reply = self._session_script("CONFIGURE_SESSION", sid, True, "multitask", strategy)
        return session_from_record(sid, reply[1])

    def queue_run(
        self,
        session_id: str,
        run_id: str,
        task: str,
        message: Mapping[str, Any],
        *,
        multitask: str | None = None,
    ) -> RunDecision:
        """Register a run before publishing it: ``go`` (publish it now) or ``parked`` (do
        not: the run ahead publishes it when it ends).

        Raises:
            SessionBusy: the ``reject`` strategy refused it (recorded as rejected).
        """
        sid = check_session_id(session_id)
        reply = self._session_script(
            "QUEUE_RUN", sid, True, run_id, task, check_multitask(multitask) or "", dumps(message)
        )
        if reply[0] == Status.BUSY:
            raise SessionBusy(
                f"session {sid!r} has a run queued or running (multitask=reject)",
                {"session_id": sid, "run_id": run_id},
            )
        if reply[0] == "exists":
            return RunDecision(Status.GO)
        return RunDecision(str(reply[0]), dropped=tuple(str(d) for d in reply[1] or ()))

    def start_run(
        self,
        session_id: str,
        run_id: str,
        task: str,
        message: Mapping[str, Any],
        *,
        multitask: str | None = None,
    ) -> RunDecision:
        """A worker starts a run: ``ok`` run it; ``parked`` drop the message (it is
        published again on its turn); ``rejected``; ``stopped`` do not run it."""
        sid = check_session_id(session_id)
        reply = self._session_script(
            "START_RUN", sid, True, run_id, task, check_multitask(multitask) or "", dumps(message)
        )
        return start_decision(reply)

    def finish_run(
        self, session_id: str, run_id: str, outcome: str, error_code: str | None = None
    ) -> RunDecision:
        """Record a run's end (``succeeded``, ``failed`` or ``stopped``); the decision
        carries its final status and the next parked run to publish, if any."""
        sid = check_session_id(session_id)
        reply = self._session_script("FINISH_RUN", sid, False, run_id, outcome, error_code or "")
        return finish_decision(reply[1:])

    def cancel_run(self, session_id: str, run_id: str, *, action: str = "interrupt") -> RunDecision:
        """Stop a run: ``final`` (it had ended: nothing done), ``stopped`` (it never
        started: it ended now) or ``signalled`` (its worker stops it within a second).

        Raises:
            RunNotFound, InvalidInputs (unknown action).
        """
        sid = check_session_id(session_id)
        if action not in CANCEL_ACTIONS:
            raise InvalidInputs(
                f"unknown cancel action {action!r}: use interrupt or rollback",
                {"action": repr(action)},
            )
        reply = self._session_script("CANCEL_RUN", sid, False, run_id, CANCEL_ACTIONS[action])
        if reply[0] == Status.NORUN:
            raise RunNotFound(
                f"session {sid!r} has no run {run_id!r}", {"session_id": sid, "run_id": run_id}
            )
        if reply[0] in (Status.FINAL, Status.STOPPED):
            return RunDecision(str(reply[0]), str(reply[1]), _released(reply, 2))
        return RunDecision(str(reply[0]))

    def index_run(self, run_id: str, session_id: str, *, keep_s: float) -> None:
        """Remember which session ``run_id`` belongs to for ``keep_s`` (a caller that
        knows only the run id, such as the HTTP API's ``/v1/runs/{id}``, finds it)."""
        key = self.keys.run_session(check_run_id(run_id))
        with translate_errors():
            self.redis.set(key, check_session_id(session_id), px=max(1, int(keep_s * 1000)))

    def stop_requested(self, session_id: str, run_id: str) -> bool:
        """Whether someone asked this run to stop (its worker polls this)."""
        with translate_errors():
            raw = self.redis.hget(self.keys.runs(session_id), run_id)
        return _cancel_asked(raw)

    def stops_requested(self, runs: Sequence[tuple[str, str]]) -> list[bool]:
        """:meth:`stop_requested` of many ``(session_id, run_id)`` in one round trip (a
        worker polls all its runs at once)."""
        if not runs:
            return []
        with translate_errors():
            pipe = self.redis.pipeline(transaction=False)
            for session_id, run_id in runs:
                pipe.hget(self.keys.runs(session_id), run_id)
            replies = pipe.execute()
        return [_cancel_asked(raw) for raw in replies]

    def stop_poll(self, session_id: str, run_id: str) -> StopPoll:
        """:meth:`stop_requested` of one run as a call, which a poller of many runs
        can batch (``stops_requested``)."""
        return StopPoll(self, session_id, run_id)

    def get_run(self, session_id: str, run_id: str) -> Run:
        """One run of the session. Raises ``RunNotFound``."""
        sid = check_session_id(session_id)
        reply = self._session_script("GET_RUNS", sid, False, run_id)
        _, raw = reply[1]
        if not raw:
            raise RunNotFound(
                f"session {sid!r} has no run {run_id!r}", {"session_id": sid, "run_id": run_id}
            )
        return _run(sid, run_id, raw)

    def list_runs(
        self, session_id: str, *, status: str | None = None, limit: int = 100
    ) -> list[Run]:
        """The session's runs, newest first (``status`` keeps only those)."""
        sid = check_session_id(session_id)
        if status is not None and status not in RUN_STATUSES:
            raise InvalidInputs(f"unknown run status {status!r}", {"status": repr(status)})
        flat = self._session_script("GET_RUNS", sid, False, "")[1]
        runs = [_run(sid, run_id, raw) for run_id, raw in zip(flat[::2], flat[1::2], strict=True)]
        if status is not None:
            runs = [r for r in runs if r.status == status]
        runs.sort(key=lambda r: (r.seq, r.created_at), reverse=True)
        return runs[: max(0, limit)]


@dataclass(frozen=True, eq=False)
class StopPoll:
    """Asks whether one run was asked to stop."""

    store: RunsMixin
    session_id: str
    run_id: str

    def __call__(self) -> bool:
        return self.store.stop_requested(self.session_id, self.run_id)
