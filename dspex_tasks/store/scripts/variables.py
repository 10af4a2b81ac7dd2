"""Variable scripts: register, read, list, write (compare-and-set, batches), delete."""

from __future__ import annotations

from dspex_tasks.store.scripts.lua import (
    REGISTER_ARGS_PER_VARIABLE,
    UPDATE_ARGS_PER_VARIABLE,
    lua_script,
)

__all__ = [
    "DELETE_VARIABLE",
    "GET_VARIABLES",
    "LIST_VARIABLES",
    "REGISTER_VARIABLES",
    "UPDATE_VARIABLES",
]

# KEYS: session, vars, progs, done, events, runs, runq, data, pver.
# ARGV: grace_ms, touch, events_maxlen, count, then per variable: name, tag, type_json,
#       constraints_json, description_json, value_json, metadata_json ('' for none),
#       history (versions kept, the current one included)
# Registers variables all or nothing; the server adds seq and created_ms to the meta.
REGISTER_VARIABLES = lua_script(
    f"local REGISTER_ARGS = {REGISTER_ARGS_PER_VARIABLE}\n"
    """
local deadline, status = open_session(true)
if not deadline then return {status} end
local count = tonumber(ARGV[4])
local taken, ids = {}, {}
for n = 0, count - 1 do
  local b = 5 + n * REGISTER_ARGS
  local name = ARGV[b]
  if redis.call('HEXISTS', KEYS[2], 'm:' .. name) == 1 then
    taken[#taken + 1] = name
  else
    local owner, _, id = resolve(name)
    if owner then ids[#ids + 1] = name end
  end
  -- A new id must not equal a live name either (48 random bits: the caller draws again).
  if redis.call('HEXISTS', KEYS[2], 'm:var_' .. name .. '_' .. ARGV[b + 1]) == 1 then
    return {'retag'}
  end
end
if #ids > 0 then return {'isid', ids} end
if #taken > 0 then return {'exists', taken} end
local now36 = b36(NOW)
for n = 0, count - 1 do
  local b = 5 + n * REGISTER_ARGS
  local name = ARGV[b]
  local seq = redis.call('HINCRBY', KEYS[1], 'var_seq', 1)
  local meta = '["' .. ARGV[b + 1] .. '",' .. ARGV[b + 2] .. ',' .. seq .. ',"' .. now36
    .. '",' .. ARGV[b + 7] .. ']'
  redis.call('HSET', KEYS[2], name, '1:' .. now36 .. ':' .. ARGV[b + 5], 'm:' .. name, meta)
  if ARGV[b + 3] ~= '' then redis.call('HSET', KEYS[2], 'c:' .. name, ARGV[b + 3]) end
  if ARGV[b + 4] ~= '' then redis.call('HSET', KEYS[2], 's:' .. name, ARGV[b + 4]) end
  if ARGV[b + 6] ~= '' then redis.call('HSET', KEYS[2], 'd:' .. name, ARGV[b + 6]) end
  var_event('variable.registered', name, meta, 1, ARGV[b + 5], '')
end
redis.call('HINCRBY', KEYS[1], 'var_count', count)
backstop(deadline)
return {'ok', NOW}
"""
)


# KEYS: the session's keys.  ARGV: grace_ms, touch, events_maxlen, tokens...
# Reads variables by name or id: per token either false or {name, meta, record,
# constraints, description, metadata}.
GET_VARIABLES = lua_script(
    """
local deadline, status = open_session(TOUCH)
if not deadline then return {status} end
local out = read_variables(4)
if TOUCH then backstop(deadline) end
return {'ok', out}
"""
)


# KEYS: session, vars, progs, done, events, runs, runq, data, pver.
# ARGV: grace_ms, touch, events_maxlen
# Every variable field of the session (for listing and export).
LIST_VARIABLES = lua_script(
    """
local deadline, status = open_session(TOUCH)
if not deadline then return {status} end
if TOUCH then backstop(deadline) end
return {'ok', redis.call('HGETALL', KEYS[2])}
"""
)


# KEYS: session, vars, progs, done, events, runs, runq, data, pver.
# ARGV: grace_ms, touch, events_maxlen, atomic, task_id ('' for none), keep_ms,
#       task_result_json, count, run_id (the run writing, '' for none: task_id),
#       then per variable: token, expected_id, value_json, expected_version ('' for
#       none), metadata_json ('' keeps it; '{}' removes it), metadata_base (the stored
#       metadata the caller merged its patch into, '' for none; ignored without
#       metadata_json)
# Atomic: checks every variable first and writes all or nothing. Non-atomic: writes
# each variable that passes. Answers per variable {status, version_or_current, metadata}.
# With a task id the writes happen at most once per task: a task id already recorded in
# the done hash answers {'duplicate', result} and writes nothing, and a successful write
# records the task's result in the same atomic step.
UPDATE_VARIABLES = lua_script(
    f"local UPDATE_ARGS = {UPDATE_ARGS_PER_VARIABLE}\n"
    """
local deadline, status = open_session(true)
if not deadline then return {status} end
local atomic, task_id, count = ARGV[4] == '1', ARGV[5], tonumber(ARGV[8])
-- The run the writes belong to (events, history, and its undo log for a rollback).
local run = ARGV[9] ~= '' and ARGV[9] or task_id
if task_id ~= '' then
  local rec = redis.call('HGET', KEYS[4], task_id)
  if rec and string.sub(rec, 1, 5) == 'done:' then
    return {'duplicate', string.match(rec, '^done:%d+:(.*)$')}
  end
end
local results, names, metas, records, stored, failed = {}, {}, {}, {}, {}, false
for n = 0, count - 1 do
  local b = 10 + n * UPDATE_ARGS
  local name, meta, id = resolve(ARGV[b])
  if not name then
    results[n + 1] = {'novar', 0}
  elseif id ~= ARGV[b + 1] then
    results[n + 1] = {'stale', 0}
  else
    local f = redis.call('HMGET', KEYS[2], name, 'd:' .. name)
    local record = f[1]
    local version = tonumber(string.match(record, '^(%d+):'))
    local stored_meta = f[2] or ''
    stored[n + 1] = f[2]
    if ARGV[b + 3] ~= '' and tonumber(ARGV[b + 3]) ~= version then
      results[n + 1] = {'conflict', version}
    elseif ARGV[b + 4] ~= '' and stored_meta ~= ARGV[b + 5] then
      results[n + 1] = {'metastale', version, stored_meta}
    else
      results[n + 1] = {'ok', version + 1}
      names[n + 1], metas[n + 1], records[n + 1] = name, meta, record
    end
  end
  if results[n + 1][1] ~= 'ok' then failed = true end
end
if atomic and failed then
  for n = 1, count do
    if results[n][1] == 'ok' then results[n] = {'skipped', results[n][2] - 1} end
  end
  backstop(deadline)
  return {'failed', results}
end
for n = 0, count - 1 do
  local name = names[n + 1]
  if name then
    local b = 10 + n * UPDATE_ARGS
    if run ~= '' then remember_undo(run, name, metas[n + 1], records[n + 1]) end
    write_record(name, metas[n + 1], records[n + 1], results[n + 1][2], ARGV[b + 2], run,
      'variable.updated')
    -- The variable's metadata after the write: none, the new one, or as it was.
    if ARGV[b + 4] == '{}' then
      redis.call('HDEL', KEYS[2], 'd:' .. name)
      results[n + 1][3] = false
    elseif ARGV[b + 4] ~= '' then
      redis.call('HSET', KEYS[2], 'd:' .. name, ARGV[b + 4])
      results[n + 1][3] = ARGV[b + 4]
    else
      results[n + 1][3] = stored[n + 1]
    end
  end
end
if task_id ~= '' then
  redis.call('HSET', KEYS[4], task_id, 'done:' .. (NOW + tonumber(ARGV[6])) .. ':' .. ARGV[7])
end
backstop(deadline)
return {'ok', results, NOW}
"""
)


# KEYS: session, vars, progs, done, events, runs, runq, data, pver.
# ARGV: grace_ms, touch, events_maxlen, token
DELETE_VARIABLE = lua_script(
    """
local deadline, status = open_session(true)
if not deadline then return {status} end
local name, meta, id = resolve(ARGV[4])
if not name then return {'novar'} end
local version = string.match(redis.call('HGET', KEYS[2], name), '^(%d+):')
drop_variable(name)
var_event('variable.deleted', name, meta, version, 'null', '')
redis.call('HINCRBY', KEYS[1], 'var_count', -1)
backstop(deadline)
return {'ok', id}
"""
)
