"""A session handle's programs: specs, versions and rollback, datasets, and compiles
(the part of :class:`~dspex_tasks.client.SessionHandle` about programs).

Imports Celery and redis-py only, never DSPy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dspex_tasks.handles import TaskHandle
from dspex_tasks.store import SessionStore

if TYPE_CHECKING:  # the Client imports this module
    from dspex_tasks.client import Client

__all__ = ["ProgramsHandle"]


class ProgramsHandle:
    """Programs of one session (mixed into ``SessionHandle``)."""

    _client: Client
    _store: SessionStore
    id: str

    def create_program(
        self,
        program_id: str,
        module: str,
        signature: Any,
        *,
        config: Mapping[str, Any] | None = None,
        state: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> dict[str, Any]:
        """Store (or replace) a program spec in the session; returns it normalized.
        ``force`` writes it even while a compile holds it (``optimization_in_progress``)."""
        spec = {"module": module, "signature": signature, "config": config or {}, "state": state}
        return self._store.store_program(self.id, program_id, spec, force=force)

    def program(self, program_id: str) -> dict[str, Any]:
        return self._store.get_program(self.id, program_id)

    def list_programs(self) -> list[str]:
        return self._store.list_programs(self.id)

    def delete_program(self, program_id: str, *, force: bool = False) -> bool:
        return self._store.delete_program(self.id, program_id, force=force)

    def program_history(self, program_id: str) -> list[dict[str, Any]]:
        """The program's kept versions, newest first (``version, created_at, score, run_id``)."""
        return self._store.program_history(self.id, program_id)

    def rollback_program(self, program_id: str, version: int, *, force: bool = False) -> int:
        """Write an old version's spec as a new version; returns the new version."""
        return self._store.rollback_program(self.id, program_id, version, force=force)

    def store_dataset(self, name: str, examples: Sequence[Mapping[str, Any]]) -> int:
        """Store a named list of examples (a compile's trainset or valset by name)."""
        return self._store.store_dataset(self.id, name, examples)

    def compile(
        self,
        program_id: str,
        /,
        *,
        trainset: str | Sequence[Mapping[str, Any]],
        metric: str = "exact_match",
        optimizer: str = "bootstrap_fewshot",
        options: Mapping[str, Any] | None = None,
    ) -> TaskHandle:
        """Enqueue ``dspex.compile``: optimize a stored program; the result is a new
        version of it. ``trainset`` is a list of examples or a stored dataset's name;
        ``options`` the optimizer's (``valset``, ``seed``, ``max_bootstrapped_demos``...).
        Raises on a bad request (``invalid_inputs``), before enqueueing."""
        return self._client.submit_compile(
            self.id,
            program_id,
            trainset,
            {**(options or {}), "metric": metric, "optimizer": optimizer},
        )
