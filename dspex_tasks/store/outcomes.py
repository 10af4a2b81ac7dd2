"""Fleet-wide task outcome counters, written by workers and read by the exporter.

``dspex:task_outcomes`` counts outcomes (fields ``<task name>:<state>``) and
``dspex:task_failures`` counts failures by error code (fields ``<task name>:<code>``, the
``DspexError`` code or ``unknown``). Workers add both up in the process and write them in
one batch (``workers/outcomes.py``); the exporter reads the totals.
"""

from __future__ import annotations

from collections.abc import Mapping

from dspex_tasks.store.base import StoreCore, translate_errors

__all__ = ["OutcomesMixin"]


class OutcomesMixin(StoreCore):
    """Counters of task outcomes and failure codes shared by every worker on the Redis."""

    def add_task_outcomes(
        self,
        counts: Mapping[tuple[str, str], int],
        failure_codes: Mapping[tuple[str, str], int] | None = None,
    ) -> None:
        """Add ``{(task name, state): n}`` and ``{(task name, code): n}`` in one round trip.

        Raises:
            StoreUnavailable: nothing was added (the caller keeps the counts).
        """
        failure_codes = failure_codes or {}
        if not counts and not failure_codes:
            return
        with translate_errors():
            pipe = self.redis.pipeline(transaction=False)
            for (task, state), n in counts.items():
                pipe.hincrby(self.keys.task_outcomes, f"{task}:{state}", n)
            for (task, code), n in failure_codes.items():
                pipe.hincrby(self.keys.task_failures, f"{task}:{code}", n)
            pipe.execute()

    def task_outcomes(self) -> dict[tuple[str, str], int]:
        """The outcome counters: ``{(task name, state): count}``."""
        with translate_errors():
            raw = self.redis.hgetall(self.keys.task_outcomes)
        return _pairs(raw)

    def task_failure_codes(self) -> dict[tuple[str, str], int]:
        """The failure counters: ``{(task name, error code): count}``."""
        with translate_errors():
            raw = self.redis.hgetall(self.keys.task_failures)
        return _pairs(raw)


def _pairs(raw: Mapping[bytes | str, bytes | str]) -> dict[tuple[str, str], int]:
    # Task names hold dots, never colons; the last colon splits the field.
    out: dict[tuple[str, str], int] = {}
    for field, value in raw.items():
        task, _, label = str(field).rpartition(":")
        if task:
            out[(task, label)] = int(value)
    return out
