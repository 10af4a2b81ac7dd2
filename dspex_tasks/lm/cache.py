"""The shared LM cache in Redis, with single-flight (DESIGN.md §11).

An entry is keyed on a digest of the model, the endpoint (``api_base``), the request
parameters and the messages -- never the API key -- and holds the call's result as JSON
(never pickle). Scope ``global`` shares entries across sessions (``Keys.lm_cache(digest)``),
scope ``session`` keeps them in the session's slot, listed in the session's cache index
so that deleting or expiring the session deletes them (no SCAN).

**Single-flight**: the first caller of a missing entry takes its lock (in the same round
trip as the lookup, :data:`LOOKUP`) and calls the LM; identical calls arriving meanwhile
wait for its answer, polling the entry, for at most ``wait_s``; then (or as soon as the
lock is gone without an answer, e.g. the leader failed) they call the LM themselves.
A hit costs one round trip.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson
import redis

from dspex_tasks.keys import Keys
from dspex_tasks.lm import abandon
from dspex_tasks.settings import LMCacheConfig

__all__ = ["LOOKUP", "STORE", "LMCache", "cache_digest"]

log = logging.getLogger(__name__)

# Session scope adds KEYS[3], the session's cache index (a zset: key -> expiry ms, which
# deleting or expiring the session empties, store/scripts.py), and KEYS[4], the session
# record: every key a session-scoped entry writes is indexed, and nothing is written for
# a session that is gone.
_INDEX = """
local function index(key, ms)
  local t = redis.call('TIME')
  local at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ms
  redis.call('ZADD', KEYS[3], at, key)
  if redis.call('PTTL', KEYS[3]) < ms then redis.call('PEXPIRE', KEYS[3], ms) end
end
"""

# KEYS: entry, lock (, index, session).  ARGV: lock_ms, token
# Answers {'hit', entry}, {'lead'} (the lock is taken: call the LM, then STORE) or
# {'wait'} (another caller holds the lock).
LOOKUP = (
    _INDEX
    + """
local v = redis.call('GET', KEYS[1])
if v then return {'hit', v} end
if #KEYS > 2 and redis.call('EXISTS', KEYS[4]) == 0 then return {'lead'} end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[1]) then
  if #KEYS > 2 then index(KEYS[2], tonumber(ARGV[1])) end
  return {'lead'}
end
return {'wait'}
"""
)

# KEYS: entry, lock (, index, session).  ARGV: ttl_ms, entry json (empty: none), token
# Stores the answer (when given) and drops the lock if this caller still holds it.
STORE = (
    _INDEX
    + """
local keep = ARGV[2] ~= ''
if #KEYS > 2 and keep then
  keep = redis.call('EXISTS', KEYS[4]) == 1
  if keep then
    index(KEYS[1], tonumber(ARGV[1]))
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. redis.call('TIME')[1] * 1000)
  end
end
if keep then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1]) end
if redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
  if #KEYS > 2 then redis.call('ZREM', KEYS[3], KEYS[2]) end
end
return 1
"""
)

#: Call parameters that never change an answer (or must never reach a key).
_NOT_IN_KEY = frozenset(
    {"api_key", "timeout", "num_retries", "headers", "extra_headers", "cache", "stream"}
)
_POLL_MIN_S = 0.005
_POLL_MAX_S = 0.1


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if str(k) not in _NOT_IN_KEY}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "model_dump"):
        return _plain(value.model_dump())
    return repr(value)


def cache_digest(model: str, api_base: str | None, call_key: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of what decides an answer (model, endpoint, params,
    messages); the API key and transport settings are left out."""
    doc = {"model": model, "api_base": api_base, "call": _plain(call_key)}
    raw = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(raw).hexdigest()


class LMCache:
    """One profile's cache (thread-safe)."""

    def __init__(self, client: redis.Redis, keys: Keys, config: LMCacheConfig) -> None:
        self.config = config
        self.keys = keys
        self.ttl_ms = int(config.ttl_s * 1000)
        self._lookup = client.register_script(LOOKUP)
        self._store = client.register_script(STORE)

    def key_for(self, digest: str, session_id: str | None) -> list[str] | None:
        if self.config.scope == "session":
            return None if session_id is None else self.keys.lm_cache(digest, session_id)
        return self.keys.lm_cache(digest)

    def get_or_lead(self, keys: list[str], token: str) -> tuple[Any | None, bool]:
        """(the cached record, or None; whether this caller leads the call).

        Waits (single-flight) while another caller holds the lock, at most ``wait_s``.
        (None, False): call the LM without storing (the wait ran out, or Redis failed).

        Raises:
            RunCancelled: the run was stopped while it waited.
        """
        lock_ms = int(self.config.wait_s * 1000) + 1000
        deadline = time.monotonic() + self.config.wait_s
        poll = _POLL_MIN_S
        while True:
            try:
                reply = self._lookup(keys=keys, args=[lock_ms, token])
            except redis.RedisError as e:
                log.warning("LM cache unavailable (%s): calling the LM", e)
                return None, False
            status = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
            if status == "hit":
                try:
                    return orjson.loads(reply[1]), False
                except orjson.JSONDecodeError:
                    return None, False
            if status == "lead":
                return None, True
            if time.monotonic() >= deadline:
                return None, False
            abandon.pause(poll)
            poll = min(_POLL_MAX_S, poll * 1.5)

    def put(self, keys: list[str], token: str, record: Any | None) -> None:
        """Store ``record`` (JSON-able; None: nothing) and release the lock."""
        raw = b""
        if record is not None:
            try:
                raw = orjson.dumps(record)
            except (orjson.JSONEncodeError, TypeError):
                raw = b""  # not plain JSON: never cached (no pickle)
        try:
            self._store(keys=keys, args=[self.ttl_ms, raw, token])
        except redis.RedisError as e:
            log.warning("cannot store an LM cache entry: %s", e)
