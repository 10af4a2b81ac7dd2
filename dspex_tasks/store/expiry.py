"""TTL expiry (the sweep beat runs) and store statistics."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from dspex_tasks.store.base import StoreCore, translate_errors
from dspex_tasks.store.models import ms_to_datetime

__all__ = ["ExpiryMixin"]

#: Sessions per EXPIRE_SESSIONS call: large enough to amortize the round trip, small
#: enough that one script never blocks Redis for long (~1 ms per 100 sessions).
_SWEEP_CHUNK = 500


class ExpiryMixin(StoreCore):
    """The sweep: deletes every key of every session whose deadline has passed."""

    def expire_sessions(self, limit: int | None = None) -> int:
        """Delete expired sessions (at most ``limit``); returns how many were expired.

        Each deletion re-checks the deadline atomically on the server, so a session
        touched while the sweep runs survives and is re-indexed at its new deadline.
        Safe to run from several processes at once: each session is counted once.
        """
        total = 0
        while limit is None or total < limit:
            batch = _SWEEP_CHUNK if limit is None else min(_SWEEP_CHUNK, limit - total)
            candidates = self._script("EXPIRY_CANDIDATES", [self.keys.sessions], [batch])
            if not candidates:
                break
            expired, _ = self._expire_ids(candidates)
            total += expired
            if len(candidates) < batch:
                break
        with translate_errors():
            # Server time, like every other timestamp of the store: hosts' clocks may drift.
            secs, micros = self.redis.time()
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(self.keys.stats, "sweeps", 1)
            pipe.hset(self.keys.stats, "last_sweep_ms", secs * 1000 + micros // 1000)
            pipe.execute()
        return total

    def last_sweep_at(self) -> datetime | None:
        """When a sweep last finished (UTC), or None if none ever ran.

        ``dspex-tasks doctor`` reads it to tell whether beat is alive.
        """
        with translate_errors():
            raw = cast("str | None", self.redis.hget(self.keys.stats, "last_sweep_ms"))
        return None if raw is None else ms_to_datetime(raw)

    def stats(self) -> dict[str, Any]:
        """Live sessions, lifetime counters, and current variable / program counts."""
        with translate_errors():
            counters = self.redis.hgetall(self.keys.stats)
            seconds, micros = self.redis.time()
            now_ms = seconds * 1000 + micros // 1000
            sids = cast("list[str]", self.redis.zrange(self.keys.sessions, 0, -1))
            live = variables = programs = 0
            for start in range(0, len(sids), 1000):
                pipe = self.redis.pipeline(transaction=False)
                for sid in sids[start : start + 1000]:
                    pipe.hmget(self.keys.session(sid), "deadline_ms", "var_count")
                    pipe.hlen(self.keys.programs(sid))
                replies = pipe.execute()
                # Indexed but past the deadline (not swept yet) is not live.
                for (deadline, var_count), progs in zip(replies[::2], replies[1::2], strict=True):
                    if deadline is not None and int(deadline) > now_ms:
                        live += 1
                        variables += int(var_count or 0)
                        programs += int(progs or 0)
            global_programs = self.redis.zcard(self.keys.gp_index)
        return {
            "sessions": live,
            "created": int(counters.get("created", 0)),
            "deleted": int(counters.get("deleted", 0)),
            "expired": int(counters.get("expired", 0)),
            "sweeps": int(counters.get("sweeps", 0)),
            "variables": variables,
            "programs": programs,
            "global_programs": global_programs,
        }
