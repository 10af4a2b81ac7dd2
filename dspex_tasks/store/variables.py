"""Typed session variables: register, read, compare-and-set, batch, export/import.

Validation runs here, in the caller's process, against the variable's type and stored
constraints; the write itself is one Lua script (one round trip) that re-checks the
variable's identity and version atomically.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

from dspex_tasks.errors import (
    DspexError,
    DuplicateDelivery,
    ValidationFailed,
    VariableExists,
    VariableNotFound,
    VersionConflict,
)
from dspex_tasks.keys import check_session_id
from dspex_tasks.store.base import StoreCore, VarSchema, dumps, loads
from dspex_tasks.store.codec import decode_stored, encode_stored
from dspex_tasks.store.models import Variable, ms_to_datetime
from dspex_tasks.types import check_constraints, decode_value, validate_value

__all__ = ["VariablesMixin"]

NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,127}")
_MISSING: Any = object()
#: Attempts when a cached schema turns out stale (a variable deleted and re-registered).
_STALE_RETRIES = 3


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValidationFailed(
            f"invalid variable name {name!r}: use a letter or _ then up to 127 of "
            "A-Z a-z 0-9 _ . -",
            {"rule": "name", "variable": repr(name)},
        )
    return name


def _token(token: Any) -> str:
    if not isinstance(token, str) or not token or len(token) > 160:
        raise VariableNotFound(f"no variable named {token!r}", {"variable": repr(token)})
    return token


def _schema_from_fields(
    name: str, meta_raw: str, constraints: str | None, description: str | None
) -> VarSchema:
    """A schema from a variable's stored fields (layout: ``store/scripts.py``)."""
    tag, type_name, _seq, created = loads(meta_raw)
    return VarSchema(
        id=f"var_{name}_{tag}",
        name=name,
        type=type_name,
        constraints=loads(constraints) if constraints else {},
        description=loads(description) if description else None,
        created_ms=int(created, 36),
    )


def _split_record(record: str) -> tuple[str, int, str]:
    """``<version>:<updated>:<value JSON>`` -> version, updated_ms, value JSON."""
    version, updated, value = record.split(":", 2)
    return version, int(updated, 36), value


def _variable(
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


def _failure(name: str, error: DspexError) -> dict[str, Any]:
    return {"code": error.code, "message": error.message}


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
    ) -> list[Any]:
        _check_name(name)
        cons = check_constraints(name, type, constraints)
        normalized = validate_value(name, type, value, cons)
        if description is not None and not isinstance(description, str):
            raise ValidationFailed(f"variable {name!r}: description must be a string")
        definition = f"variable {name!r} definition"
        metadata_json = self._object_json(metadata, f"variable {name!r} metadata")
        value_json = self._encode_limited(encode_stored(type, normalized), f"variable {name!r}")
        # 48 random bits per registration: the id of a deleted variable never resolves to
        # a later one of the same name, so a stale cached schema is always detected.
        return [
            name,
            secrets.token_hex(6),
            dumps(type),
            self._encode_limited(cons, definition) if cons else "",
            self._encode_limited(description, definition) if description is not None else "",
            value_json,
            metadata_json if metadata else "",
        ]

    def _register(self, sid: str, prepared: list[list[Any]]) -> list[Variable]:
        args: list[Any] = [len(prepared)]
        for item in prepared:
            args.extend(item)
        reply = self._session_script("REGISTER_VARIABLES", sid, True, *args)
        if reply[0] == "exists":
            taken = list(reply[1])
            raise VariableExists(
                f"session {sid!r} already has variable(s) {', '.join(map(repr, taken))}",
                {"variables": taken},
            )
        now_ms = int(reply[1])
        out = []
        for name, tag, type_json, cons, description, value_json, metadata in prepared:
            schema = VarSchema(
                id=f"var_{name}_{tag}",
                name=name,
                type=loads(type_json),
                constraints=loads(cons) if cons else {},
                description=loads(description) if description else None,
                created_ms=now_ms,
            )
            self._schemas.put(sid, schema)
            value = decode_stored(schema.type, loads(value_json))
            out.append(_variable(schema, value, 1, now_ms, metadata))
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
    ) -> Variable:
        """Register a typed variable at version 1.

        Raises:
            ValidationFailed (bad name, constraints or value), UnknownType,
            VariableExists, SessionNotFound, PayloadTooLarge.
        """
        sid = check_session_id(session_id)
        prepared = self._prepare_registration(name, type, value, constraints, description, metadata)
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
                schema = _schema_from_fields(name, meta, constraints, description)
                self._schemas.put(sid, schema)
            version, updated_ms, value = _split_record(record)
            out.append(
                _variable(
                    schema, decode_stored(schema.type, loads(value)), version, updated_ms, metadata
                )
            )
        return out

    def get_variable(self, session_id: str, name_or_id: str, *, touch: bool = True) -> Variable:
        """Return a variable by name or id. Raises ``VariableNotFound``."""
        sid = check_session_id(session_id)
        token = _token(name_or_id)
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
            schema = _schema_from_fields(
                name, meta, fields.get(f"c:{name}"), fields.get(f"s:{name}")
            )
            version, updated_ms, value = _split_record(fields[name])
            variable = _variable(
                schema,
                decode_stored(schema.type, loads(value)),
                version,
                updated_ms,
                fields.get(f"d:{name}"),
            )
            rows.append((int(loads(meta)[2]), variable))
        rows.sort(key=lambda r: r[0])
        return [v for _, v in rows]

    # --- write -------------------------------------------------------------------------

    def _schema(self, sid: str, token: str) -> VarSchema:
        schema = self._schemas.get(sid, token)
        if schema is None:
            found = self._fetch(sid, [token])[0]
            if found is None:
                raise VariableNotFound(
                    f"session {sid!r} has no variable {token!r}", {"variable": token}
                )
            schema = self._schemas.get(sid, token)
            assert schema is not None
        return schema

    def _write_args(
        self, schema: VarSchema, value: Any, expected_version: int | None, metadata: Any
    ) -> tuple[Any, list[Any]]:
        normalized = validate_value(schema.name, schema.type, value, schema.constraints)
        value_json = self._encode_limited(
            encode_stored(schema.type, normalized), f"variable {schema.name!r}"
        )
        if expected_version is not None and (
            isinstance(expected_version, bool) or not isinstance(expected_version, int)
        ):
            raise ValidationFailed(
                f"expected_version must be an integer, got {expected_version!r}",
                {"rule": "expected_version"},
            )
        return normalized, [
            schema.id,
            value_json,
            "" if expected_version is None else expected_version,
            self._object_json(metadata, f"variable {schema.name!r} metadata")
            if metadata is not None
            else "",
        ]

    def update_variable(
        self,
        session_id: str,
        name_or_id: str,
        value: Any,
        *,
        expected_version: int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Variable:
        """Validate and write a new value; the version grows by 1.

        With ``expected_version`` the write is a compare-and-set.

        Raises:
            VariableNotFound, ValidationFailed, VersionConflict, PayloadTooLarge,
            SessionNotFound.
        """
        result = self._update_many(
            check_session_id(session_id),
            [(_token(name_or_id), value, expected_version, metadata)],
            atomic=True,
        )
        item = result[0]
        if isinstance(item, DspexError):
            raise item
        return item

    def update_variables(
        self,
        session_id: str,
        values: Mapping[str, Any],
        *,
        atomic: bool = True,
        expected_versions: Mapping[str, int] | None = None,
        task_id: str | None = None,
        task_result: Any = None,
    ) -> dict[str, Variable | DspexError]:
        """Write many variables in one round trip.

        Atomic (default): every value is validated and every version checked first; all
        are written or none, and the raised error's ``details["failures"]`` gives the
        reason per name. Non-atomic: each name is written if it passes; the result maps
        each name to its new ``Variable`` or to the error that stopped it.

        ``task_id`` makes the write happen at most once for that task (a redelivered
        task raises ``DuplicateDelivery`` carrying the first run's ``task_result``, which
        may be passed already JSON-encoded as bytes).
        """
        sid = check_session_id(session_id)
        if not isinstance(values, Mapping):
            raise ValidationFailed("values must be a mapping of name -> value")
        versions = expected_versions or {}
        items = [(_token(n), v, versions.get(n), None) for n, v in values.items()]
        if not items:
            return {}
        result = self._update_many(
            sid,
            items,
            atomic=atomic,
            task_id=task_id,
            task_result=(
                (task_result if isinstance(task_result, bytes) else dumps(task_result))
                if task_id
                else None
            ),
        )
        out: dict[str, Variable | DspexError] = {}
        failures: dict[str, Any] = {}
        for (name, _, _, _), item in zip(items, result, strict=True):
            out[name] = item
            if isinstance(item, DspexError):
                failures[name] = _failure(name, item)
        if atomic and failures:
            raise _batch_error(sid, failures, [r for r in result if isinstance(r, DspexError)])
        return out

    def _update_many(
        self,
        sid: str,
        items: Sequence[tuple[str, Any, int | None, Any]],
        *,
        atomic: bool,
        task_id: str | None = None,
        task_result: bytes | None = None,
    ) -> list[Variable | DspexError]:
        pending = list(range(len(items)))
        results: list[Variable | DspexError | None] = [None] * len(items)
        for _ in range(_STALE_RETRIES):
            cached = {
                items[i][0] for i in pending if self._schemas.get(sid, items[i][0]) is not None
            }
            self._prime_schemas(sid, [items[i][0] for i in pending])
            args: list[Any] = []
            sent: list[tuple[int, VarSchema, Any]] = []
            for i in pending:
                token, value, expected, metadata = items[i]
                schema = self._schemas.get(sid, token)
                if schema is None:
                    results[i] = VariableNotFound(
                        f"session {sid!r} has no variable {token!r}", {"variable": token}
                    )
                    continue
                try:
                    normalized, write = self._write_args(schema, value, expected, metadata)
                except DspexError as e:
                    # A cached schema may be stale (the name deleted and re-registered,
                    # maybe with another type, by another process): judge the value by
                    # the stored schema before rejecting it.
                    current = self._reload_schema(sid, token) if token in cached else schema
                    if current is None:
                        results[i] = VariableNotFound(
                            f"session {sid!r} has no variable {token!r}", {"variable": token}
                        )
                        continue
                    if current.id == schema.id:
                        results[i] = e
                        continue
                    schema = current
                    try:
                        normalized, write = self._write_args(schema, value, expected, metadata)
                    except DspexError as e2:
                        results[i] = e2
                        continue
                args.extend([token, *write])
                sent.append((i, schema, normalized))
            if atomic and any(isinstance(r, DspexError) for r in results):
                break
            if not sent:
                break
            reply = self._session_script(
                "UPDATE_VARIABLES",
                sid,
                True,
                "1" if atomic else "0",
                task_id or "",
                int(self.idempotency_keep_s * 1000),
                task_result or "",
                len(sent),
                *args,
            )
            if reply[0] == "duplicate":
                raise DuplicateDelivery(
                    f"task {task_id} already wrote its outputs", {"result": reply[1]}
                )
            rows = reply[1]
            now_ms = reply[2] if reply[0] == "ok" else 0
            pending = []
            for (i, schema, normalized), row in zip(sent, rows, strict=True):
                status = row[0]
                token, _, expected, _ = items[i]
                if status == "ok":
                    results[i] = _variable(schema, normalized, row[1], now_ms, row[2])
                elif status == "stale":
                    self._schemas.drop(sid, token)
                    pending.append(i)
                elif status == "novar":
                    self._schemas.drop(sid, token)
                    results[i] = VariableNotFound(
                        f"session {sid!r} has no variable {token!r}", {"variable": token}
                    )
                elif status == "conflict":
                    results[i] = VersionConflict(
                        f"variable {schema.name!r} is at version {row[1]}, expected {expected}",
                        {
                            "variable": schema.name,
                            "current_version": int(row[1]),
                            "expected_version": expected,
                        },
                    )
                else:  # "skipped": an atomic batch stopped by another variable
                    results[i] = VersionConflict(
                        f"variable {schema.name!r} was not written: another variable in the "
                        "atomic batch failed",
                        {"variable": schema.name, "rule": "batch_aborted"},
                    )
            if not pending:
                break
            if atomic:
                # A stale schema in an atomic batch: nothing was written; retry all of it.
                pending = [i for i, _, _ in sent]
                for i in pending:
                    results[i] = None
        aborted = atomic and any(isinstance(r, DspexError) for r in results)
        final: list[Variable | DspexError] = []
        for i, r in enumerate(results):
            if r is None and aborted:
                r = VersionConflict(
                    f"variable {items[i][0]!r} was not written: another variable in the "
                    "atomic batch failed",
                    {"variable": items[i][0], "rule": "batch_aborted"},
                )
            elif r is None:
                r = VersionConflict(
                    f"variable {items[i][0]!r} kept changing identity during the write",
                    {"variable": items[i][0]},
                )
            final.append(r)
        return final

    def _reload_schema(self, sid: str, token: str) -> VarSchema | None:
        """Drop the cached schema of ``token`` and load the stored one (None: no such)."""
        self._schemas.drop(sid, token)
        self._fetch(sid, [token])
        return self._schemas.get(sid, token)

    def _prime_schemas(self, sid: str, tokens: Sequence[str]) -> None:
        """Load the schemas the cache lacks, in one round trip."""
        unknown = [t for t in tokens if self._schemas.get(sid, t) is None]
        if unknown:
            self._fetch(sid, unknown)

    def delete_variable(self, session_id: str, name_or_id: str) -> None:
        """Delete a variable. Raises ``VariableNotFound``."""
        sid = check_session_id(session_id)
        token = _token(name_or_id)
        reply = self._session_script("DELETE_VARIABLE", sid, True, token)
        self._schemas.drop(sid, token)
        if reply[0] == "novar":
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


def _batch_error(sid: str, failures: dict[str, Any], errors: list[DspexError]) -> DspexError:
    codes = {e.code for e in errors}
    cls: type[DspexError]
    if "variable_not_found" in codes:
        cls = VariableNotFound
    elif "validation_failed" in codes:
        cls = ValidationFailed
    elif "payload_too_large" in codes:
        cls = type(next(e for e in errors if e.code == "payload_too_large"))
    else:
        cls = VersionConflict
    # The ones stopped only because the batch aborted are not the reason: leave them out
    # of the headline but keep them in the details.
    reasons = [
        f"{name}: {f['message']}"
        for name, f in failures.items()
        if "atomic batch failed" not in f["message"]
    ]
    return cls(
        f"atomic update of session {sid!r} rejected, nothing written: " + "; ".join(reasons),
        {"failures": failures},
    )
