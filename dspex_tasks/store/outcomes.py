"""Fleet-wide task outcome counters (``dspex:task_outcomes``), written by workers.

Workers add up outcomes in the process and write them in batches
(``workers/outcomes.py``); the exporter reads the totals. Fields are
``<task name>:<state>``.
"""

from __future__ import annotations

from collections.abc import Mapping

from dspex_tasks.store.base import StoreCore, translate_errors

__all__ = ["OutcomesMixin"]


class OutcomesMixin(StoreCore):
    """Counters of task outcomes shared by every worker on the Redis."""

    def add_task_outcomes(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Add ``{(task name, state): n}`` to the counters in one round trip.

        Raises:
            StoreUnavailable: nothing was added (the caller keeps the counts).
        """
        if not counts:
            return
        with translate_errors():
            pipe = self.redis.pipeline(transaction=False)
            for (task, state), n in counts.items():
                pipe.hincrby(self.keys.task_outcomes, f"{task}:{state}", n)
            pipe.execute()

    def task_outcomes(self) -> dict[tuple[str, str], int]:
        """The counters: ``{(task name, state): count}``."""
        with translate_errors():
            raw = self.redis.hgetall(self.keys.task_outcomes)
        out: dict[tuple[str, str], int] = {}
        for field, value in raw.items():
            task, _, state = str(field).rpartition(":")
            if task:
                out[(task, state)] = int(value)
        return out
