"""``/v1/sessions/{sid}/programs``: store (PUT), read, list, delete program specs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from dspex_tasks.gateway.deps import ClientDep
from dspex_tasks.gateway.errors import error_responses
from dspex_tasks.gateway.models import PutProgram

__all__ = ["router"]

router = APIRouter(prefix="/v1/sessions/{session_id}/programs", tags=["programs"])

_SESSION = ("session_not_found", "session_expired", "invalid_session_id")


@router.get("", responses=error_responses(*_SESSION))
def list_programs(session_id: str, client: ClientDep) -> dict[str, Any]:
    return {"programs": client.store.list_programs(session_id)}


@router.put(
    "/{program_id}",
    responses=error_responses(*_SESSION, "invalid_program", "optimization_in_progress", body=True),
)
def put_program(
    session_id: str, program_id: str, body: PutProgram, client: ClientDep
) -> dict[str, Any]:
    """Store (or replace) a program; the spec comes back normalized."""
    spec = client.store.store_program(session_id, program_id, body.model_dump())
    return {"program_id": program_id, "spec": spec}


@router.get(
    "/{program_id}", responses=error_responses(*_SESSION, "program_not_found", "invalid_program")
)
def get_program(session_id: str, program_id: str, client: ClientDep) -> dict[str, Any]:
    return {"program_id": program_id, "spec": client.store.get_program(session_id, program_id)}


@router.delete(
    "/{program_id}",
    responses=error_responses(*_SESSION, "invalid_program", "optimization_in_progress"),
)
def delete_program(session_id: str, program_id: str, client: ClientDep) -> dict[str, Any]:
    """Delete a program; ``deleted`` says whether it existed."""
    deleted = client.store.delete_program(session_id, program_id)
    return {"program_id": program_id, "deleted": deleted}
