"""Compile state (DESIGN.md §12): stored datasets, program versions and rollback, the
optimization lease of a program under compile, and the compile's checkpoint.

Every write here is one script (``scripts/compile.py``); a program write and the version
it makes, or a commit and the lease it releases, are never seen apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dspex_tasks.compile_request import check_encoded_size, check_examples, check_size
from dspex_tasks.errors import (
    DatasetNotFound,
    HistoryUnavailable,
    OptimizationInProgress,
    ProgramNotFound,
)
from dspex_tasks.keys import check_dataset_name, check_program_id, check_session_id
from dspex_tasks.store.base import dumps, loads, translate_errors
from dspex_tasks.store.models import ms_to_datetime
from dspex_tasks.store.programs import ProgramsMixin
from dspex_tasks.store.scripts import Status

__all__ = ["CompileMixin", "CompileStart", "ProgramVersion", "locked"]


@dataclass(frozen=True)
class ProgramVersion:
    """One kept version of a program: ``score`` and ``run_id`` are set when a compile
    run wrote it, None for a plain store or a rollback."""

    version: int
    created_at: datetime
    score: float | None
    run_id: str | None
    baseline_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The contract's shape: ``{"version", "created_at", "score", "run_id"}``."""
        return {
            "version": self.version,
            "created_at": self.created_at.isoformat(),
            "score": self.score,
            "run_id": self.run_id,
        }


@dataclass(frozen=True)
class CompileStart:
    """What a compile delivery found when it asked for the program's lease.

    ``status``: ``ok`` (lease taken: ``spec`` and the run's ``checkpoint``, if any),
    ``done`` (this run already committed ``committed``), ``running`` (another delivery of
    this run holds a live lease) or ``locked`` (another run holds it: ``holder``).
    """

    status: str
    spec: dict[str, Any] | None = None
    checkpoint: dict[str, Any] | None = None
    committed: ProgramVersion | None = None
    holder: str | None = None


def locked(session_id: str, program_id: str, run_id: str) -> OptimizationInProgress:
    return OptimizationInProgress(
        f"program {program_id!r} of session {session_id!r} is being optimized by run "
        f"{run_id} (pass force=True to write it anyway)",
        {"session_id": session_id, "program_id": program_id, "run_id": run_id},
    )


def _version(entry: list[Any]) -> ProgramVersion:
    def num(value: Any) -> float | None:
        return float(value) if isinstance(value, (int, float)) and value is not False else None

    return ProgramVersion(
        version=int(entry[0]),
        created_at=ms_to_datetime(entry[1]),
        score=num(entry[2]),
        run_id=entry[3] if isinstance(entry[3], str) else None,
        baseline_score=num(entry[4]) if len(entry) > 4 else None,
    )


class CompileMixin(ProgramsMixin):
    """Datasets, program versions and the optimization lease (session-scoped)."""

    def _compile_op(self, sid: str, op: str, pid: str, *args: Any, touch: bool = True) -> Any:
        return self._session_script("COMPILE_OP", sid, touch, op, pid, *args)

    # --- datasets -----------------------------------------------------------------------

    def store_dataset(self, session_id: str, name: str, examples: Any) -> int:
        """Store (or replace) a named list of examples in the session; returns its size.

        Raises:
            InvalidInputs, PayloadTooLarge, SessionNotFound.
        """
        sid, dname = check_session_id(session_id), check_dataset_name(name)
        checked = check_examples(examples, f"dataset {dname!r}")
        raw = dumps(checked)
        check_encoded_size(len(raw), self.max_dataset_bytes, f"dataset {dname!r}")
        self._session_script("DATASET_OP", sid, True, "put", dname, raw)
        return len(checked)

    def get_dataset(self, session_id: str, name: str) -> list[dict[str, Any]]:
        """A stored dataset's examples. Raises ``DatasetNotFound``."""
        sid, dname = check_session_id(session_id), check_dataset_name(name)
        raw = self._session_script("DATASET_OP", sid, True, "get", dname)[1]
        if raw is None:
            raise DatasetNotFound(
                f"session {sid!r} has no dataset {dname!r}", {"session_id": sid, "dataset": dname}
            )
        return list(loads(raw))

    def examples(self, session_id: str, value: Any, what: str) -> list[dict[str, Any]]:
        """A compile's examples: a stored dataset's when ``value`` names one (its size was
        checked when it was stored), else ``value`` itself, checked and size-limited.

        Raises:
            InvalidInputs, PayloadTooLarge, DatasetNotFound, SessionNotFound.
        """
        if isinstance(value, str):
            return self.get_dataset(session_id, value)
        return check_size(check_examples(value, what), self.max_dataset_bytes, what)

    def list_datasets(self, session_id: str) -> list[str]:
        sid = check_session_id(session_id)
        return sorted(self._session_script("DATASET_OP", sid, True, "list", "_")[1])

    def delete_dataset(self, session_id: str, name: str) -> bool:
        sid, dname = check_session_id(session_id), check_dataset_name(name)
        return bool(self._session_script("DATASET_OP", sid, True, "del", dname)[1])

    # --- versions -----------------------------------------------------------------------

    def program_versions(
        self, session_id: str, program_id: str, *, limit: int | None = None
    ) -> list[ProgramVersion]:
        """The kept versions of a program, newest first (``DSPEX_PROGRAM_HISTORY``)."""
        sid, pid = check_session_id(session_id), check_program_id(program_id)
        raw = self._compile_op(sid, "history", pid)[1]
        if not raw:
            if pid not in self.list_programs(sid):
                raise ProgramNotFound(
                    f"session {sid!r} has no program {pid!r}", {"program_id": pid}
                )
            return []
        versions = [_version(e) for e in loads(raw)]
        return versions if limit is None else versions[:limit]

    def program_history(
        self, session_id: str, program_id: str, *, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Newest first: ``{"version", "created_at", "score", "run_id"}`` per kept version.

        Raises:
            ProgramNotFound, SessionNotFound.
        """
        return [v.to_dict() for v in self.program_versions(session_id, program_id, limit=limit)]

    def rollback_program(
        self, session_id: str, program_id: str, version: int, *, force: bool = False
    ) -> int:
        """Write version ``version``'s spec as a **new** version; returns its number.

        Raises:
            HistoryUnavailable: that version was not kept.
            OptimizationInProgress: a compile holds the program (without ``force``).
        """
        sid, pid = check_session_id(session_id), check_program_id(program_id)
        if isinstance(version, bool) or not isinstance(version, int):
            raise HistoryUnavailable(f"version must be an integer, got {version!r}")
        reply = self._compile_op(
            sid, "rollback", pid, version, "1" if force else "0", self.program_versions_kept
        )
        if reply[0] == Status.LOCKED:
            raise locked(sid, pid, str(reply[1]))
        if reply[0] == Status.NOHISTORY:
            raise HistoryUnavailable(
                f"program {pid!r} has no kept version {version}",
                {"program_id": pid, "version": version},
            )
        return int(reply[1])

    def program_lease(self, session_id: str, program_id: str) -> dict[str, Any] | None:
        """The live optimization lease of a program: ``{"run_id", "expires_at"}`` or None."""
        sid, pid = check_session_id(session_id), check_program_id(program_id)
        raw = self._compile_op(sid, "lease", pid, touch=False)[1]
        if not raw:
            return None
        lease = loads(raw)
        return {"run_id": lease["run"], "expires_at": ms_to_datetime(lease["expires"])}

    # --- the lease and checkpoint of a running compile ------------------------------------

    def begin_compile(
        self, session_id: str, program_id: str, run_id: str, token: str, lease_s: float
    ) -> CompileStart:
        """Take the program's optimization lease for one delivery (``token``) of a run.

        Raises:
            ProgramNotFound, SessionNotFound.
        """
        sid, pid = check_session_id(session_id), check_program_id(program_id)
        reply = self._compile_op(sid, "acquire", pid, run_id, token, int(lease_s * 1000))
        status = str(reply[0])
        if status == Status.NOPROGRAM:
            raise ProgramNotFound(f"session {sid!r} has no program {pid!r}", {"program_id": pid})
        if status == Status.OK:
            checkpoint = loads(reply[2])["state"] if reply[2] else None
            return CompileStart(status, spec=dict(loads(reply[1])), checkpoint=checkpoint)
        if status == Status.DONE:
            return CompileStart(status, committed=_version(loads(reply[1])))
        return CompileStart(status, holder=str(reply[1]) if len(reply) > 1 else None)

    def renew_compile(self, session_id: str, program_id: str, token: str, lease_s: float) -> bool:
        """Extend the lease; False if it was lost (lapsed and taken, or released)."""
        reply = self._compile_op(session_id, "renew", program_id, token, int(lease_s * 1000))
        return bool(reply[0] == Status.OK)

    def release_compile(
        self, session_id: str, program_id: str, token: str, *, keep_checkpoint: bool = False
    ) -> bool:
        """Drop the lease of a compile that ended without a commit, and its checkpoint
        unless ``keep_checkpoint`` (the run will be retried and resume from it)."""
        keep = "1" if keep_checkpoint else "0"
        reply = self._compile_op(session_id, "release", program_id, token, keep)
        return bool(reply[0] == Status.OK)

    def save_checkpoint(
        self, session_id: str, program_id: str, run_id: str, token: str, state: Any
    ) -> None:
        """Keep a compile's progress (JSON) for a later delivery of the same run.

        Raises:
            OptimizationInProgress: the lease was lost (another delivery took over).
            PayloadTooLarge: over ``max_dataset_bytes``.
        """
        raw = dumps({"run": run_id, "state": state})
        check_encoded_size(len(raw), self.max_dataset_bytes, "the compile checkpoint")
        if self._compile_op(session_id, "save", program_id, token, raw)[0] != Status.OK:
            raise locked(session_id, program_id, run_id)

    def commit_compile(
        self,
        session_id: str,
        program_id: str,
        run_id: str,
        token: str,
        spec: dict[str, Any],
        score: float,
        baseline_score: float | None,
    ) -> int:
        """Write the compiled program as a new version and release the lease, at once.

        Raises:
            OptimizationInProgress: the lease was lost; nothing was written.
            PayloadTooLarge: the spec is over ``max_value_bytes``.
        """
        raw = self._encode_limited(spec, f"program {program_id!r}")
        reply = self._compile_op(
            session_id,
            "commit",
            program_id,
            token,
            raw,
            repr(float(score)),
            "" if baseline_score is None else repr(float(baseline_score)),
            self.program_versions_kept,
        )
        if reply[0] != Status.OK:
            raise locked(session_id, program_id, run_id)
        return int(reply[1])

    # --- metric names the workers offer -------------------------------------------------

    def register_metrics(self, names: Iterable[str]) -> None:
        """Add the metric names this worker offers (read by producers' pre-checks)."""
        names = list(names)
        if names:
            with translate_errors():
                self.redis.sadd(self.keys.metrics, *names)

    def metric_known(self, name: str) -> bool:
        """Whether some worker registered metric ``name``."""
        with translate_errors():
            return bool(self.redis.sismember(self.keys.metrics, name))
