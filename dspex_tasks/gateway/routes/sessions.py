"""``/v1/sessions``: create, read, list, delete.

Routes are plain ``def``: FastAPI runs them in its threadpool, where the store's
synchronous redis-py calls cannot block the event loop.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from dspex_tasks.gateway.deps import ClientDep
from dspex_tasks.gateway.errors import error_responses
from dspex_tasks.gateway.models import CreateSession
from dspex_tasks.store import Session

__all__ = ["router", "session_json"]

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


def session_json(session: Session) -> dict[str, Any]:
    return {
        **session.to_dict(),
        "usage": dict(session.usage),
        "max_tokens_total": session.max_tokens_total,
    }


@router.post(
    "",
    status_code=201,
    responses=error_responses(
        "session_exists",
        "invalid_session_id",
        "session_quota_exceeded",
        "validation_failed",
        body=True,
    ),
)
def create_session(body: CreateSession, client: ClientDep) -> dict[str, Any]:
    """Create a session (a random id when none is given)."""
    handle = client.create_session(body.session_id, ttl_s=body.ttl_s, metadata=body.metadata)
    return session_json(handle.info())


@router.get("", responses=error_responses())
def list_sessions(client: ClientDep) -> dict[str, Any]:
    """Ids of the live sessions."""
    return {"sessions": client.list_sessions()}


@router.get(
    "/{session_id}",
    responses=error_responses("session_not_found", "session_expired", "invalid_session_id"),
)
def get_session(session_id: str, client: ClientDep) -> dict[str, Any]:
    """A session (reading it slides its TTL)."""
    return session_json(client.store.get_session(session_id))


@router.delete("/{session_id}", responses=error_responses("invalid_session_id"))
def delete_session(session_id: str, client: ClientDep) -> dict[str, Any]:
    """Delete a session and everything it holds; idempotent (``deleted`` says if it
    existed)."""
    return {"session_id": session_id, "deleted": client.delete_session(session_id)}
