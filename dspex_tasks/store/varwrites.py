"""Writing variable values: single and batch updates, compare-and-set, at-most-once.

Validation runs here, in the caller's process, against the variable's type and stored
constraints (from the per-process schema cache); the write itself is one Lua script (one
round trip) that re-checks each variable's identity and version atomically. A cached
schema that turns out stale (the name deleted and re-registered elsewhere) makes the
script answer ``stale`` for it, and the write is prepared again from the stored schema.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dspex_tasks.errors import (
    DspexError,
    DuplicateDelivery,
    ValidationFailed,
    VariableNotFound,
    VersionConflict,
)
from dspex_tasks.keys import check_session_id
from dspex_tasks.store.codec import dumps, encode_stored, loads
from dspex_tasks.store.models import Variable
from dspex_tasks.store.scripts import UPDATE_ARGS_PER_VARIABLE, Status
from dspex_tasks.store.variables import VariablesMixin
from dspex_tasks.store.varschema import VarSchema, check_token, variable_from
from dspex_tasks.types import validate_value

__all__ = ["VariableWritesMixin"]

#: Round trips before giving up on a write whose variable keeps changing under it: a
#: cached schema turned stale (deleted and re-registered), or the metadata a patch was
#: merged into was changed by another writer. Each round some writer of the contended
#: variable succeeds, so this bounds the writers racing on one variable's metadata, not
#: the chance of success of a lone writer (who needs two rounds).
_STALE_RETRIES = 32
#: Stands for "stored metadata not known yet": never equal to a stored value, so the
#: script answers ``metastale`` with the stored metadata, and the patch is merged into it.
_UNKNOWN_BASE = "?"

#: One requested write: (name or id, value, expected version, metadata patch).
WriteItem = tuple[str, Any, "int | None", Any]


@dataclass
class _Attempt:
    """One round trip's worth of a batch: the script's arguments and what they are for."""

    args: list[Any] = field(default_factory=list)
    #: (index in the batch, schema written against, normalized value)
    sent: list[tuple[int, VarSchema, Any]] = field(default_factory=list)


def _not_found(sid: str, token: str) -> VariableNotFound:
    return VariableNotFound(f"session {sid!r} has no variable {token!r}", {"variable": token})


def _aborted(name: str) -> VersionConflict:
    return VersionConflict(
        f"variable {name!r} was not written: another variable in the atomic batch failed",
        {"variable": name, "rule": "batch_aborted"},
    )


class VariableWritesMixin(VariablesMixin):
    """New values for existing variables; every accepted write is version + 1."""

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
            [(check_token(name_or_id), value, expected_version, metadata)],
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
        run_id: str | None = None,
    ) -> dict[str, Variable | DspexError]:
        """Write many variables in one round trip.

        Atomic (default): every value is validated and every version checked first; all
        are written or none, and the raised error's ``details["failures"]`` gives the
        reason per name. Non-atomic: each name is written if it passes; the result maps
        each name to its new ``Variable`` or to the error that stopped it.

        ``task_id`` makes the write happen at most once for that task (a redelivered
        task raises ``DuplicateDelivery`` carrying the first run's ``task_result``, which
        may be passed already JSON-encoded as bytes).

        ``run_id``: the run writing (a tool during a run): its events say so, and what it
        replaced is kept until the run ends, so a rollback can put it back.
        """
        sid = check_session_id(session_id)
        if not isinstance(values, Mapping):
            raise ValidationFailed("values must be a mapping of name -> value")
        versions = expected_versions or {}
        items: list[WriteItem] = [
            (check_token(n), v, versions.get(n), None) for n, v in values.items()
        ]
        if not items:
            return {}
        encoded_result = None
        if task_id:
            encoded_result = task_result if isinstance(task_result, bytes) else dumps(task_result)
        result = self._update_many(
            sid,
            items,
            atomic=atomic,
            task_id=task_id,
            task_result=encoded_result,
            run_id=run_id,
        )
        out: dict[str, Variable | DspexError] = {}
        failures: dict[str, Any] = {}
        for (name, _, _, _), item in zip(items, result, strict=True):
            out[name] = item
            if isinstance(item, DspexError):
                failures[name] = {"code": item.code, "message": item.message}
        if atomic and failures:
            raise _batch_error(sid, failures, [r for r in result if isinstance(r, DspexError)])
        return out

    # --- the write path: prepare, send, read the replies, retry the stale ----------------

    def _update_many(
        self,
        sid: str,
        items: Sequence[WriteItem],
        *,
        atomic: bool,
        task_id: str | None = None,
        task_result: bytes | None = None,
        run_id: str | None = None,
    ) -> list[Variable | DspexError]:
        pending = list(range(len(items)))
        results: list[Variable | DspexError | None] = [None] * len(items)
        #: Per item with a metadata patch: the stored metadata JSON it is merged into.
        bases: dict[int, str] = {}
        for _ in range(_STALE_RETRIES):
            attempt = self._prepare_writes(sid, items, pending, results, bases)
            if not attempt.sent or (atomic and any(isinstance(r, DspexError) for r in results)):
                break
            reply = self._session_script(
                "UPDATE_VARIABLES",
                sid,
                True,
                "1" if atomic else "0",
                task_id or "",
                int(self.idempotency_keep_s * 1000),
                task_result or "",
                len(attempt.sent),
                run_id or "",
                *attempt.args,
            )
            if reply[0] == Status.DUPLICATE:
                raise DuplicateDelivery(
                    f"task {task_id} already wrote its outputs", {"result": reply[1]}
                )
            now_ms = reply[2] if reply[0] == Status.OK else 0
            pending = self._read_rows(sid, items, attempt, reply[1], now_ms, results, bases)
            if not pending:
                break
            if atomic:
                # A stale schema in an atomic batch: nothing was written; retry all of it.
                pending = [i for i, _, _ in attempt.sent]
                for i in pending:
                    results[i] = None
        return _finish(items, results, atomic)

    def _prepare_writes(
        self,
        sid: str,
        items: Sequence[WriteItem],
        pending: Sequence[int],
        results: list[Variable | DspexError | None],
        bases: Mapping[int, str],
    ) -> _Attempt:
        """Validate the pending items against their schemas; failures go into ``results``."""
        cached = {items[i][0] for i in pending if self._schemas.get(sid, items[i][0]) is not None}
        self._prime_schemas(sid, [items[i][0] for i in pending])
        attempt = _Attempt()
        for i in pending:
            token, value, expected, metadata = items[i]
            base = bases.get(i, _UNKNOWN_BASE)
            schema = self._schemas.get(sid, token)
            if schema is None:
                results[i] = _not_found(sid, token)
                continue
            try:
                normalized, write = self._write_args(schema, value, expected, metadata, base)
            except DspexError as e:
                # A cached schema may be stale (the name deleted and re-registered, maybe
                # with another type, by another process): judge the value by the stored
                # schema before rejecting it.
                current = self._reload_schema(sid, token) if token in cached else schema
                if current is None:
                    results[i] = _not_found(sid, token)
                    continue
                if current.id == schema.id:
                    results[i] = e
                    continue
                schema = current
                try:
                    normalized, write = self._write_args(schema, value, expected, metadata, base)
                except DspexError as e2:
                    results[i] = e2
                    continue
            assert len(write) + 1 == UPDATE_ARGS_PER_VARIABLE
            attempt.args.extend([token, *write])
            attempt.sent.append((i, schema, normalized))
        return attempt

    def _read_rows(
        self,
        sid: str,
        items: Sequence[WriteItem],
        attempt: _Attempt,
        rows: Sequence[Any],
        now_ms: int,
        results: list[Variable | DspexError | None],
        bases: dict[int, str],
    ) -> list[int]:
        """Record the script's answer per item; returns the items to send again (stale)."""
        stale = []
        for (i, schema, normalized), row in zip(attempt.sent, rows, strict=True):
            status = row[0]
            token, _, expected, _ = items[i]
            if status == Status.OK:
                results[i] = variable_from(schema, normalized, row[1], now_ms, row[2])
            elif status == Status.STALE:
                self._schemas.drop(sid, token)
                stale.append(i)
            elif status == Status.METASTALE:
                bases[i] = row[2] or ""
                stale.append(i)
            elif status == Status.NOVAR:
                self._schemas.drop(sid, token)
                results[i] = _not_found(sid, token)
            elif status == Status.CONFLICT:
                results[i] = VersionConflict(
                    f"variable {schema.name!r} is at version {row[1]}, expected {expected}",
                    {
                        "variable": schema.name,
                        "current_version": int(row[1]),
                        "expected_version": expected,
                    },
                )
            else:  # "skipped": an atomic batch stopped by another variable
                results[i] = _aborted(schema.name)
        return stale

    def _write_args(
        self,
        schema: VarSchema,
        value: Any,
        expected_version: int | None,
        metadata: Any,
        base: str,
    ) -> tuple[Any, list[Any]]:
        """The normalized value and the script arguments of one write (after the token).

        ``metadata`` is a patch merged into the stored metadata ``base``: keys set to
        ``None`` are removed, the rest replace or add.
        """
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
        if metadata is None:
            return normalized, [schema.id, value_json, _version_arg(expected_version), "", ""]
        what = f"variable {schema.name!r} metadata"
        patch = self._object_json(metadata, what)  # checks it is a JSON object
        merged_json = patch
        if base != _UNKNOWN_BASE:
            merged = dict(loads(base)) if base else {}
            for key, item in loads(patch).items():
                if item is None:
                    merged.pop(key, None)
                else:
                    merged[key] = item
            merged_json = self._object_json(merged, what)
        return normalized, [
            schema.id,
            value_json,
            _version_arg(expected_version),
            merged_json,
            base,
        ]

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


def _version_arg(expected_version: int | None) -> int | str:
    return "" if expected_version is None else expected_version


def _finish(
    items: Sequence[WriteItem], results: Sequence[Variable | DspexError | None], atomic: bool
) -> list[Variable | DspexError]:
    """Fill in the items no reply settled: aborted with the batch, or never stable."""
    aborted = atomic and any(isinstance(r, DspexError) for r in results)
    final: list[Variable | DspexError] = []
    for i, r in enumerate(results):
        if r is None and aborted:
            r = _aborted(items[i][0])
        elif r is None:
            r = VersionConflict(
                f"variable {items[i][0]!r} kept changing during the write",
                {"variable": items[i][0]},
            )
        final.append(r)
    return final


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
