"""Cluster-wide LM rate limits: one profile's rpm, tpm and concurrency across every worker.

A call reserves its turn before it goes out (one Lua round trip, :data:`RESERVE`) and
settles after (one more, :data:`SETTLE`). State lives in Redis, per profile, in one hash
tag (``Keys.lm_limits``), so every worker on the Redis shares it:

- **rpm**: calls are spaced ``60 / rpm`` seconds apart on one schedule (``next_ms``), so
  any sliding 60 s window holds at most ``rpm`` (+1 at its edge) call starts; a whole
  minute's quota never goes out at once.
- **tpm**: a GCRA on tokens (``tok_ms``): a call reserves an estimate (its prompt's
  length / 4 + ``max_tokens``) and settling corrects it to the tokens it really used.
- **concurrency**: a call holds a lease (a member of the ``slots`` zset with an expiry)
  while it runs; this process renews its leases every third of ``lease_s``, so a killed
  worker's slots come back within one lease.
- **429**: a provider answer with ``Retry-After`` pauses the profile cluster-wide
  (``pause_ms``) for that long; every reserve waits it out.

Settling is off the call path: a :class:`Settler` thread sends the settles of every
call that has finished (one pipeline per batch), so a call waits for one round trip, not
two. Only a 429's settle (the pause) is sent before the call goes on.

A call whose turn is further away than its wait budget reserves nothing and raises
:class:`LMRateLimited` with ``retry_after_s``: the task is retried later, never failed.
Time comes from the server's ``TIME``, so hosts with skewed clocks agree.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from dspex_tasks.errors import LMRateLimited, RunCancelled, StoreUnavailable
from dspex_tasks.keys import Keys
from dspex_tasks.lm import abandon
from dspex_tasks.settings import LMLimits

__all__ = [
    "RESERVE",
    "SETTLE",
    "LeaseRenewer",
    "ProfileStats",
    "RateLimiter",
    "Settler",
    "Turn",
    "limiter_state",
    "read_profile_stats",
]

log = logging.getLogger(__name__)

_NOW = """
local t = redis.call('TIME')
local NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: schedule hash, slots zset, stats hash
# ARGV: lease_id, rpm, tpm, concurrency, lease_ms, estimated_tokens, max_wait_ms
# Answers {'ok', wait_ms} (the turn is taken: go in wait_ms), {'pause', ms} (the profile
# is paused after a 429), {'busy', ms} (every concurrency slot is held; ms: when the
# oldest lease lapses at the latest) or {'later', ms} (the turn is further than
# max_wait_ms: nothing reserved; ms: when to come back, one turn after the previous
# deferred call's).
RESERVE = (
    _NOW
    + """
local pause = tonumber(redis.call('HGET', KEYS[1], 'pause_ms') or '0')
if pause > NOW then return {'pause', pause - NOW} end
local conc = tonumber(ARGV[4])
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', NOW)
  if redis.call('ZCARD', KEYS[2]) >= conc then
    local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {'busy', math.max(1, math.floor(tonumber(first[2]) - NOW))}
  end
end
local start = NOW
local rpm, tpm, est = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[6])
if rpm > 0 then
  start = math.max(NOW, tonumber(redis.call('HGET', KEYS[1], 'next_ms') or '0'))
end
local tat = 0
if tpm > 0 then
  tat = math.max(NOW, tonumber(redis.call('HGET', KEYS[1], 'tok_ms') or '0'))
  local due = tat + est * 60000 / tpm - 60000
  if due > start then start = due end
end
local wait = math.floor(start - NOW)  -- a fraction of a ms early is no burst
if wait > tonumber(ARGV[7]) then
  -- Deferred calls are given their place in a queue of their own (defer_ms), one turn
  -- apart, so they come back spread out near their turns instead of all at once (and
  -- deferred again, most of them). Nothing is reserved: a task that never comes back
  -- costs no turn.
  local step = 0
  if rpm > 0 then step = 60000 / rpm end
  if tpm > 0 and est * 60000 / tpm > step then step = est * 60000 / tpm end
  local back = math.max(start, tonumber(redis.call('HGET', KEYS[1], 'defer_ms') or '0'))
  redis.call('HSET', KEYS[1], 'defer_ms', tostring(back + step))
  return {'later', math.floor(back - NOW)}
end
if rpm > 0 then redis.call('HSET', KEYS[1], 'next_ms', tostring(start + 60000 / rpm)) end
if tpm > 0 then redis.call('HSET', KEYS[1], 'tok_ms', tostring(tat + est * 60000 / tpm)) end
if conc > 0 then redis.call('ZADD', KEYS[2], NOW + wait + tonumber(ARGV[5]), ARGV[1]) end
return {'ok', wait}
"""
)

# KEYS: schedule hash, slots zset, stats hash
# ARGV: lease_id, tpm, token correction (actual - estimated), pause_ms (0: none)
# Frees the call's slot, corrects the token schedule, and on a 429 pauses the profile
# until now + pause_ms (a later pause never shortens an earlier one).
SETTLE = (
    _NOW
    + """
redis.call('ZREM', KEYS[2], ARGV[1])
local tpm, delta = tonumber(ARGV[2]), tonumber(ARGV[3])
if tpm > 0 and delta ~= 0 then
  local tat = tonumber(redis.call('HGET', KEYS[1], 'tok_ms') or '0')
  redis.call('HSET', KEYS[1], 'tok_ms', tostring(math.max(NOW, tat + delta * 60000 / tpm)))
end
local pause = tonumber(ARGV[4])
if pause > 0 then
  local old = tonumber(redis.call('HGET', KEYS[1], 'pause_ms') or '0')
  if NOW + pause > old then redis.call('HSET', KEYS[1], 'pause_ms', NOW + pause) end
end
return 1
"""
)

# KEYS: slots zset.  ARGV: lease_ms, lease_id...
# Extends the leases still held (a lapsed lease is not brought back).
RENEW = (
    _NOW
    + """
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', NOW + tonumber(ARGV[1]), ARGV[i])
end
return 1
"""
)

#: Shortest and longest pause between two reserves of a call waiting for a free slot.
_POLL_MIN_S = 0.01
_POLL_MAX_S = 0.25


@dataclass
class Turn:
    """A reserved call: settle it with :meth:`RateLimiter.settle` once it is answered."""

    lease_id: str
    estimate: int
    waited_s: float


class ProfileStats:
    """Per-profile counters (calls, tokens, 429s, waits, cache hits) added up in the
    process and written in one pipeline every ``interval_s`` by a daemon thread, so no
    counter costs a round trip on the call path."""

    FIELDS = (
        "calls",
        "prompt_tokens",
        "completion_tokens",
        "rate_limited",
        "waits",
        "wait_ms",
        "deferred",
        "cache_hits",
        "cache_misses",
    )

    def __init__(self, client: redis.Redis, keys: Keys, interval_s: float = 1.0) -> None:
        self.redis = client
        self.keys = keys
        self.interval_s = interval_s
        self._counts: dict[str, Counter[str]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, profile: str, **counts: int) -> None:
        with self._lock:
            self._counts.setdefault(profile, Counter()).update(counts)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="dspex-lm-stats", daemon=True
                )
                self._thread.start()

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {}
        pending = {p: {k: v for k, v in c.items() if v} for p, c in counts.items()}
        pending = {p: c for p, c in pending.items() if c}
        if not pending:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.sadd(self.keys.lm_profiles(), *pending)
            for profile, c in pending.items():
                for name, n in c.items():
                    pipe.hincrby(self.keys.lm_stats(profile), name, n)
            pipe.execute()
        except redis.RedisError as e:
            log.warning("cannot write LM counters (%s); keeping them for the next try", e)
            with self._lock:
                for profile, c in pending.items():
                    self._counts.setdefault(profile, Counter()).update(c)

    def _loop(self) -> None:
        while True:
            time.sleep(self.interval_s)
            self.flush()

    def read(self, profile: str) -> dict[str, int]:
        raw = self.redis.hgetall(self.keys.lm_stats(profile))
        return {_text(k): int(v) for k, v in raw.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_profile_stats(
    client: redis.Redis, keys: Keys, profiles: Sequence[str] = ()
) -> dict[str, dict[str, int]]:
    """Every profile's counters (:attr:`ProfileStats.FIELDS`, missing ones 0): the
    profiles workers wrote counters for, plus ``profiles``; two round trips."""
    names = sorted({_text(p) for p in client.smembers(keys.lm_profiles())} | set(profiles))
    if not names:
        return {}
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(keys.lm_stats(name))
    out: dict[str, dict[str, int]] = {}
    for name, raw in zip(names, pipe.execute(), strict=True):
        counts = dict.fromkeys(ProfileStats.FIELDS, 0)
        counts.update({_text(k): int(v) for k, v in raw.items()})
        out[name] = counts
    return out


class LeaseRenewer:
    """Renews this process's concurrency leases from one daemon thread."""

    def __init__(self, client: redis.Redis) -> None:
        self._renew = client.register_script(RENEW)
        self._held: dict[str, tuple[str, int]] = {}  # lease id -> (slots key, lease ms)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._period_s = 1.0

    def hold(self, lease_id: str, slots_key: str, lease_ms: int) -> None:
        with self._lock:
            self._held[lease_id] = (slots_key, lease_ms)
            self._period_s = min(self._period_s, lease_ms / 3000)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="dspex-lm-leases", daemon=True
                )
                self._thread.start()

    def drop(self, lease_id: str) -> None:
        with self._lock:
            self._held.pop(lease_id, None)

    def _loop(self) -> None:
        while True:
            time.sleep(self._period_s)
            with self._lock:
                groups: dict[tuple[str, int], list[str]] = {}
                for lease_id, (key, ms) in self._held.items():
                    groups.setdefault((key, ms), []).append(lease_id)
            for (key, ms), ids in groups.items():
                try:
                    self._renew(keys=[key], args=[ms, *ids])
                except redis.RedisError as e:  # the next round tries again
                    log.warning("cannot renew LM concurrency leases: %s", e)


class Settler:
    """Sends finished calls' settles from one daemon thread, a pipeline per batch, so the
    call path does not wait for them. A lost settle (Redis down, the process killed) costs
    nothing lasting: the slot's lease lapses, the token estimate stays as reserved."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._pending: list[tuple[Any, list[str], list[str | int]]] = []
        self._busy = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def put(self, script: Any, keys: list[str], args: list[str | int]) -> None:
        with self._cond:
            self._pending.append((script, keys, args))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="dspex-lm-settle", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def join(self, timeout: float = 5.0) -> bool:
        """Wait until every settle handed over so far is sent (tests, shutdown)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending))
                batch, self._pending = self._pending, []
                self._busy = True
            try:
                self._send(batch)
            except redis.RedisError as e:
                log.warning("cannot settle %d LM call(s): %s", len(batch), e)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _send(self, batch: list[tuple[Any, list[str], list[str | int]]]) -> None:
        # EVALSHA in a plain pipeline: a Script bound to a pipeline would ask SCRIPT
        # EXISTS first, a round trip per batch. A script the server lost is loaded and
        # its calls sent again.
        pipe = self.redis.pipeline(transaction=False)
        for script, keys, args in batch:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        replies = pipe.execute(raise_on_error=False)
        missing = [
            item
            for item, reply in zip(batch, replies, strict=True)
            if isinstance(reply, redis.exceptions.NoScriptError)
        ]
        for script, keys, args in missing:
            script(keys=keys, args=args)


class RateLimiter:
    """The limits of one profile, enforced through Redis (thread-safe)."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        profile: str,
        limits: LMLimits,
        *,
        renewer: LeaseRenewer,
        stats: ProfileStats,
        settler: Settler | None = None,
    ) -> None:
        self.profile = profile
        self.limits = limits
        self.keys = keys.lm_limits(profile)
        self._all_keys = keys
        self.renewer = renewer
        self.stats = stats
        self.settler = settler
        self.lease_ms = int(limits.lease_s * 1000)
        self._reserve = client.register_script(RESERVE)
        self._settle = client.register_script(SETTLE)

    def reserve(self, estimate: int, deadline: float) -> Turn:
        """Wait for this call's turn (until ``deadline``, a ``time.monotonic()`` value).

        Raises:
            LMRateLimited: no turn before the deadline; ``details["retry_after_s"]`` is
                when to try again (the task is retried then).
            StoreUnavailable: Redis cannot be reached.
            RunCancelled: the run was stopped while it waited (nothing is reserved).
        """
        lim = self.limits
        lease_id = uuid.uuid4().hex
        started = time.monotonic()
        poll = _POLL_MIN_S
        while True:
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))
            try:
                status, ms = self._reserve(
                    keys=self.keys,
                    args=[
                        lease_id,
                        lim.rpm or 0,
                        lim.tpm or 0,
                        lim.concurrency or 0,
                        self.lease_ms,
                        estimate,
                        left_ms,
                    ],
                )
            except redis.RedisError as e:
                raise StoreUnavailable(f"LM rate limiter: {type(e).__name__}: {e}") from None
            status = _text(status)
            ms = int(ms)
            if status == "ok":
                if lim.concurrency:
                    self.renewer.hold(lease_id, self.keys[1], self.lease_ms)
                if ms > 0:
                    with contextlib.suppress(RunCancelled):
                        # The turn is taken: the caller checks the stop and settles it.
                        abandon.pause(ms / 1000)
                waited = time.monotonic() - started
                if waited > 0.001:
                    self.stats.add(self.profile, waits=1, wait_ms=int(waited * 1000))
                return Turn(lease_id, estimate, waited)
            if status == "later" or left_ms <= 0:
                self.stats.add(self.profile, deferred=1)
                raise LMRateLimited(
                    f"LM profile {self.profile!r} has no free turn within its max_wait_s "
                    f"({lim.max_wait_s:g} s): the task is retried later",
                    {"profile": self.profile, "retry_after_s": round(max(ms, 1000) / 1000, 3)},
                )
            # paused or every slot held: wait (bounded by the deadline) and ask again
            if status == "busy":
                pause_s = min(poll, ms / 1000)
                poll = min(_POLL_MAX_S, poll * 2)
            else:
                pause_s = ms / 1000
            abandon.pause(max(0.001, min(pause_s, left_ms / 1000)))

    def settle(
        self,
        turn: Turn,
        *,
        tokens: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        """Free the call's slot, correct its token estimate, pause after a 429.

        Through the settler (not waited for) unless this is a 429: the pause must be in
        place before anyone reserves again."""
        self.renewer.drop(turn.lease_id)
        delta = 0 if tokens is None else tokens - turn.estimate
        pause_ms = int(retry_after_s * 1000) if retry_after_s else 0
        args: list[str | int] = [turn.lease_id, self.limits.tpm or 0, delta, pause_ms]
        if self.settler is not None and not pause_ms:
            self.settler.put(self._settle, self.keys, args)
            return
        try:
            self._settle(keys=self.keys, args=args)
        except redis.RedisError as e:
            # The lease lapses on its own; a lost token correction errs on the safe side.
            log.warning("cannot settle an LM call of profile %s: %s", self.profile, e)

    def state(self, client: redis.Redis) -> dict[str, Any]:
        """What ``doctor`` shows: limits, slots held now, pause left, the counters."""
        return limiter_state(client, self._all_keys, self.profile, self.limits)


def limiter_state(
    client: redis.Redis, keys: Keys, profile: str, limits: LMLimits | None
) -> dict[str, Any]:
    """A profile's limits and its current use of them, in one round trip: calls in flight
    (live leases), how long the profile is paused after a 429, how far ahead the rpm and
    tpm schedules are booked, and its counters."""
    schedule_key, slots_key, stats_key = keys.lm_limits(profile)
    pipe = client.pipeline(transaction=False)
    pipe.time()
    pipe.hgetall(schedule_key)
    pipe.zrange(slots_key, 0, -1, withscores=True)
    pipe.hgetall(stats_key)
    now_t, schedule, slots, stats = pipe.execute()
    now_ms = int(now_t[0]) * 1000 + int(now_t[1]) // 1000
    sched = {_text(k): float(v) for k, v in schedule.items()}

    def ahead_s(field: str) -> float:
        return round(max(0.0, sched.get(field, 0) - now_ms) / 1000, 3)

    return {
        "limits": limits_dict(limits),
        "in_flight": sum(1 for _, score in slots if score > now_ms),
        "paused_s": ahead_s("pause_ms"),
        "queue_s": ahead_s("next_ms"),
        "tokens_queue_s": ahead_s("tok_ms"),
        "counters": {
            **dict.fromkeys(ProfileStats.FIELDS, 0),
            **{_text(k): int(v) for k, v in stats.items()},
        },
    }


def _limits_dict(limits: LMLimits) -> dict[str, Any]:
    return {
        "rpm": limits.rpm,
        "tpm": limits.tpm,
        "concurrency": limits.concurrency,
        "max_wait_s": limits.max_wait_s,
        "lease_s": limits.lease_s,
    }


def limits_dict(limits: LMLimits | None) -> Mapping[str, Any] | None:
    return None if limits is None else _limits_dict(limits)
