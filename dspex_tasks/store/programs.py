"""Stored programs: session-scoped and global specs (JSON only, never pickle)."""

from __future__ import annotations

from typing import Any

from dspex_tasks.errors import OptimizationInProgress, ProgramNotFound, ValidationFailed
from dspex_tasks.keys import check_program_id, check_session_id
from dspex_tasks.specs import normalize_spec
from dspex_tasks.store.base import StoreCore, loads, translate_errors
from dspex_tasks.store.scripts import Status

__all__ = ["ProgramsMixin"]


class ProgramsMixin(StoreCore):
    """Program specs in a session's hash, or globally with their own fixed TTL."""

    def _spec_json(self, program_id: str, spec: Any) -> bytes:
        return self._encode_limited(normalize_spec(spec), f"program {program_id!r}")

    def _program_write(self, sid: str, op: str, pid: str, raw: bytes | str, force: bool) -> Any:
        """A put or del of a session program; a live optimization lease refuses it."""
        reply = self._session_script(
            "PROGRAM_OP", sid, True, op, pid, raw, "1" if force else "0", self.program_versions_kept
        )
        if reply[0] == Status.LOCKED:
            raise OptimizationInProgress(
                f"program {pid!r} of session {sid!r} is being optimized by run {reply[1]} "
                "(pass force=True to write it anyway)",
                {"session_id": sid, "program_id": pid, "run_id": str(reply[1])},
            )
        return reply[1]

    def store_program(
        self, session_id: str, program_id: str, spec: Any, *, force: bool = False
    ) -> dict[str, Any]:
        """Validate and store (or replace) a session program, as a new version; returns
        the normalized spec. ``force`` writes it even while a compile holds it.

        Raises:
            InvalidProgram, PayloadTooLarge, SessionNotFound, OptimizationInProgress.
        """
        sid, pid = check_session_id(session_id), check_program_id(program_id)
        raw = self._spec_json(pid, spec)
        self._program_write(sid, "put", pid, raw, force)
        return dict(loads(raw))

    def get_program(self, session_id: str, program_id: str) -> dict[str, Any]:
        """Return a session program's spec. Raises ``ProgramNotFound``."""
        sid, pid = check_session_id(session_id), check_program_id(program_id)
        raw = self._session_script("PROGRAM_OP", sid, True, "get", pid)[1]
        if raw is None:
            raise ProgramNotFound(f"session {sid!r} has no program {pid!r}", {"program_id": pid})
        return dict(loads(raw))

    def delete_program(self, session_id: str, program_id: str, *, force: bool = False) -> bool:
        """Delete a session program and its versions; False if it did not exist.

        Raises:
            OptimizationInProgress: a compile holds it (without ``force``).
        """
        sid, pid = check_session_id(session_id), check_program_id(program_id)
        return bool(self._program_write(sid, "del", pid, "", force))

    def list_programs(self, session_id: str) -> list[str]:
        """Ids of the session's programs, sorted."""
        sid = check_session_id(session_id)
        flat = self._session_script("PROGRAM_OP", sid, True, "list")[1]
        return sorted(flat[::2])

    # --- global programs -------------------------------------------------------------

    def _global_op(self, op: str, pid: str, spec: bytes | str = "", ttl_ms: int = 0) -> Any:
        if self.cluster:
            return self._global_op_cluster(op, pid, spec, ttl_ms)
        keys = [self.keys.global_program(pid), self.keys.gp_index]
        return self._script("GLOBAL_PROGRAM_OP", keys, [op, pid, spec, ttl_ms])

    def _global_op_cluster(self, op: str, pid: str, spec: bytes | str, ttl_ms: int) -> Any:
        """Cluster mode of GLOBAL_PROGRAM_OP: the spec and the index are on different
        slots, so single-key commands in turn (the spec first: a crash in between leaves
        an unlisted spec that its own TTL removes)."""
        key, index = self.keys.global_program(pid), self.keys.gp_index
        with translate_errors():
            if op == "get":
                return self.redis.get(key)
            if op == "del":
                self.redis.zrem(index, pid)
                return self.redis.delete(key)
            seconds, micros = self.redis.time()
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            if op == "put":
                self.redis.set(key, spec, px=ttl_ms)
                self.redis.zadd(index, {pid: now_ms + ttl_ms})
                return 1
            self.redis.zremrangebyscore(index, "-inf", now_ms)
            return self.redis.zrange(index, 0, -1)

    def store_global_program(
        self, program_id: str, spec: Any, *, ttl_s: float | None = None
    ) -> dict[str, Any]:
        """Store a program outside any session; it expires after ``ttl_s`` (no sliding)."""
        pid = check_program_id(program_id)
        ttl = self.global_program_ttl_s if ttl_s is None else ttl_s
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
            raise ValidationFailed(f"ttl_s must be a positive number, got {ttl!r}")
        raw = self._spec_json(pid, spec)
        self._global_op("put", pid, raw, max(1, int(ttl * 1000)))
        return dict(loads(raw))

    def get_global_program(self, program_id: str) -> dict[str, Any]:
        """Return a global program's spec. Raises ``ProgramNotFound``."""
        pid = check_program_id(program_id)
        raw = self._global_op("get", pid)
        if raw is None:
            raise ProgramNotFound(f"no global program {pid!r}", {"program_id": pid})
        return dict(loads(raw))

    def delete_global_program(self, program_id: str) -> bool:
        pid = check_program_id(program_id)
        return bool(self._global_op("del", pid))

    def list_global_programs(self) -> list[str]:
        """Ids of live global programs, sorted."""
        return sorted(self._global_op("list", "_"))
