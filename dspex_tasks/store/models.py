"""Records the SessionStore returns: small frozen dataclasses with a JSON form."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson

from dspex_tasks.types import encode_value

__all__ = [
    "Event",
    "Run",
    "Session",
    "Variable",
    "VariableVersion",
    "ms_to_datetime",
    "session_from_record",
]


def ms_to_datetime(ms: int | str) -> datetime:
    """Server milliseconds since the epoch -> aware UTC datetime."""
    return datetime.fromtimestamp(int(ms) / 1000, tz=timezone.utc)


@dataclass(frozen=True)
class Session:
    """A session as stored: wall-clock UTC times, its TTL, metadata and LM settings."""

    id: str
    created_at: datetime
    last_accessed: datetime
    ttl_s: float
    expires_at: datetime
    metadata: Mapping[str, Any] = field(default_factory=dict)
    lm: Mapping[str, Any] = field(default_factory=dict)
    #: LM usage of the session's runs (``store/usage.py``) and its token budget.
    usage: Mapping[str, int] = field(default_factory=dict)
    max_tokens_total: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created_at": self.created_at.isoformat(),
            "last_accessed": self.last_accessed.isoformat(),
            "ttl_s": self.ttl_s,
            "expires_at": self.expires_at.isoformat(),
            "metadata": dict(self.metadata),
            "lm": dict(self.lm),
        }


@dataclass(frozen=True)
class Variable:
    """A typed session variable; ``version`` starts at 1 and grows by 1 per write."""

    id: str
    name: str
    type: str
    value: Any
    constraints: Mapping[str, Any]
    description: str | None
    metadata: Mapping[str, Any]
    version: int
    created_at: datetime
    updated_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "type": self.type,
            "value": encode_value(self.type, self.value),
            "constraints": dict(self.constraints),
            "description": self.description,
            "metadata": dict(self.metadata),
            "version": self.version,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


def session_from_record(sid: str, flat: Sequence[Any]) -> Session:
    """Build a Session from the flat HGETALL reply of its record."""
    f = dict(zip(flat[::2], flat[1::2], strict=True))
    return Session(
        id=sid,
        created_at=ms_to_datetime(f["created_ms"]),
        last_accessed=ms_to_datetime(f["accessed_ms"]),
        ttl_s=int(f["ttl_ms"]) / 1000,
        expires_at=ms_to_datetime(f["deadline_ms"]),
        metadata=orjson.loads(f.get("metadata") or "{}"),
        lm=orjson.loads(f.get("lm") or "{}"),
        usage={name: int(f.get(fld) or 0) for fld, name in USAGE_FIELDS.items()},
        max_tokens_total=int(f["max_tokens_total"]) if f.get("max_tokens_total") else None,
    )


#: Session record field -> usage counter (``store/usage.py``).
USAGE_FIELDS = {
    "u_prompt": "prompt_tokens",
    "u_completion": "completion_tokens",
    "u_calls": "calls",
    "u_cached": "cached_calls",
}


@dataclass(frozen=True)
class Event:
    """One entry of a session's event log: ``id`` is its stream id (resume after it)."""

    id: str
    type: str
    at: datetime
    data: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "at": self.at.isoformat(), "data": self.data}


@dataclass(frozen=True)
class VariableVersion:
    """One kept version of a variable (``variable_history``, newest first)."""

    version: int
    value: Any
    updated_at: datetime
    run_id: str | None = None

    def to_dict(self, type_name: str) -> dict[str, Any]:
        return {
            "version": self.version,
            "value": encode_value(type_name, self.value),
            "updated_at": self.updated_at.isoformat(),
            "run_id": self.run_id,
        }


@dataclass(frozen=True)
class Run:
    """One task on a session (its id is the Celery task id) and where it stands."""

    id: str
    session_id: str
    task: str
    status: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error_code: str | None = None
    multitask: str = "parallel"
    #: Admission order within the session (1, 2, ...): the order ``enqueue`` runs them in.
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        def iso(t: datetime | None) -> str | None:
            return t.isoformat() if t is not None else None

        return {
            "id": self.id,
            "session_id": self.session_id,
            "task": self.task,
            "status": self.status,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "error_code": self.error_code,
            "multitask": self.multitask,
            "seq": self.seq,
        }
