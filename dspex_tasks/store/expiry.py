"""TTL expiry (the sweep beat runs) and store statistics."""

from __future__ import annotations

from typing import Any, cast

from dspex_tasks.store.base import StoreCore, translate_errors

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
            self.redis.hincrby(self.keys.stats, "sweeps", 1)
        return total

    def stats(self) -> dict[str, Any]:
        """Live sessions, lifetime counters, and current variable / program counts."""
        with translate_errors():
            counters = self.redis.hgetall(self.keys.stats)
            sids = cast("list[str]", self.redis.zrange(self.keys.sessions, 0, -1))
            variables = programs = 0
            for start in range(0, len(sids), 1000):
                pipe = self.redis.pipeline(transaction=False)
                for sid in sids[start : start + 1000]:
                    pipe.hget(self.keys.session(sid), "var_count")
                    pipe.hlen(self.keys.programs(sid))
                replies = pipe.execute()
                variables += sum(int(v or 0) for v in replies[::2])
                programs += sum(int(p or 0) for p in replies[1::2])
            global_programs = self.redis.zcard(self.keys.gp_index)
        return {
            "sessions": len(sids),
            "created": int(counters.get("created", 0)),
            "deleted": int(counters.get("deleted", 0)),
            "expired": int(counters.get("expired", 0)),
            "sweeps": int(counters.get("sweeps", 0)),
            "variables": variables,
            "programs": programs,
            "global_programs": global_programs,
        }
