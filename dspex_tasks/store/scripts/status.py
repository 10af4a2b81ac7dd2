"""The statuses the scripts answer with, in one place."""

from __future__ import annotations

__all__ = ["Status"]


class Status:
    """Reply statuses of the scripts (first element of a reply or of a per-variable row)."""

    #: Done; the rest of the reply is the answer.
    OK = "ok"
    #: No such session.
    MISSING = "missing"
    #: The session's deadline passed; the caller runs the expiry script.
    EXPIRED = "expired"
    #: Create without exist_ok of a live session / register of a taken variable name.
    EXISTS = "exists"
    #: DSPEX_MAX_SESSIONS reached.
    QUOTA = "quota"
    #: No live variable answers to the token.
    NOVAR = "novar"
    #: The caller's cached variable schema names another id than the stored one.
    STALE = "stale"
    #: ``expected_version`` differs from the stored version (row carries the current one).
    CONFLICT = "conflict"
    #: Not written because another variable of an atomic batch failed.
    SKIPPED = "skipped"
    #: An atomic batch wrote nothing (rows say why per variable).
    FAILED = "failed"
    #: The task id already recorded its result (reply carries it); nothing written.
    DUPLICATE = "duplicate"
    #: The task id's earlier delivery still holds its lease.
    RUNNING = "running"
    #: The task id already finished (reply carries its result).
    DONE = "done"
    #: The program a task names does not exist.
    NOPROGRAM = "noprogram"
    #: Run admission: publish the run now / it waits for the run ahead / refused.
    GO = "go"
    PARKED = "parked"
    BUSY = "busy"
    #: A run the worker must not run (cancelled before it started, or final already).
    STOPPED = "stopped"
    #: The run was refused when a worker admitted it (reject strategy).
    REJECTED = "rejected"
    #: The run is running; its worker has been asked to stop it.
    SIGNALLED = "signalled"
    #: A run's admission needs its message (it may be parked); nothing was written.
    NEEDMSG = "needmsg"
    #: TASK_CONTEXT: the task's run may not go now (the reply carries run_start's answer).
    RUN = "run"
    #: No run with that id in the session.
    NORUN = "norun"
    #: The run already ended; nothing to do.
    FINAL = "final"
    #: A name to register is the id of a live variable (reply carries the names).
    ISID = "isid"
    #: A drawn variable tag makes an id equal to a live name: draw again.
    RETAG = "retag"
    #: The version to roll back to is not in the variable's history.
    NOHISTORY = "nohistory"
    #: The stored metadata is not what the caller merged its patch into (row carries the
    #: stored metadata): merge again.
    METASTALE = "metastale"
    #: A compile run holds the program's optimization lease (reply carries its run id).
    LOCKED = "locked"
    #: The caller's optimization lease lapsed and is gone (or another delivery took it).
    LOST = "lost"
