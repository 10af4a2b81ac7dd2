"""Variable history and rollback; session snapshots and all-or-nothing restore.

A variable keeps its N most recent versions, the current one included
(``register_variable(..., history=N)``, default ``DSPEX_VARIABLE_HISTORY``). A rollback
writes an old value as a **new** version, and a restore writes every changed value as a
new version too: versions never go backwards, so no compare-and-set writer and no watcher
can be fooled by a version number used twice for different values.

A snapshot is a JSON document (``SNAPSHOT_FORMAT``) of the session's variables (with
their ids, versions, types, constraints, descriptions, metadata and history depth), its
programs and its LM settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dspex_tasks.errors import (
    HistoryUnavailable,
    ValidationFailed,
    VariableNotFound,
    VersionConflict,
)
from dspex_tasks.keys import check_program_id, check_session_id
from dspex_tasks.lm.params import validate_lm_settings
from dspex_tasks.specs import normalize_spec
from dspex_tasks.store.codec import decode_stored, dumps, encode_stored, loads
from dspex_tasks.store.models import Variable, VariableVersion, ms_to_datetime
from dspex_tasks.store.scripts import RESTORE_ARGS_PER_VARIABLE, Status
from dspex_tasks.store.variables import VariablesMixin
from dspex_tasks.store.varschema import (
    ID_RE,
    check_name,
    check_token,
    schema_from_fields,
    split_record,
    variable_from,
)
from dspex_tasks.types import check_constraints, decode_value, encode_value, validate_value

__all__ = ["SNAPSHOT_FORMAT", "HistoryMixin"]

SNAPSHOT_FORMAT = "dspex.snapshot/1"


def _bad_snapshot(message: str, **details: Any) -> ValidationFailed:
    return ValidationFailed(f"invalid snapshot: {message}", {"rule": "snapshot", **details})


class HistoryMixin(VariablesMixin):
    """Kept versions of variables, rollback, snapshot and restore."""

    def variable_history(
        self, session_id: str, name_or_id: str, *, limit: int | None = None
    ) -> list[VariableVersion]:
        """The kept versions of a variable, newest first (the current one included)."""
        sid = check_session_id(session_id)
        token = check_token(name_or_id)
        reply = self._session_script("GET_VARIABLE_HISTORY", sid, True, token)
        if reply[0] == Status.NOVAR:
            raise VariableNotFound(
                f"session {sid!r} has no variable {token!r}", {"variable": token}
            )
        type_name = loads(reply[1])[1]
        versions = [_version(type_name, reply[2], reply[3] or None)]
        for entry in loads(reply[4]) if reply[4] else []:
            if isinstance(entry, list):
                versions.append(_version(type_name, entry[0], entry[1]))
            else:
                versions.append(_version(type_name, entry, None))
        return versions if limit is None else versions[: max(0, limit)]

    def rollback_variable(
        self,
        session_id: str,
        name_or_id: str,
        version: int,
        *,
        expected_version: int | None = None,
    ) -> Variable:
        """Write the value the variable had at ``version`` as a new version.

        Raises:
            HistoryUnavailable (that version was not kept), VariableNotFound,
            VersionConflict (``expected_version`` differs), SessionNotFound.
        """
        sid = check_session_id(session_id)
        token = check_token(name_or_id)
        for value, what in ((version, "version"), (expected_version, "expected_version")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValidationFailed(f"{what} must be an integer, got {value!r}", {"rule": what})
        reply = self._session_script(
            "ROLLBACK_VARIABLE",
            sid,
            True,
            token,
            version,
            "" if expected_version is None else expected_version,
        )
        if reply[0] == Status.NOVAR:
            raise VariableNotFound(
                f"session {sid!r} has no variable {token!r}", {"variable": token}
            )
        if reply[0] == Status.CONFLICT:
            raise VersionConflict(
                f"variable {token!r} is at version {reply[1]}, expected {expected_version}",
                {
                    "variable": token,
                    "current_version": int(reply[1]),
                    "expected_version": expected_version,
                },
            )
        if reply[0] == Status.NOHISTORY:
            raise HistoryUnavailable(
                f"variable {token!r} kept no version {version} (it is at {reply[1]})",
                {"variable": token, "version": version, "current_version": int(reply[1])},
            )
        schema = self._schemas.get(sid, token)
        if schema is None:
            current = self.get_variable(sid, token)
            return current
        value = decode_stored(schema.type, loads(reply[2]))
        return variable_from(schema, value, reply[1], reply[4], reply[3])

    # --- snapshot / restore ----------------------------------------------------------

    def snapshot(self, session_id: str) -> dict[str, Any]:
        """The session's variables, programs and LM settings as one JSON document."""
        sid = check_session_id(session_id)
        reply = self._session_script("SNAPSHOT", sid, True)
        fields = dict(zip(reply[1][::2], reply[1][1::2], strict=True))
        variables = []
        for key, meta in fields.items():
            if not key.startswith("m:"):
                continue
            name = key[2:]
            schema = schema_from_fields(
                name, meta, fields.get(f"c:{name}"), fields.get(f"s:{name}")
            )
            version, _updated, value = split_record(fields[name])
            metadata = fields.get(f"d:{name}")
            variables.append(
                (
                    int(loads(meta)[2]),
                    {
                        "name": name,
                        "id": schema.id,
                        "type": schema.type,
                        "value": encode_value(
                            schema.type, decode_stored(schema.type, loads(value))
                        ),
                        "constraints": schema.constraints,
                        "description": schema.description,
                        "metadata": loads(metadata) if metadata else {},
                        "version": int(version),
                        "history": schema.history,
                    },
                )
            )
        variables.sort(key=lambda item: item[0])
        programs = dict(zip(reply[2][::2], reply[2][1::2], strict=True))
        record = dict(zip(reply[3][::2], reply[3][1::2], strict=True))
        return {
            "format": SNAPSHOT_FORMAT,
            "session_id": sid,
            "variables": [v for _, v in variables],
            "programs": {pid: loads(spec) for pid, spec in sorted(programs.items())},
            "lm": loads(record.get("lm") or "{}"),
        }

    def restore(self, session_id: str, snapshot: Mapping[str, Any]) -> None:
        """Make the session's variables, programs and LM settings those of ``snapshot``.

        Everything is validated first (types, constraints, values, program specs, LM
        settings); one script then applies it all. On any error nothing changes.

        Raises:
            ValidationFailed (not a snapshot of this format, or a value that breaks its
            type), InvalidProgram, SessionNotFound, PayloadTooLarge.
        """
        sid = check_session_id(session_id)
        if not isinstance(snapshot, Mapping) or snapshot.get("format") != SNAPSHOT_FORMAT:
            raise _bad_snapshot(f"expected format {SNAPSHOT_FORMAT!r}")
        args: list[Any] = [dumps(self._snapshot_lm(snapshot.get("lm")))]
        variables = snapshot.get("variables")
        if not isinstance(variables, list):
            raise _bad_snapshot("'variables' must be a list")
        args.append(len(variables))
        seen: set[str] = set()
        for item in variables:
            record = self._snapshot_variable(item)
            if record[0] in seen:
                raise _bad_snapshot(f"variable {record[0]!r} appears twice")
            seen.add(record[0])
            assert len(record) == RESTORE_ARGS_PER_VARIABLE
            args.extend(record)
        programs = snapshot.get("programs")
        if not isinstance(programs, Mapping):
            raise _bad_snapshot("'programs' must be an object")
        args.append(len(programs))
        for pid, spec in programs.items():
            args.extend([check_program_id(pid), dumps(normalize_spec(spec))])
        args.append(self.program_versions_kept)
        self._session_script("RESTORE", sid, True, *args)
        for name in seen:
            self._schemas.drop(sid, name)

    def _snapshot_lm(self, lm: Any) -> dict[str, Any]:
        if not isinstance(lm, Mapping):
            raise _bad_snapshot("'lm' must be an object")
        if not lm:
            return {}
        params = lm.get("params") or {}
        if not isinstance(params, Mapping):
            raise _bad_snapshot("'lm.params' must be an object")
        return validate_lm_settings(str(lm.get("profile") or "default"), dict(params))

    def _snapshot_variable(self, item: Any) -> list[Any]:
        if not isinstance(item, Mapping):
            raise _bad_snapshot("every variable must be an object")
        name = check_name(item.get("name"))
        match = ID_RE.fullmatch(str(item.get("id")))
        if match is None or match.group(1) != name:
            raise _bad_snapshot(f"variable {name!r} has no valid id", variable=name)
        type_name = item.get("type")
        if not isinstance(type_name, str):
            raise _bad_snapshot(f"variable {name!r} has no type", variable=name)
        constraints = check_constraints(name, type_name, item.get("constraints"))
        value = validate_value(
            name, type_name, decode_value(type_name, item.get("value")), constraints
        )
        description = item.get("description")
        if description is not None and not isinstance(description, str):
            raise _bad_snapshot(f"variable {name!r}: description must be a string", variable=name)
        metadata = item.get("metadata") or {}
        version, history = item.get("version"), item.get("history", self.default_history)
        for number, what in ((version, "version"), (history, "history")):
            if isinstance(number, bool) or not isinstance(number, int) or number < 0:
                raise _bad_snapshot(f"variable {name!r}: {what} must be an integer", variable=name)
        definition = f"variable {name!r} definition"
        return [
            name,
            match.group(2),
            dumps(type_name),
            self._encode_limited(constraints, definition) if constraints else "",
            self._encode_limited(description, definition) if description is not None else "",
            self._encode_limited(encode_stored(type_name, value), f"variable {name!r}"),
            self._object_json(metadata, f"variable {name!r} metadata") if metadata else "",
            version,
            history,
        ]


def _version(type_name: str, record: str, run: str | None) -> VariableVersion:
    version, updated_ms, value = split_record(record)
    return VariableVersion(
        version=int(version),
        value=decode_stored(type_name, loads(value)),
        updated_at=ms_to_datetime(updated_ms),
        run_id=run,
    )
