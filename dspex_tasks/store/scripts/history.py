"""History scripts: a variable's kept versions, rollback, snapshot and restore."""

from __future__ import annotations

from dspex_tasks.store.scripts.compile import VERSIONS_LUA
from dspex_tasks.store.scripts.lua import (
    RESTORE_ARGS_PER_VARIABLE,
    lua_script,
)

__all__ = ["GET_VARIABLE_HISTORY", "RESTORE", "ROLLBACK_VARIABLE", "SNAPSHOT"]

# KEYS: session, vars, progs, done, events, runs, runq, data, pver.
# ARGV: grace_ms, touch, events_maxlen, token, version, expected_version ('' for none)
# Writes the value that ``token`` had at ``version`` as a new version (history kept by
# write_record); answers {'ok', new_version, value_json, metadata}, {'novar'},
# {'conflict', current} or {'nohistory', current} when that version was not kept.
ROLLBACK_VARIABLE = lua_script(
    """
local deadline, status = open_session(true)
if not deadline then return {status} end
local name, meta = resolve(ARGV[4])
if not name then return {'novar'} end
local record = redis.call('HGET', KEYS[2], name)
local version = tonumber(string.match(record, '^(%d+):'))
if ARGV[6] ~= '' and tonumber(ARGV[6]) ~= version then return {'conflict', version} end
local target, value = tonumber(ARGV[5]), nil
if target == version then
  value = string.match(record, '^%d+:[^:]*:(.*)$')
else
  local h = redis.call('HGET', KEYS[2], 'h:' .. name)
  for _, entry in ipairs(h and cjson.decode(h) or {}) do
    local old = type(entry) == 'table' and entry[1] or entry
    if tonumber(string.match(old, '^(%d+):')) == target then
      value = string.match(old, '^%d+:[^:]*:(.*)$')
      break
    end
  end
end
if not value then return {'nohistory', version} end
write_record(name, meta, record, version + 1, value, '', 'variable.rolled_back')
backstop(deadline)
return {'ok', version + 1, value, redis.call('HGET', KEYS[2], 'd:' .. name), NOW}
"""
)


# KEYS: session, vars, progs, done, events, runs, runq, data, pver.
# ARGV: grace_ms, touch, events_maxlen, token
# A variable's meta, current record, the run that wrote it and its kept older versions:
# {'ok', meta, record, run_id or false, history JSON or false} or {'novar'}.
GET_VARIABLE_HISTORY = lua_script(
    """
local deadline, status = open_session(TOUCH)
if not deadline then return {status} end
local name, meta = resolve(ARGV[4])
if not name then return {'novar'} end
if TOUCH then backstop(deadline) end
local f = redis.call('HMGET', KEYS[2], name, 'r:' .. name, 'h:' .. name)
return {'ok', meta, f[1], f[2], f[3]}
"""
)


# KEYS: session, vars, progs, done, events, runs, runq, data, pver.
# ARGV: grace_ms, touch, events_maxlen
# One consistent read of everything a snapshot holds: the variables hash, the programs
# hash and the session record.
SNAPSHOT = lua_script(
    """
local deadline, status = open_session(TOUCH)
if not deadline then return {status} end
if TOUCH then backstop(deadline) end
return {'ok', redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3]),
  redis.call('HGETALL', KEYS[1])}
"""
)


# KEYS: session, vars, progs, done, events, runs, runq, data, pver.
# ARGV: grace_ms, touch, events_maxlen, lm_json, nvars, then per variable: name, tag,
#       type_json, constraints_json, description_json, value_json, metadata_json,
#       version, history; then nprogs, then per program: program_id, spec_json; last,
#       the program history depth.
# Makes the session's variables, programs and LM settings those given (validated by the
# caller), all in this one script. Versions never go backwards: a variable still there
# with the same id gets a new version only if its value or metadata differs; one with
# another id (deleted and registered again since) is replaced at max(both versions) + 1;
# a missing one comes back with its id at its snapshot version + 1. Variables and
# programs not in the snapshot are deleted. Each change appends its event.
RESTORE = lua_script(
    VERSIONS_LUA + f"local RESTORE_ARGS = {RESTORE_ARGS_PER_VARIABLE}\n"
    """
local deadline, status = open_session(true)
if not deadline then return {status} end
local nvars = tonumber(ARGV[5])
local wanted = {}
for n = 0, nvars - 1 do wanted[ARGV[6 + n * RESTORE_ARGS]] = 6 + n * RESTORE_ARGS end
-- Variables not in the snapshot go first.
local fields = redis.call('HGETALL', KEYS[2])
for i = 1, #fields, 2 do
  local key = fields[i]
  if string.sub(key, 1, 2) == 'm:' and not wanted[string.sub(key, 3)] then
    local name = string.sub(key, 3)
    local version = string.match(redis.call('HGET', KEYS[2], name), '^(%d+):')
    drop_variable(name)
    redis.call('HINCRBY', KEYS[1], 'var_count', -1)
    var_event('variable.deleted', name, fields[i + 1], version, 'null', '')
  end
end
local now36 = b36(NOW)
for n = 0, nvars - 1 do
  local b = 6 + n * RESTORE_ARGS
  local name, tag, value, metadata = ARGV[b], ARGV[b + 1], ARGV[b + 5], ARGV[b + 6]
  local want_version = tonumber(ARGV[b + 7])
  local meta = redis.call('HGET', KEYS[2], 'm:' .. name)
  local record = redis.call('HGET', KEYS[2], name)
  if meta and string.match(meta, '^%["(%x+)"') == tag then
    local version = tonumber(string.match(record, '^(%d+):'))
    local same_value = string.match(record, '^%d+:[^:]*:(.*)$') == value
    local same_meta = (redis.call('HGET', KEYS[2], 'd:' .. name) or '') == metadata
    if not (same_value and same_meta) then
      write_record(name, meta, record, version + 1, value, '', 'variable.updated')
      if metadata == '' then
        redis.call('HDEL', KEYS[2], 'd:' .. name)
      else
        redis.call('HSET', KEYS[2], 'd:' .. name, metadata)
      end
    end
  else
    local version = want_version + 1
    if meta then
      local current = tonumber(string.match(record, '^(%d+):'))
      if current >= version then version = current + 1 end
      drop_variable(name)
      redis.call('HINCRBY', KEYS[1], 'var_count', -1)
      var_event('variable.deleted', name, meta, current, 'null', '')
    end
    local seq = redis.call('HINCRBY', KEYS[1], 'var_seq', 1)
    meta = '["' .. tag .. '",' .. ARGV[b + 2] .. ',' .. seq .. ',"' .. now36 .. '",'
      .. ARGV[b + 8] .. ']'
    redis.call('HSET', KEYS[2], name, version .. ':' .. now36 .. ':' .. value, 'm:' .. name, meta)
    if ARGV[b + 3] ~= '' then redis.call('HSET', KEYS[2], 'c:' .. name, ARGV[b + 3]) end
    if ARGV[b + 4] ~= '' then redis.call('HSET', KEYS[2], 's:' .. name, ARGV[b + 4]) end
    if metadata ~= '' then redis.call('HSET', KEYS[2], 'd:' .. name, metadata) end
    redis.call('HINCRBY', KEYS[1], 'var_count', 1)
    var_event('variable.registered', name, meta, version, value, '')
  end
end
-- Programs.
local pbase = 6 + nvars * RESTORE_ARGS
local nprogs = tonumber(ARGV[pbase])
local programs = {}
for n = 0, nprogs - 1 do programs[ARGV[pbase + 1 + n * 2]] = ARGV[pbase + 2 + n * 2] end
local stored = redis.call('HGETALL', KEYS[3])
for i = 1, #stored, 2 do
  if not programs[stored[i]] then
    redis.call('HDEL', KEYS[3], stored[i])
    drop_versions(stored[i])
    emit('program.deleted', '{"program_id":"' .. stored[i] .. '"}')
  end
end
-- A program written back is a new version, like any write (its event says which).
local depth = tonumber(ARGV[#ARGV])
for pid, spec in pairs(programs) do
  if redis.call('HGET', KEYS[3], pid) ~= spec then
    redis.call('HSET', KEYS[3], pid, spec)
    new_version(pid, spec, false, false, false, depth)
  end
end
-- LM settings.
if redis.call('HGET', KEYS[1], 'lm') ~= ARGV[4] then
  redis.call('HSET', KEYS[1], 'lm', ARGV[4])
  emit('session.updated', '{"lm":' .. ARGV[4] .. '}')
end
backstop(deadline)
return {'ok'}
"""
)
