"""Session scripts: create, read, set a field, delete, and the expiry sweep."""

from __future__ import annotations

from dspex_tasks.store.scripts.lua import lua_script

__all__ = [
    "CONFIGURE_SESSION",
    "CREATE_SESSION",
    "DELETE_SESSION",
    "EXPIRE_SESSIONS",
    "EXPIRY_CANDIDATES",
    "GET_SESSION",
    "SET_SESSION_FIELD",
]

# KEYS: session, vars, progs, done, events, runs, runq, data, pver, index, stats
# ARGV: grace_ms, touch, events_maxlen, sid, ttl_ms, metadata_json, exist_ok, max_sessions (0: none)
# Creates the session record and indexes it, or (exist_ok) touches the existing one.
# An existing but expired session is expired first (counted), then created anew.
CREATE_SESSION = lua_script(
    """
local sid, ttl = ARGV[4], tonumber(ARGV[5])
local deadline, status = open_session(ARGV[7] == '1')
if deadline then
  if ARGV[7] ~= '1' then return {'exists'} end
  backstop(deadline)
  return {'ok', 0, redis.call('HGETALL', KEYS[1])}
end
if status == 'expired' then
  for i = 1, SESSION_KEYS do redis.call('DEL', KEYS[i]) end
  drop_run_streams(KEYS[1])
  drop_lm_cache(KEYS[1])
  if redis.call('ZREM', KEYS[X1], sid) == 1 then redis.call('HINCRBY', KEYS[X2], 'expired', 1) end
end
local max = tonumber(ARGV[8])
if max > 0 and redis.call('ZCARD', KEYS[X1]) >= max then return {'quota', max} end
deadline = new_session(ttl, ARGV[6])
emit('session.created', '{"ttl_s":' .. ttl / 1000 .. ',"metadata":' .. ARGV[6] .. '}')
redis.call('ZADD', KEYS[X1], deadline, sid)
redis.call('HINCRBY', KEYS[X2], 'created', 1)
backstop(deadline)
return {'ok', 1, redis.call('HGETALL', KEYS[1])}
"""
)


# KEYS: session, vars, progs, done, events, runs, runq, data, pver.
# ARGV: grace_ms, touch, events_maxlen
# Reads the session record (sliding the deadline when touch).
GET_SESSION = lua_script(
    """
local deadline, status = open_session(TOUCH)
if not deadline then return {status} end
if TOUCH then backstop(deadline) end
return {'ok', redis.call('HGETALL', KEYS[1])}
"""
)


# KEYS: the session's keys.  ARGV: grace_ms, touch, events_maxlen, field, json
# Replaces one JSON field of the session record (metadata or lm) and touches.
SET_SESSION_FIELD = lua_script(
    """
local deadline, status = open_session(true)
if not deadline then return {status} end
redis.call('HSET', KEYS[1], ARGV[4], ARGV[5])
emit('session.updated', '{"' .. ARGV[4] .. '":' .. ARGV[5] .. '}')
backstop(deadline)
return {'ok', redis.call('HGETALL', KEYS[1])}
"""
)


# KEYS: session's keys.  ARGV: grace_ms, touch, events_maxlen, field, value
# Sets one plain field of the session record (the default multitask strategy).
CONFIGURE_SESSION = lua_script(
    """
local deadline, status = open_session(true)
if not deadline then return {status} end
redis.call('HSET', KEYS[1], ARGV[4], ARGV[5])
emit('session.updated', '{"' .. ARGV[4] .. '":"' .. ARGV[5] .. '"}')
backstop(deadline)
return {'ok', redis.call('HGETALL', KEYS[1])}
"""
)


# KEYS: session, vars, progs, done, events, runs, runq, data, pver, index, stats.  ARGV: sid
# Deletes every key of the session and its index entry; counts a deletion if it existed.
DELETE_SESSION = lua_script(
    """
local existed = redis.call('EXISTS', KEYS[1])
for i = 1, SESSION_KEYS do redis.call('DEL', KEYS[i]) end
drop_run_streams(KEYS[1])
drop_lm_cache(KEYS[1])
redis.call('ZREM', KEYS[X1], ARGV[1])
if existed == 1 then redis.call('HINCRBY', KEYS[X2], 'deleted', 1) end
return existed
"""
)


# KEYS: index.  ARGV: limit
# Session ids whose indexed deadline (a lower bound of the real one) has passed.
EXPIRY_CANDIDATES = lua_script(
    """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', NOW, 'LIMIT', 0, tonumber(ARGV[1]))
"""
)


# KEYS: index, stats, then the 9 keys of each session.  ARGV: sids
# Re-checks each deadline atomically: an expired session loses every key and is counted
# once; a session touched since it was indexed is re-indexed at its real deadline; one
# already removed by native expiry is dropped from the index and counted.
EXPIRE_SESSIONS = lua_script(
    """
local expired, kept = 0, 0
for n = 1, #ARGV do
  local sid = ARGV[n]
  local base = 2 + (n - 1) * SESSION_KEYS
  local deadline = redis.call('HGET', KEYS[base + 1], 'deadline_ms')
  if deadline and tonumber(deadline) > NOW then
    redis.call('ZADD', KEYS[1], 'XX', tonumber(deadline), sid)
    kept = kept + 1
  else
    for i = 1, SESSION_KEYS do redis.call('DEL', KEYS[base + i]) end
    drop_run_streams(KEYS[base + 1])
    drop_lm_cache(KEYS[base + 1])
    if redis.call('ZREM', KEYS[1], sid) == 1 then expired = expired + 1 end
  end
end
if expired > 0 then redis.call('HINCRBY', KEYS[2], 'expired', expired) end
return {expired, kept}
"""
)
