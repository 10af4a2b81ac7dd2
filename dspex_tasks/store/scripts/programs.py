"""Program scripts: session programs and global programs."""

from __future__ import annotations

from dspex_tasks.store.scripts.compile import VERSIONS_LUA
from dspex_tasks.store.scripts.lua import lua_script

__all__ = ["GLOBAL_PROGRAM_OP", "PROGRAM_OP"]

# KEYS: session, vars, progs, done, events, runs, runq, data, pver.
# ARGV: grace_ms, touch, events_maxlen, op, program_id, spec_json, force, history depth
# op: put | get | del | list over the session's programs hash. A put or del of a program
# whose optimization lease is live answers {'locked', run id} unless force is '1'; a put
# records a new version (compile.py), a del forgets the program's versions.
PROGRAM_OP = lua_script(
    VERSIONS_LUA
    + """
local op = ARGV[4]
local write = op == 'put' or op == 'del'
local deadline, status = open_session(TOUCH or write)
if not deadline then return {status} end
if write and ARGV[7] ~= '1' then
  local lease = lease_of(ARGV[5])
  if lease then return {'locked', lease.run} end
end
local out
if op == 'put' then
  redis.call('HSET', KEYS[3], ARGV[5], ARGV[6])
  out = new_version(ARGV[5], ARGV[6], false, false, false, tonumber(ARGV[8]))
elseif op == 'get' then
  out = redis.call('HGET', KEYS[3], ARGV[5])
elseif op == 'del' then
  out = redis.call('HDEL', KEYS[3], ARGV[5])
  if out == 1 then
    drop_versions(ARGV[5])
    emit('program.deleted', '{"program_id":"' .. ARGV[5] .. '"}')
  end
else
  out = redis.call('HGETALL', KEYS[3])
end
if TOUCH or write then backstop(deadline) end
return {'ok', out}
"""
)


# KEYS: global program key, global program index.
# ARGV: op (put | get | del | list), program_id, spec_json, ttl_ms
# Global programs live outside sessions with their own fixed TTL (no sliding on read).
GLOBAL_PROGRAM_OP = lua_script(
    """
local op = ARGV[1]
if op == 'put' then
  local ttl = tonumber(ARGV[4])
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ttl)
  redis.call('ZADD', KEYS[2], NOW + ttl, ARGV[2])
  return 1
elseif op == 'get' then
  return redis.call('GET', KEYS[1])
elseif op == 'del' then
  redis.call('ZREM', KEYS[2], ARGV[2])
  return redis.call('DEL', KEYS[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', NOW)
return redis.call('ZRANGE', KEYS[2], 0, -1)
"""
)
