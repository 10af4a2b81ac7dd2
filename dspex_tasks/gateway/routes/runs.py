"""Runs over HTTP: start one on a session (202), read where it stands, cancel it.

A run is started through the same path as the Python client (``Client.submit``, or
``Client.enqueue`` for a task sent by name): the task ledger, the session's multitask
strategy, then the broker. The API also records which session each run belongs to
(``store.index_run``), so ``/v1/runs/{run_id}`` needs only the id.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Response

from dspex_tasks.client import Client
from dspex_tasks.errors import DspexError, InvalidInputs
from dspex_tasks.gateway.deps import ClientDep
from dspex_tasks.gateway.errors import error_responses
from dspex_tasks.gateway.models import CancelRun, RunAccepted, StartRun
from dspex_tasks.handles import TaskHandle

__all__ = ["TASKS", "router"]

router = APIRouter(tags=["runs"])

#: ``task`` in a request -> the Client's kind of task.
_KINDS = {"predict": "predict", "chain_of_thought": "chain_of_thought", "program": "run_program"}
TASKS = (*_KINDS, "compile")
_FINAL = frozenset({"succeeded", "failed", "cancelled", "interrupted", "rolled_back", "rejected"})
_SESSION = ("session_not_found", "session_expired", "invalid_session_id")
#: ``?session_id=``: the runs this API started are found by id alone (the run index);
#: one started elsewhere (the Python client) is, until it ends, through the task ledger.
SESSION_HINT = Query(
    None, description="the run's session: needed only for a finished run another client started"
)


def _submit(client: Client, session_id: str, body: StartRun) -> TaskHandle:
    if body.task == "compile":
        return _compile(client, session_id, body)
    kind = _KINDS.get(body.task)
    if kind is None:
        raise InvalidInputs(
            f"unknown task {body.task!r}: use one of {', '.join(TASKS)}", {"task": body.task}
        )
    needs, target = (
        ("program_id", body.program_id) if kind == "run_program" else ("signature", body.signature)
    )
    if target is None:
        raise InvalidInputs(f"task {body.task!r} needs {needs}", {"task": body.task})
    if body.trainset is not None:
        raise InvalidInputs("trainset is only for task 'compile'", {"task": body.task})
    return client.submit(kind, session_id, target, body.inputs, body.options)


def _compile(client: Client, session_id: str, body: StartRun) -> TaskHandle:
    """``dspex.compile(session_id, program_id, trainset, options)``, checked as the
    Python client checks it (options, metric, examples, size) before it is enqueued."""
    if body.program_id is None or not body.trainset:
        raise InvalidInputs("task 'compile' needs program_id and a non-empty trainset")
    if body.signature is not None or body.inputs:
        raise InvalidInputs("task 'compile' takes no signature or inputs: use trainset")
    return client.submit_compile(session_id, body.program_id, body.trainset, body.options or {})


@router.post(
    "/v1/sessions/{session_id}/runs",
    status_code=202,
    response_model=RunAccepted,
    responses=error_responses(
        *_SESSION,
        "invalid_inputs",
        "invalid_program",
        "program_not_found",
        "session_busy",
        "payload_too_large",
        body=True,
    ),
)
def start_run(
    session_id: str, body: StartRun, client: ClientDep, response: Response
) -> dict[str, Any]:
    """Start a run: ``predict`` / ``chain_of_thought`` (``signature``), ``program``
    (``program_id``) or ``compile`` (``program_id``, ``trainset``). Everything that can
    be checked before enqueueing is; the run id comes back at once."""
    handle = _submit(client, session_id, body)
    client.store.index_run(handle.id, session_id, keep_s=client.settings.result_expires_s)
    response.headers["Location"] = f"/v1/runs/{handle.id}"
    return {"run_id": handle.id, "session_id": session_id}


@router.get("/v1/sessions/{session_id}/runs", responses=error_responses(*_SESSION))
def list_runs(
    session_id: str,
    client: ClientDep,
    status: str | None = Query(None, description="only runs with this status"),
    limit: int = Query(100, ge=1, le=1000),
) -> dict[str, Any]:
    """The session's runs, newest first."""
    runs = client.store.list_runs(session_id, status=status, limit=limit)
    return {"runs": [r.to_dict() for r in runs]}


@router.get(
    "/v1/runs/{run_id}", responses=error_responses("run_not_found", "invalid_inputs", *_SESSION)
)
def get_run(
    run_id: str, client: ClientDep, session_id: str | None = SESSION_HINT
) -> dict[str, Any]:
    """Where a run stands: ``status`` (queued, running, succeeded, failed, cancelled,
    interrupted, rolled_back, rejected), and once it ended its ``result`` or ``error``."""
    store = client.store
    session_id = session_id or store.find_run_session(run_id)
    run = store.get_run(session_id, run_id)
    body: dict[str, Any] = {"run_id": run_id, **run.to_dict()}
    del body["id"]
    if run.status in _FINAL:
        outcome = client.result(run_id, session_id).outcome()
        if isinstance(outcome, DspexError):
            body["error"] = outcome.to_dict()
        elif outcome is not None:
            body["result"] = outcome
        elif run.error_code:  # ended before a worker recorded a result
            body["error"] = {"code": run.error_code, "message": run.status, "details": {}}
    return body


@router.post(
    "/v1/runs/{run_id}/cancel",
    status_code=202,
    responses=error_responses("run_not_found", "invalid_inputs", *_SESSION, body=True),
)
def cancel_run(
    run_id: str,
    client: ClientDep,
    body: CancelRun | None = None,
    session_id: str | None = SESSION_HINT,
) -> dict[str, Any]:
    """Stop a run: a queued one never starts, a running one stops within a second.
    ``outcome``: ``stopped`` (it had not started), ``signalled`` (its worker stops it) or
    ``finished`` (it had ended: nothing done)."""
    action = body.action if body is not None else "interrupt"
    session_id = session_id or client.store.find_run_session(run_id)
    outcome = client.cancel(run_id, action, session_id=session_id)
    return {"run_id": run_id, "session_id": session_id, "outcome": outcome}
