"""The task ledger: tasks a Client sent that have not finished yet, so a lost message is
sent again.

Celery's Redis transport loses a message when Redis goes down between a worker's
``BRPOP`` (the message leaves the queue) and the worker recording it as unacknowledged
(a separate command): the message exists only in the worker's socket buffer, which the
reconnect discards. Nothing in the broker remembers it. Found by
``tests/test_faults.py::test_redis_restart_under_load`` (about one run in ten lost a task).

So the Client records every task it sends (``record_sent``) before publishing it; the
worker forgets it when the task reaches a final state (``forget_sent``); the maintenance
sweep (beat's ``dspex.expire_sessions``) sends again, with the same task id, any task
still recorded after ``resend_after_s`` (``due_resends``). A task sent twice runs once:
the second delivery finds the first one's claim and waits for it or answers its result
(``taskstate.py``). Flower's API records the tasks it sends the same way
(``workers/monitor.py``); messages other programs put on the broker directly are not
recorded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from redis.commands.core import Script

from dspex_tasks.store.base import StoreCore, dumps, loads, translate_errors

__all__ = ["LedgerMixin", "SentTask"]

# KEYS: ledger hash, due zset.  ARGV: after_ms, then per task: task id, message JSON
_RECORD = """
local t = redis.call('TIME')
local due = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[2], due, ARGV[i])
end
return 1
"""

# KEYS: ledger hash, due zset.  ARGV: after_ms, limit
# Tasks whose time has come: each is pushed one more period out (so concurrent sweeps do
# not both send it) and returned with its message; entries without a message are dropped.
_DUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  local msg = redis.call('HGET', KEYS[1], id)
  if msg then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), id)
    out[#out + 1] = id
    out[#out + 1] = msg
  else
    redis.call('ZREM', KEYS[2], id)
  end
end
return out
"""

#: ``(task id, {"task": name, "args": [...], "kwargs": {...}})``
SentTask = tuple[str, dict[str, Any]]


class LedgerMixin(StoreCore):
    """Record, forget and resend tasks a Client sent."""

    _ledger_scripts: dict[str, Script] | None = None

    def _ledger_script(self, name: str, args: Sequence[Any]) -> Any:
        if self._ledger_scripts is None:
            self._ledger_scripts = {
                "record": self.redis.register_script(_RECORD),
                "due": self.redis.register_script(_DUE),
            }
        with translate_errors():
            return self._ledger_scripts[name](
                keys=[self.keys.ledger, self.keys.ledger_due], args=list(args)
            )

    def record_sent(
        self, tasks: Sequence[tuple[str, str, Sequence[Any], Mapping[str, Any]]], after_s: float
    ) -> None:
        """Record ``(task id, task name, args, kwargs)`` messages, due for resending in
        ``after_s`` seconds unless forgotten first. One round trip for the lot."""
        if not tasks:
            return
        argv: list[Any] = [int(after_s * 1000)]
        for task_id, name, args, kwargs in tasks:
            argv += [task_id, dumps({"task": name, "args": list(args), "kwargs": dict(kwargs)})]
        self._ledger_script("record", argv)

    def sent_task(self, task_id: str) -> dict[str, Any] | None:
        """The message recorded for an unfinished task (None: none recorded, or done)."""
        with translate_errors():
            raw = self.redis.hget(self.keys.ledger, task_id)
        return loads(raw) if raw else None

    def forget_sent(self, *task_ids: str) -> None:
        """The tasks finished (or will never run): do not resend them."""
        if not task_ids:
            return
        with translate_errors():
            pipe = self.redis.pipeline(transaction=False)
            pipe.hdel(self.keys.ledger, *task_ids)
            pipe.zrem(self.keys.ledger_due, *task_ids)
            pipe.execute()

    def due_resends(self, after_s: float, limit: int = 100) -> list[SentTask]:
        """Recorded tasks whose resend time has passed (each pushed ``after_s`` further)."""
        reply = self._ledger_script("due", [int(after_s * 1000), limit])
        return [(reply[i], loads(reply[i + 1])) for i in range(0, len(reply), 2)]

    def pending_sent(self) -> int:
        """How many recorded tasks have not finished (for tests and the exporter)."""
        with translate_errors():
            return int(self.redis.hlen(self.keys.ledger))
