"""Typed session variables: register, read, delete, export/import.

Writes of new values (compare-and-set, batches) are in ``store/varwrites.py``; the
schema cache and row decoding in ``store/varschema.py``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

from dspex_tasks.errors import ValidationFailed, VariableExists, VariableNotFound
from dspex_tasks.keys import check_session_id
from dspex_tasks.store.base import StoreCore
from dspex_tasks.store.codec import decode_stored, dumps, encode_stored, loads
from dspex_tasks.store.models import Variable
from dspex_tasks.store.scripts import REGISTER_ARGS_PER_VARIABLE, Status
from dspex_tasks.store.varschema import (
    VarSchema,
    check_name,
    check_token,
    schema_from_fields,
    split_record,
    variable_from,
)
from dspex_tasks.types import check_constraints, decode_value, validate_value

__all__ = ["VariablesMixin"]

_MISSING: Any = object()
#: Registrations whose random tag collided with a live name (2**-48 each) draw again.
_RETAG_ATTEMPTS = 3


def _new_tag() -> str:
    # 48 random bits per registration: the id of a deleted variable never resolves to a
    # later one of the same name, so a stale cached schema is always detected.
    return secrets.token_hex(6)


class VariablesMixin(StoreCore):
    """Variables of the Snakepit type system, versioned, with compare-and-set."""

    # --- register ----------------------------------------------------------------------

    def _prepare_registration(
        self,
        name: str,
        type: str,
        value: Any,
        constraints: Mapping[str, Any] | None,
        description: str | None,
        metadata: Mapping[str, Any] | None,
        history: int | None = None,
    ) -> list[Any]:
        check_name(name)
        depth = self.default_history if history is None else history
        if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= 1000:
            raise ValidationFailed(
                f"variable {name!r}: history must be an integer from 0 to 1000, got {history!r}",
                {"rule": "history", "variable": name},
            )
        cons = check_constraints(name, type, constraints)
        normalized = validate_value(name, type, value, cons)
        if description is not None and not isinstance(description, str):
            raise ValidationFailed(f"variable {name!r}: description must be a string")
        definition = f"variable {name!r} definition"
        metadata_json = self._object_json(metadata, f"variable {name!r} metadata")
        value_json = self._encode_limited(encode_stored(type, normalized), f"variable {name!r}")
        return [
            name,
            _new_tag(),
            dumps(type),
            self._encode_limited(cons, definition) if cons else "",
            self._encode_limited(description, definition) if description is not None else "",
            value_json,
            metadata_json if metadata else "",
            depth,
        ]

    def _register(self, sid: str, prepared: list[list[Any]]) -> list[Variable]:
        for _ in range(_RETAG_ATTEMPTS):
            args: list[Any] = [len(prepared)]
            for item in prepared:
                assert len(item) == REGISTER_ARGS_PER_VARIABLE
                args.extend(item)
            reply = self._session_script("REGISTER_VARIABLES", sid, True, *args)
            if reply[0] != Status.RETAG:
                break
            for item in prepared:
                item[1] = _new_tag()
        if reply[0] == Status.ISID:
            ids = list(reply[1])
            raise ValidationFailed(
                f"invalid variable name(s) {', '.join(map(repr, ids))}: the id of another "
                "variable of the session",
                {"rule": "name", "variables": ids},
            )
        if reply[0] == Status.EXISTS:
            taken = list(reply[1])
            raise VariableExists(
                f"session {sid!r} already has variable(s) {', '.join(map(repr, taken))}",
                {"variables": taken},
            )
        now_ms = int(reply[1])
        out = []
        for name, tag, type_json, cons, description, value_json, metadata, depth in prepared:
            schema = VarSchema(
                id=f"var_{name}_{tag}",
                name=name,
                type=loads(type_json),
                constraints=loads(cons) if cons else {},
                description=loads(description) if description else None,
                created_ms=now_ms,
                history=depth,
            )
            self._schemas.put(sid, schema)
            value = decode_stored(schema.type, loads(value_json))
            out.append(variable_from(schema, value, 1, now_ms, metadata))
        return out

    def register_variable(
        self,
        session_id: str,
        name: str,
        type: str,
        value: Any,
        *,
        constraints: Mapping[str, Any] | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        history: int | None = None,
    ) -> Variable:
        """Register a typed variable at version 1.

        ``history``: how many versions to keep, the current one included (default
        ``DSPEX_VARIABLE_HISTORY``; 0 keeps none), for ``variable_history`` and
        ``rollback_variable``.

        Raises:
            ValidationFailed (bad name, constraints or value), UnknownType,
            VariableExists, SessionNotFound, PayloadTooLarge.
        """
        sid = check_session_id(session_id)
        prepared = self._prepare_registration(
            name, type, value, constraints, description, metadata, history
        )
        return self._register(sid, [prepared])[0]

    # --- read --------------------------------------------------------------------------

    def _fetch(
        self, sid: str, tokens: Sequence[str], *, touch: bool = True
    ) -> list[Variable | None]:
        reply = self._session_script("GET_VARIABLES", sid, touch, *tokens)
        return self._variables_from_rows(sid, tokens, reply[1])

    def _variables_from_rows(
        self, sid: str, tokens: Sequence[str], rows: Sequence[Any]
    ) -> list[Variable | None]:
        out: list[Variable | None] = []
        for token, row in zip(tokens, rows, strict=True):
            if not row:
                out.append(None)
                continue
            name, meta, record, constraints, description, metadata = row
            schema = self._schemas.get(sid, token)
            if schema is None or schema.id != f"var_{name}_{loads(meta)[0]}":
                # Ids are never reused and a schema never changes: parse it once.
                schema = schema_from_fields(name, meta, constraints, description)
                self._schemas.put(sid, schema)
            version, updated_ms, value = split_record(record)
            out.append(
                variable_from(
                    schema, decode_stored(schema.type, loads(value)), version, updated_ms, metadata
                )
            )
        return out

    def get_variable(self, session_id: str, name_or_id: str, *, touch: bool = True) -> Variable:
        """Return a variable by name or id. Raises ``VariableNotFound``."""
        sid = check_session_id(session_id)
        token = check_token(name_or_id)
        found = self._fetch(sid, [token], touch=touch)[0]
        if found is None:
            raise VariableNotFound(
                f"session {sid!r} has no variable {token!r}", {"variable": token}
            )
        return found

    def get_value(self, session_id: str, name: str, default: Any = _MISSING) -> Any:
        """Return a variable's value, or ``default`` (when given) if it does not exist."""
        try:
            return self.get_variable(session_id, name).value
        except VariableNotFound:
            if default is _MISSING:
                raise
            return default

    def get_variables(
        self, session_id: str, names: Iterable[str]
    ) -> tuple[dict[str, Variable], list[str]]:
        """Read many variables in one round trip: ``(found by requested name, missing)``."""
        sid = check_session_id(session_id)
        tokens = list(names)
        if not tokens:
            self._session_script("GET_SESSION", sid, True)
            return {}, []
        for t in tokens:
            if not isinstance(t, str):
                raise VariableNotFound(f"no variable named {t!r}", {"variable": repr(t)})
        rows = self._fetch(sid, tokens)
        found = {t: v for t, v in zip(tokens, rows, strict=True) if v is not None}
        missing = [t for t, v in zip(tokens, rows, strict=True) if v is None]
        return found, missing

    def list_variables(self, session_id: str, pattern: str = "*") -> list[Variable]:
        """Variables whose name matches the glob ``pattern``, in creation order."""
        sid = check_session_id(session_id)
        if not isinstance(pattern, str):
            raise ValidationFailed(f"pattern must be a string, got {pattern!r}")
        reply = self._session_script("LIST_VARIABLES", sid, True)
        flat = reply[1]
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        rows = []
        for key, meta in fields.items():
            if not key.startswith("m:") or not fnmatchcase(key[2:], pattern):
                continue
            name = key[2:]
            schema = schema_from_fields(
                name, meta, fields.get(f"c:{name}"), fields.get(f"s:{name}")
            )
            version, updated_ms, value = split_record(fields[name])
            variable = variable_from(
                schema,
                decode_stored(schema.type, loads(value)),
                version,
                updated_ms,
                fields.get(f"d:{name}"),
            )
            rows.append((int(loads(meta)[2]), variable))
        rows.sort(key=lambda r: r[0])
        return [v for _, v in rows]

    def delete_variable(self, session_id: str, name_or_id: str) -> None:
        """Delete a variable. Raises ``VariableNotFound``."""
        sid = check_session_id(session_id)
        token = check_token(name_or_id)
        reply = self._session_script("DELETE_VARIABLE", sid, True, token)
        self._schemas.drop(sid, token)
        if reply[0] == Status.NOVAR:
            raise VariableNotFound(
                f"session {sid!r} has no variable {token!r}", {"variable": token}
            )

    # --- export / import ---------------------------------------------------------------

    def export_variables(self, session_id: str) -> dict[str, Any]:
        """A JSON document of the session's variables (``import_variables`` takes it)."""
        variables = self.list_variables(session_id)
        return {"session_id": session_id, "variables": [v.to_dict() for v in variables]}

    def import_variables(self, session_id: str, document: Mapping[str, Any]) -> list[Variable]:
        """Register every variable of an export, all or nothing (versions restart at 1)."""
        sid = check_session_id(session_id)
        items = document.get("variables") if isinstance(document, Mapping) else None
        if not isinstance(items, list):
            raise ValidationFailed("import document needs a 'variables' list")
        prepared = []
        for item in items:
            if not isinstance(item, Mapping):
                raise ValidationFailed("every imported variable must be an object")
            type_name = item.get("type")
            prepared.append(
                self._prepare_registration(
                    item.get("name"),  # type: ignore[arg-type]
                    type_name,  # type: ignore[arg-type]
                    decode_value(str(type_name), item.get("value")),
                    item.get("constraints"),
                    item.get("description"),
                    item.get("metadata"),
                )
            )
        if not prepared:
            self._session_script("GET_SESSION", sid, True)
            return []
        return self._register(sid, prepared)
