"""A variable's immutable schema, its per-process cache, and decoding of stored rows.

The variables hash layout these functions read is documented in ``store/scripts.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dspex_tasks.errors import ValidationFailed, VariableNotFound
from dspex_tasks.lru import LRU
from dspex_tasks.store.codec import loads
from dspex_tasks.store.models import Variable, ms_to_datetime

__all__ = [
    "ID_RE",
    "NAME_RE",
    "SchemaCache",
    "VarSchema",
    "check_name",
    "check_token",
    "schema_from_fields",
    "split_record",
    "variable_from",
]

NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,127}")
#: The shape of a variable id, ``var_<name>_<hex tag>``.
ID_RE = re.compile(r"var_(.+)_([0-9a-f]+)")


@dataclass(frozen=True)
class VarSchema:
    """The immutable part of a variable (id, name, type, constraints), cached per process.

    Type and constraints never change after registration and ids are never reused, so a
    cached schema is valid while the name still maps to its id; the write scripts check
    exactly that (status ``stale``) and the caller refetches.
    """

    id: str
    name: str
    type: str
    constraints: dict[str, Any]
    description: str | None
    created_ms: int
    #: Versions kept, the current one included (0 or 1: no older version).
    history: int = 0


class SchemaCache:
    """``(session_id, name or id) -> VarSchema``, both tokens of a schema kept together."""

    def __init__(self, max_entries: int = 8192) -> None:
        self._lru: LRU[tuple[str, str], VarSchema] = LRU(max_entries)

    def get(self, sid: str, token: str) -> VarSchema | None:
        return self._lru.get((sid, token))

    def put(self, sid: str, schema: VarSchema) -> None:
        self._lru.put_many({(sid, schema.name): schema, (sid, schema.id): schema})

    def drop(self, sid: str, token: str) -> None:
        schema = self._lru.pop((sid, token))
        if schema is not None:
            self._lru.pop((sid, schema.name))
            self._lru.pop((sid, schema.id))


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValidationFailed(
            f"invalid variable name {name!r}: use a letter or _ then up to 127 of "
            "A-Z a-z 0-9 _ . -",
            {"rule": "name", "variable": repr(name)},
        )
    return name


def check_token(token: Any) -> str:
    """A name or id as the caller gave it (anything else cannot name a variable)."""
    if not isinstance(token, str) or not token or len(token) > 160:
        raise VariableNotFound(f"no variable named {token!r}", {"variable": repr(token)})
    return token


def schema_from_fields(
    name: str, meta_raw: str, constraints: str | None, description: str | None
) -> VarSchema:
    """A schema from a variable's stored fields."""
    tag, type_name, _seq, created, *rest = loads(meta_raw)
    return VarSchema(
        id=f"var_{name}_{tag}",
        name=name,
        type=type_name,
        constraints=loads(constraints) if constraints else {},
        description=loads(description) if description else None,
        created_ms=int(created, 36),
        history=int(rest[0]) if rest else 0,
    )


def split_record(record: str) -> tuple[str, int, str]:
    """``<version>:<updated>:<value JSON>`` -> version, updated_ms, value JSON."""
    version, updated, value = record.split(":", 2)
    return version, int(updated, 36), value


def variable_from(
    schema: VarSchema, value: Any, version: int | str, updated_ms: int | str, metadata: Any
) -> Variable:
    return Variable(
        id=schema.id,
        name=schema.name,
        type=schema.type,
        value=value,
        constraints=schema.constraints,
        description=schema.description,
        metadata=loads(metadata) if metadata else {},
        version=int(version),
        created_at=ms_to_datetime(schema.created_ms),
        updated_at=ms_to_datetime(updated_ms),
    )
