"""``/v1/sessions/{sid}/variables``: register, read, update (compare-and-set), history."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from dspex_tasks.gateway.deps import ClientDep
from dspex_tasks.gateway.errors import error_responses
from dspex_tasks.gateway.models import RegisterVariable, UpdateVariable

__all__ = ["router"]

router = APIRouter(prefix="/v1/sessions/{session_id}/variables", tags=["variables"])

_SESSION = ("session_not_found", "session_expired", "invalid_session_id")


@router.get("", responses=error_responses(*_SESSION))
def list_variables(session_id: str, client: ClientDep) -> dict[str, Any]:
    """The session's variables, in creation order."""
    found = client.store.list_variables(session_id)
    return {"variables": [v.to_dict() for v in found]}


@router.post(
    "",
    status_code=201,
    responses=error_responses(
        *_SESSION, "variable_exists", "unknown_type", "validation_failed", body=True
    ),
)
def register_variable(session_id: str, body: RegisterVariable, client: ClientDep) -> dict[str, Any]:
    """Register a typed variable (version 1)."""
    variable = client.store.register_variable(
        session_id,
        body.name,
        body.type,
        body.value,
        constraints=body.constraints,
        description=body.description,
        metadata=body.metadata,
        history=body.history,
    )
    return variable.to_dict()


@router.get("/{name}", responses=error_responses(*_SESSION, "variable_not_found"))
def get_variable(session_id: str, name: str, client: ClientDep) -> dict[str, Any]:
    return client.store.get_variable(session_id, name).to_dict()


@router.put(
    "/{name}",
    responses=error_responses(
        *_SESSION, "variable_not_found", "validation_failed", "version_conflict", body=True
    ),
)
def update_variable(
    session_id: str, name: str, body: UpdateVariable, client: ClientDep
) -> dict[str, Any]:
    """Validate and write a new value (version + 1); with ``expected_version``, only if
    the stored version is that one (else 409 ``version_conflict``)."""
    variable = client.store.update_variable(
        session_id,
        name,
        body.value,
        expected_version=body.expected_version,
        metadata=body.metadata,
    )
    return variable.to_dict()


@router.get(
    "/{name}/history",
    responses=error_responses(*_SESSION, "variable_not_found", "invalid_inputs"),
)
def variable_history(
    session_id: str,
    name: str,
    client: ClientDep,
    limit: int | None = Query(None, ge=1, description="at most this many, newest first"),
) -> dict[str, Any]:
    """The kept versions of a variable, newest first."""
    store = client.store
    type_name = store.get_variable(session_id, name).type
    versions = store.variable_history(session_id, name, limit=limit)
    return {"name": name, "versions": [v.to_dict(type_name) for v in versions]}
