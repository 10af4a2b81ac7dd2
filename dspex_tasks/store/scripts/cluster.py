"""Redis Cluster mode: the session-slot halves of the cross-slot session scripts."""

from __future__ import annotations

from dspex_tasks.store.scripts.lua import lua_script

__all__ = ["CLUSTER_CREATE_SESSION", "CLUSTER_DELETE_SESSION", "CLUSTER_EXPIRE_SESSION"]

# --- Redis Cluster mode -----------------------------------------------------------------
# In a cluster a script may only touch keys of one hash slot. These are the session-slot
# halves of CREATE_SESSION, DELETE_SESSION and EXPIRE_SESSIONS; the caller then updates
# the index and stats with single-key commands (see StoreCore's docstring).

# KEYS: session, vars, progs, done, events, runs, runq, data, pver.
# ARGV: grace_ms, touch, events_maxlen, sid, ttl_ms, metadata_json, exist_ok, quota_full
#       ('1': the index is at DSPEX_MAX_SESSIONS)
# Like CREATE_SESSION without the index and stats: answers {'exists'}, {'quota'},
# {'ok', 0, record} (exist_ok, live) or {'ok', 1, record, deadline} (created; an expired
# record in the way was deleted first).
CLUSTER_CREATE_SESSION = lua_script(
    """
local ttl = tonumber(ARGV[5])
local deadline, status = open_session(ARGV[7] == '1')
if deadline then
  if ARGV[7] ~= '1' then return {'exists'} end
  backstop(deadline)
  return {'ok', 0, redis.call('HGETALL', KEYS[1])}
end
if ARGV[8] == '1' then return {'quota'} end
if status == 'expired' then
  for i = 1, SESSION_KEYS do redis.call('DEL', KEYS[i]) end
  drop_run_streams(KEYS[1])
  drop_lm_cache(KEYS[1])
end
deadline = new_session(ttl, ARGV[6])
emit('session.created', '{"ttl_s":' .. ttl / 1000 .. ',"metadata":' .. ARGV[6] .. '}')
backstop(deadline)
return {'ok', 1, redis.call('HGETALL', KEYS[1]), deadline}
"""
)


# KEYS: session, vars, progs, done, events, runs, runq, data, pver.
# Deletes every key of the session; answers 1 if its record existed.
CLUSTER_DELETE_SESSION = lua_script(
    """
local existed = redis.call('EXISTS', KEYS[1])
for i = 1, SESSION_KEYS do redis.call('DEL', KEYS[i]) end
drop_run_streams(KEYS[1])
drop_lm_cache(KEYS[1])
return existed
"""
)


# KEYS: session, vars, progs, done, events, runs, runq, data, pver.
# Re-checks the deadline: a live session answers its deadline (the caller re-indexes it);
# an expired or vanished one loses every key and answers 0.
CLUSTER_EXPIRE_SESSION = lua_script(
    """
local deadline = redis.call('HGET', KEYS[1], 'deadline_ms')
if deadline and tonumber(deadline) > NOW then return tonumber(deadline) end
for i = 1, SESSION_KEYS do redis.call('DEL', KEYS[i]) end
drop_run_streams(KEYS[1])
drop_lm_cache(KEYS[1])
return 0
"""
)
