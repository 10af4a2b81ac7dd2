"""Compile scripts: stored datasets, program versions, the optimization lease and a
compile run's checkpoint (DESIGN.md §12).

The program-versions hash (``KEYS[9]``, ``Keys.program_versions``) holds, per program
id (ids never contain ``#``):

- ``<pid>``       the version index, JSON, newest first: ``[[version, created_ms, score,
                  run_id, baseline_score], ...]`` (``false`` for a missing score or run);
- ``<pid>#<n>``   the spec JSON of version ``n`` (kept for the index's versions only);
- ``<pid>#lock``  the optimization lease: ``{"run", "token", "expires"}`` (server ms);
- ``<pid>#ckpt``  the holding compile's checkpoint: ``{"run", "state"}``.

The lease is held by one *delivery* of a compile run (its token), so a second delivery
of the same run (the broker handed the message out again) can tell a live holder from
a dead one: it waits while the lease is renewed, and takes over once it lapses.
"""

from __future__ import annotations

from dspex_tasks.store.scripts.lua import lua_script

# Only scripts here: ``all_scripts`` registers what ``__all__`` lists.
__all__ = ["COMPILE_OP", "DATASET_OP"]

#: Lua shared by the scripts that write a program (PROGRAM_OP too): the lease check and
#: a new version recorded in the same script as the write.
VERSIONS_LUA = """
local PVER = KEYS[9]

-- The live lease of a program, or nil (a lapsed one is gone).
local function lease_of(pid)
  local raw = redis.call('HGET', PVER, pid .. '#lock')
  if not raw then return nil end
  local lease = cjson.decode(raw)
  if tonumber(lease.expires) <= NOW then return nil end
  return lease
end

-- Records ``spec`` (already in the programs hash) as the newest version of ``pid``,
-- keeping the ``depth`` most recent; returns the new version number.
local function new_version(pid, spec, score, run, baseline, depth)
  local raw = redis.call('HGET', PVER, pid)
  local index = raw and cjson.decode(raw) or {}
  local version = (index[1] and index[1][1] or 0) + 1
  table.insert(index, 1, {version, NOW, score, run, baseline})
  redis.call('HSET', PVER, pid .. '#' .. version, spec)
  while #index > math.max(depth, 1) do
    local gone = table.remove(index)
    redis.call('HDEL', PVER, pid .. '#' .. gone[1])
  end
  redis.call('HSET', PVER, pid, cjson.encode(index))
  emit('program.stored', cjson.encode({program_id = pid, version = version}))
  return version
end

-- Forgets every version of ``pid`` (its checkpoint and lease stay with the run).
local function drop_versions(pid)
  local raw = redis.call('HGET', PVER, pid)
  if not raw then return end
  for _, entry in ipairs(cjson.decode(raw)) do
    redis.call('HDEL', PVER, pid .. '#' .. entry[1])
  end
  redis.call('HDEL', PVER, pid)
end
"""


# KEYS: the session's keys.
# ARGV: grace_ms, touch, events_maxlen, op, name, examples_json
# op: put | get | del | list over the session's datasets hash (KEYS[8]).
DATASET_OP = lua_script(
    """
local op = ARGV[4]
local write = op == 'put' or op == 'del'
local deadline, status = open_session(TOUCH or write)
if not deadline then return {status} end
local out
if op == 'put' then
  out = redis.call('HSET', KEYS[8], ARGV[5], ARGV[6])
elseif op == 'get' then
  out = redis.call('HGET', KEYS[8], ARGV[5])
elseif op == 'del' then
  out = redis.call('HDEL', KEYS[8], ARGV[5])
else
  out = redis.call('HKEYS', KEYS[8])
end
if TOUCH or write then backstop(deadline) end
return {'ok', out}
"""
)


# KEYS: the session's keys.
# ARGV: grace_ms, touch, events_maxlen, op, program_id, then per op:
#   acquire  run_id, token, lease_ms   -> {'ok', spec, checkpoint | false}
#                                         {'done', index entry} (this run committed)
#                                         {'running'} (another delivery of the run holds it)
#                                         {'locked', holder run} / {'noprogram'}
#   renew    token, lease_ms           -> {'ok'} / {'lost'}
#   release  token, keep               -> {'ok'} (lease gone; the checkpoint too unless keep
#                                         is '1': a retry of the run resumes) / {'lost'}
#   save     token, checkpoint_json    -> {'ok'} / {'lost'}
#   commit   token, spec, score, baseline, depth  -> {'ok', version} / {'lost'}
#            (the program is written as a new version; lease and checkpoint released)
#   history                            -> {'ok', index JSON | false}
#   rollback version, force, depth     -> {'ok', version, spec} / {'locked', run} /
#                                         {'nohistory'}
#   lease                              -> {'ok', lease JSON | false}
COMPILE_OP = lua_script(
    VERSIONS_LUA
    + """
local op, pid = ARGV[4], ARGV[5]
local reads = op == 'history' or op == 'lease'
local deadline, status = open_session(TOUCH or not reads)
if not deadline then return {status} end
local lock_field, ckpt_field = pid .. '#lock', pid .. '#ckpt'

local function held(token)
  local lease = lease_of(pid)
  return lease and lease.token == token
end

local out
if op == 'acquire' then
  local run = ARGV[6]
  local raw = redis.call('HGET', PVER, pid)
  for _, entry in ipairs(raw and cjson.decode(raw) or {}) do
    if entry[4] == run then return {'done', cjson.encode(entry)} end
  end
  local spec = redis.call('HGET', KEYS[3], pid)
  if not spec then return {'noprogram'} end
  local lease = lease_of(pid)
  if lease and lease.token ~= ARGV[7] then
    if lease.run == run then return {'running'} end
    return {'locked', lease.run}
  end
  redis.call('HSET', PVER, lock_field,
    cjson.encode({run = run, token = ARGV[7], expires = NOW + tonumber(ARGV[8])}))
  local ckpt = redis.call('HGET', PVER, ckpt_field)
  if ckpt and cjson.decode(ckpt).run ~= run then
    -- A dead compile's checkpoint: another run's steps are no use to this one.
    redis.call('HDEL', PVER, ckpt_field)
    ckpt = false
  end
  out = {'ok', spec, ckpt or false}
elseif op == 'renew' then
  if not held(ARGV[6]) then return {'lost'} end
  local lease = cjson.decode(redis.call('HGET', PVER, lock_field))
  lease.expires = NOW + tonumber(ARGV[7])
  redis.call('HSET', PVER, lock_field, cjson.encode(lease))
  out = {'ok'}
elseif op == 'release' then
  local raw = redis.call('HGET', PVER, lock_field)
  if not raw or cjson.decode(raw).token ~= ARGV[6] then return {'lost'} end
  redis.call('HDEL', PVER, lock_field)
  if ARGV[7] ~= '1' then redis.call('HDEL', PVER, ckpt_field) end
  out = {'ok'}
elseif op == 'save' then
  if not held(ARGV[6]) then return {'lost'} end
  redis.call('HSET', PVER, ckpt_field, ARGV[7])
  out = {'ok'}
elseif op == 'commit' then
  if not held(ARGV[6]) then return {'lost'} end
  local run = cjson.decode(redis.call('HGET', PVER, lock_field)).run
  redis.call('HSET', KEYS[3], pid, ARGV[7])
  local version = new_version(pid, ARGV[7], tonumber(ARGV[8]) or false, run,
    tonumber(ARGV[9]) or false, tonumber(ARGV[10]))
  redis.call('HDEL', PVER, lock_field, ckpt_field)
  out = {'ok', version}
elseif op == 'history' then
  out = {'ok', redis.call('HGET', PVER, pid) or false}
elseif op == 'lease' then
  local lease = lease_of(pid)
  out = {'ok', lease and cjson.encode(lease) or false}
else -- rollback
  local lease = lease_of(pid)
  if lease and ARGV[7] ~= '1' then return {'locked', lease.run} end
  local spec = redis.call('HGET', PVER, pid .. '#' .. ARGV[6])
  if not spec then return {'nohistory'} end
  redis.call('HSET', KEYS[3], pid, spec)
  out = {'ok', new_version(pid, spec, false, false, false, tonumber(ARGV[8])), spec}
end
if TOUCH or not reads then backstop(deadline) end
return out
"""
)
