"""The Lua every session-scoped script starts with, and the numbers Python and Lua share.

``PRELUDE`` defines the session's clock, deadline and backstop, the event log, the
variables' records and history, and the run registry, as Lua functions the scripts of
this package call; :func:`lua_script` puts before a script the parts of it that the
script uses.
"""

from __future__ import annotations

import re

__all__ = [
    "EVENT_DATA_FIELD",
    "EVENT_TYPE_FIELD",
    "PRELUDE",
    "REGISTER_ARGS_PER_VARIABLE",
    "RESTORE_ARGS_PER_VARIABLE",
    "SESSION_KEY_COUNT",
    "UPDATE_ARGS_PER_VARIABLE",
    "lua_script",
]

#: Keys a session owns (``Keys.session_keys``): session, vars, progs, done, events, runs,
#: runq, data, pver.
SESSION_KEY_COUNT = 9
#: Scripts that also touch cross-session keys get them right after the session's keys:
#: ``KEYS[X1]`` and ``KEYS[X2]`` (the expiry index and stats, or the task ledger).
SESSION_KEYS_LUA = (
    f"local SESSION_KEYS = {SESSION_KEY_COUNT}\n"
    f"local X1, X2 = {SESSION_KEY_COUNT + 1}, {SESSION_KEY_COUNT + 2}\n"
)

#: Deletes a session's run streams (``Keys.run_stream``) and their index, the zset
#: ``<session key>:streams`` (``Keys.run_streams``). Run streams are created per run, so
#: they cannot be among a script's fixed KEYS: the index is derived from the session key
#: and lists them. Every one of these keys carries the session's hash tag (one slot).
DROP_RUN_STREAMS = """
local function drop_run_streams(session_key)
  local index = session_key .. ':streams'
  local streams = redis.call('ZRANGE', index, 0, -1)
  for i = 1, #streams do redis.call('DEL', streams[i]) end
  redis.call('DEL', index)
end
"""

#: Deletes a session's session-scoped LM cache entries (``lm/cache.py``) and their index,
#: the zset ``<session key>:lmc`` (``Keys.lm_cache_index``): like run streams, they have
#: keys of their own (one per prompt) that cannot be among a script's fixed KEYS. Every
#: one of these keys carries the session's hash tag (one slot).
DROP_LM_CACHE = """
local function drop_lm_cache(session_key)
  local index = session_key .. ':lmc'
  local entries = redis.call('ZRANGE', index, 0, -1)
  for i = 1, #entries do redis.call('DEL', entries[i]) end
  redis.call('DEL', index)
end
"""

#: Milliseconds of the server's clock, as ``NOW``: the one time source of every script.
NOW = (
    SESSION_KEYS_LUA
    + DROP_RUN_STREAMS
    + DROP_LM_CACHE
    + """
local t = redis.call('TIME')
local NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
)

PRELUDE = (
    NOW
    + """
local GRACE = tonumber(ARGV[1])
local TOUCH = ARGV[2] == '1'
local EVMAX = tonumber(ARGV[3])

-- Appends one event to the session's stream (KEYS[5]) in the same script as the change
-- it records, so no reader ever sees one without the other. EVMAX 0: events are off.
local function emit(kind, data)
  if EVMAX > 0 then
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', EVMAX, '*', 't', kind, 'd', data)
  end
end

-- A variable event, stored compact: [name, tag, version, type, value(, run id)]; the
-- reader expands it to {name, id, version, type, value, run_id}.
local function var_event(kind, name, meta, version, value, run)
  if EVMAX > 0 then
    local tag, type_json = string.match(meta, '^%["(%x+)",("[^"]*")')
    local data = '["' .. name .. '","' .. tag .. '",' .. version .. ',' .. type_json .. ','
      .. value
    if run ~= '' then data = data .. ',' .. cjson.encode(run) end
    emit(kind, data .. ']')
  end
end

-- Milliseconds in base 36 (lower case), as the variables hash stores times.
local function b36(n)
  local digits, s = '0123456789abcdefghijklmnopqrstuvwxyz', ''
  repeat
    local d = n % 36
    s = string.sub(digits, d + 1, d + 1) .. s
    n = (n - d) / 36
  until n == 0
  return s
end

-- Returns the (possibly slid) deadline, or false and a status.
local function open_session(touch)
  local f = redis.call('HMGET', KEYS[1], 'ttl_ms', 'deadline_ms')
  if not f[1] then return false, 'missing' end
  local deadline = tonumber(f[2])
  if deadline <= NOW then return false, 'expired' end
  if touch then
    deadline = NOW + tonumber(f[1])
    redis.call('HSET', KEYS[1], 'accessed_ms', NOW, 'deadline_ms', deadline)
  end
  return deadline, nil
end

-- Writes a new session record (the caller removed any old one); returns its deadline.
local function new_session(ttl, metadata)
  local deadline = NOW + ttl
  redis.call('HSET', KEYS[1], 'created_ms', NOW, 'accessed_ms', NOW, 'ttl_ms', ttl,
    'deadline_ms', deadline, 'metadata', metadata, 'lm', '{}', 'var_seq', 0, 'var_count', 0)
  return deadline
end

-- Native expiry a little after the deadline on every key of the session: the backstop
-- that reclaims memory when no sweep runs. Called after the writes, so new keys get it.
local function backstop(deadline)
  local at = deadline + GRACE
  for i = 1, SESSION_KEYS do redis.call('PEXPIREAT', KEYS[i], at) end
end

-- Resolve a variable token to its name, its meta and its id; false if no live variable
-- answers to it. An id (var_<name>_<tag>) is tried first, so it always reaches the
-- variable it was issued for; registration refuses a name equal to a live id.
local function id_of(name, meta)
  return 'var_' .. name .. '_' .. string.match(meta, '^%["(%x+)"')
end

local function resolve(token)
  local name, tag = string.match(token, '^var_(.+)_(%x+)$')
  if name then
    local meta = redis.call('HGET', KEYS[2], 'm:' .. name)
    if meta and string.match(meta, '^%["(%x+)"') == tag then return name, meta, token end
  end
  local meta = redis.call('HGET', KEYS[2], 'm:' .. token)
  if not meta then return false end
  return token, meta, id_of(token, meta)
end

-- History kept for a variable: the N most recent versions, the current one included
-- (the 5th element of its meta; 0 or 1 keeps no older version).
local function history_depth(meta)
  return tonumber(string.match(meta, ',(%d+)%]$') or '0')
end

-- Writes a new current record for ``name``: the old one moves into its history
-- (``h:<name>``, newest first, each entry the record or [record, run id]), the writing
-- run is remembered (``r:<name>``), and one ``kind`` event records the change.
local function write_record(name, meta, old_record, version, value, run, kind)
  local depth = history_depth(meta)
  local fields = {name, version .. ':' .. b36(NOW) .. ':' .. value}
  local old_run = true -- unknown: dropped below if this write has no run
  if depth > 1 then
    local f = redis.call('HMGET', KEYS[2], 'h:' .. name, 'r:' .. name)
    local entries = f[1] and cjson.decode(f[1]) or {}
    old_run = f[2]
    table.insert(entries, 1, old_run and {old_record, old_run} or old_record)
    while #entries > depth - 1 do table.remove(entries) end
    fields[3], fields[4] = 'h:' .. name, cjson.encode(entries)
  end
  if run ~= '' then
    fields[#fields + 1], fields[#fields + 2] = 'r:' .. name, run
  end
  -- One HSET for the record, its history and its run (each call costs as much as a few
  -- of the script's own lines).
  redis.call('HSET', KEYS[2], unpack(fields))
  if run == '' and old_run then redis.call('HDEL', KEYS[2], 'r:' .. name) end
  var_event(kind, name, meta, version, value, run)
end

-- Every field of one variable.
local function drop_variable(name)
  redis.call('HDEL', KEYS[2], name, 'm:' .. name, 'c:' .. name, 's:' .. name, 'd:' .. name,
    'h:' .. name, 'r:' .. name)
end

-- Runs (KEYS[6] hash: run id -> record JSON, m:<run id> -> parked message; KEYS[7] list:
-- parked run ids, oldest first). The session record holds the session's default
-- strategy (multitask), how many runs are queued or running (runs_active) and the run
-- that serialized strategies let go (run_current).
local RUNS_KEEP = 100
local FINAL = {succeeded = true, failed = true, cancelled = true, interrupted = true,
  rolled_back = true, rejected = true}

-- Fields of the runs hash that are run records (not parked messages or undo entries).
local function is_record(field)
  local head = string.sub(field, 1, 2)
  return head ~= 'm:' and head ~= 'u:'
end

local function run_get(id)
  local raw = redis.call('HGET', KEYS[6], id)
  return raw and cjson.decode(raw) or nil
end

local function run_put(id, rec)
  redis.call('HSET', KEYS[6], id, cjson.encode(rec))
end

local function run_event(kind, id, rec)
  local data = '{"run_id":' .. cjson.encode(id) .. ',"task":' .. cjson.encode(rec.task)
  if rec.error_code then data = data .. ',"error_code":' .. cjson.encode(rec.error_code) end
  emit(kind, data .. '}')
end

-- Ends a run that is not final yet: status, time, event; it no longer counts as active.
local function run_finalize(id, rec, status, code)
  rec.status, rec.finished_ms = status, NOW
  if code and code ~= '' then rec.error_code = code end
  run_put(id, rec)
  redis.call('HDEL', KEYS[6], 'm:' .. id)
  if redis.call('HINCRBY', KEYS[1], 'runs_active', -1) < 0 then
    redis.call('HSET', KEYS[1], 'runs_active', 0)
  end
  run_event('run.' .. status, id, rec)
  -- Keep the registry bounded: past RUNS_KEEP records (+ slack, so this runs rarely),
  -- the oldest finished runs go.
  if redis.call('HLEN', KEYS[6]) > RUNS_KEEP * 2 + 64 then
    local fields, done = redis.call('HGETALL', KEYS[6]), {}
    for i = 1, #fields, 2 do
      if is_record(fields[i]) then
        local r = cjson.decode(fields[i + 1])
        if FINAL[r.status] then done[#done + 1] = {r.created_ms, fields[i]} end
      end
    end
    table.sort(done, function(a, b) return a[1] < b[1] end)
    for i = 1, #done - RUNS_KEEP do redis.call('HDEL', KEYS[6], done[i][2]) end
  end
end

-- The status a stopped run ends with, from what stopped it.
local function stop_status(rec)
  if rec.cancel == 'rollback' then return 'rolled_back' end
  if rec.cancel == 'interrupt' then return 'interrupted' end
  return 'cancelled'
end

-- The current serialized run ended: let the oldest parked run go (runs cancelled while
-- they waited end here, never starting). Returns its id and message, or nil.
local function release_next(id)
  if redis.call('HGET', KEYS[1], 'run_current') ~= id then return nil end
  while true do
    local next_id = redis.call('LPOP', KEYS[7])
    if not next_id then
      redis.call('HDEL', KEYS[1], 'run_current')
      return nil
    end
    local rec = run_get(next_id)
    if rec and not FINAL[rec.status] then
      if rec.cancel then
        run_finalize(next_id, rec, stop_status(rec), 'run_cancelled')
      else
        redis.call('HSET', KEYS[1], 'run_current', next_id)
        local message = redis.call('HGET', KEYS[6], 'm:' .. next_id)
        redis.call('HDEL', KEYS[6], 'm:' .. next_id)
        rec.parked = nil
        run_put(next_id, rec)
        return next_id, message
      end
    end
  end
end

-- Records a new run and decides whether it may go now: 'go', 'parked' (the message is
-- kept until the current run ends) or 'busy' (reject: recorded as rejected).
local function run_admit(id, task, strategy, message)
  local session = redis.call('HMGET', KEYS[1], 'multitask', 'runs_active', 'run_current')
  if strategy == '' then strategy = session[1] or 'parallel' end
  local active, current = tonumber(session[2] or '0'), session[3]
  local rec = {task = task, status = 'queued', created_ms = NOW, multitask = strategy,
    seq = redis.call('HINCRBY', KEYS[1], 'run_seq', 1)}
  if strategy == 'reject' and active > 0 then
    rec.status, rec.finished_ms, rec.error_code = 'rejected', NOW, 'session_busy'
    run_put(id, rec)
    run_event('run.rejected', id, rec)
    return 'busy', {}
  end
  redis.call('HINCRBY', KEYS[1], 'runs_active', 1)
  local dropped = {}
  if strategy == 'interrupt' or strategy == 'rollback' then
    -- Every run before this one stops: a running or published one where it is (its
    -- worker sees the flag), a parked one now, before it ever starts.
    local fields = redis.call('HGETALL', KEYS[6])
    for i = 1, #fields, 2 do
      local other = fields[i]
      if is_record(other) then
        local orec = cjson.decode(fields[i + 1])
        if not FINAL[orec.status] and not orec.cancel then
          orec.cancel = strategy
          if orec.parked then
            redis.call('LREM', KEYS[7], 0, other)
            run_finalize(other, orec, stop_status(orec), 'run_cancelled')
            dropped[#dropped + 1] = other
          else
            run_put(other, orec)
          end
        end
      end
    end
  end
  if strategy ~= 'parallel' and strategy ~= 'reject' and current then
    rec.parked = true
    run_put(id, rec)
    redis.call('HSET', KEYS[6], 'm:' .. id, message)
    redis.call('RPUSH', KEYS[7], id)
    run_event('run.queued', id, rec)
    return 'parked', dropped
  end
  if strategy ~= 'parallel' and strategy ~= 'reject' then
    redis.call('HSET', KEYS[1], 'run_current', id)
  end
  run_put(id, rec)
  run_event('run.queued', id, rec)
  return 'go', dropped
end

-- A run's first write of a variable keeps what it replaced ('u:<run>:<name>' in the runs
-- hash: [record, metadata, tag]), so a rollback can put it back.
local function remember_undo(run, name, meta, record)
  local rec = run_get(run)
  if not rec or FINAL[rec.status] then return end
  local field = 'u:' .. run .. ':' .. name
  if redis.call('HEXISTS', KEYS[6], field) == 1 then return end
  redis.call('HSET', KEYS[6], field, cjson.encode({record,
    redis.call('HGET', KEYS[2], 'd:' .. name) or '', string.match(meta, '^%["(%x+)"')}))
  rec.undo = rec.undo or {}
  rec.undo[#rec.undo + 1] = name
  run_put(run, rec)
end

-- Drops a run's undo log; with rollback, first writes every value it replaced back, as a
-- new version (a variable deleted or registered anew since is left alone).
local function apply_undo(id, rec, rollback)
  for _, name in ipairs(rec.undo or {}) do
    local field = 'u:' .. id .. ':' .. name
    local raw = redis.call('HGET', KEYS[6], field)
    if raw and rollback then
      local old = cjson.decode(raw)
      local meta = redis.call('HGET', KEYS[2], 'm:' .. name)
      if meta and string.match(meta, '^%["(%x+)"') == old[3] then
        local current = redis.call('HGET', KEYS[2], name)
        local version = tonumber(string.match(current, '^(%d+):'))
        write_record(name, meta, current, version + 1, string.match(old[1], '^%d+:[^:]*:(.*)$'),
          '', 'variable.rolled_back')
        if old[2] == '' then
          redis.call('HDEL', KEYS[2], 'd:' .. name)
        else
          redis.call('HSET', KEYS[2], 'd:' .. name, old[2])
        end
      end
    end
    redis.call('HDEL', KEYS[6], field)
  end
  rec.undo = nil
end

-- A worker starts run ``id``. A run no producer registered (a foreign producer) is
-- admitted here first; its ``message`` may be '' when the strategy cannot park it
-- (parallel, reject), which saves encoding it on every run: otherwise {'needmsg'}, with
-- nothing written. Answers {'ok', dropped} (now running), {'parked', dropped} (not its
-- turn: it is published again when the run ahead ends), {'rejected'}, or {'stopped',
-- status[, next_id, next_message]} (cancelled before it started, or already final).
-- ``dropped``: parked runs an interrupt or rollback ended before they started.
local function run_start(id, task, strategy, message)
  local rec, dropped = run_get(id), {}
  if not rec then
    if message == '' then
      local effective = strategy
      if effective == '' then effective = redis.call('HGET', KEYS[1], 'multitask') or 'parallel' end
      if effective ~= 'parallel' and effective ~= 'reject' then return {'needmsg'} end
    end
    local verdict
    verdict, dropped = run_admit(id, task, strategy, message)
    if verdict == 'busy' then return {'rejected'} end
    if verdict == 'parked' then return {'parked', dropped} end
    rec = run_get(id)
  end
  if FINAL[rec.status] then return {'stopped', rec.status} end
  if rec.cancel then
    local final = stop_status(rec)
    apply_undo(id, rec, final == 'rolled_back')
    run_finalize(id, rec, final, 'run_cancelled')
    local next_id, next_message = release_next(id)
    if next_id then return {'stopped', final, next_id, next_message} end
    return {'stopped', final}
  end
  if rec.parked then return {'parked'} end
  if rec.status ~= 'running' then
    rec.status, rec.started_ms = 'running', NOW
    run_put(id, rec)
    run_event('run.started', id, rec)
  end
  return {'ok', dropped}
end

-- Ends run ``id`` with ``outcome`` (succeeded | failed | stopped; a run asked to stop ends
-- cancelled / interrupted / rolled_back whatever the outcome, unless it succeeded first).
-- If it was the session's current serialized run, the next parked run goes.
-- Answers {final status[, next_id, next_message]}; {'unknown'} for no such run.
local function run_finish(id, outcome, code)
  local rec = run_get(id)
  if not rec then return {'unknown'} end
  local final = rec.status
  if not FINAL[rec.status] then
    final = outcome
    if final ~= 'succeeded' and (rec.cancel or final == 'stopped') then final = stop_status(rec) end
    apply_undo(id, rec, final == 'rolled_back')
    run_finalize(id, rec, final, code)
  end
  local next_id, message = release_next(id)
  if next_id then return {final, next_id, message} end
  return {final}
end

-- Celery's result record of a task, as the result backend (``resultbackend.py``) writes
-- it: a stored SUCCESS is never overwritten (Celery's own guard, atomic here); otherwise
-- SET (SETEX given an expiry in seconds) and PUBLISH on the key's channel, which waiting
-- result consumers listen to. 1 if written.
local function store_task_state(key, value, expires)
  local current = redis.call('GET', key)
  if current and string.find(current, '"SUCCESS"', 1, true) then
    local ok, meta = pcall(cjson.decode, current)
    if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then return 0 end
  end
  if expires > 0 then
    redis.call('SETEX', key, expires, value)
  else
    redis.call('SET', key, value)
  end
  redis.call('PUBLISH', key, value)
  return 1
end

-- The variables named by ARGV[first..]: per token false or {name, meta, record,
-- constraints, description, metadata}.
local function read_variables(first)
  local out = {}
  for n = first, #ARGV do
    local name, meta = resolve(ARGV[n])
    if name then
      local f = redis.call('HMGET', KEYS[2], name, 'c:' .. name, 's:' .. name, 'd:' .. name)
      out[#out + 1] = {name, meta, f[1], f[2], f[3], f[4]}
    else
      out[#out + 1] = false
    end
  end
  return out
end
"""
)


_DEFINES = re.compile(r"^local (?:function (\w+)|([\w, ]+?) =)", re.MULTILINE)
_WORD = re.compile(r"[A-Za-z_]\w*")
_COMMENT = re.compile(r"--.*$", re.MULTILINE)


def _library_chunks(library: str) -> list[tuple[frozenset[str], frozenset[str], str]]:
    """The library's paragraphs (blank-line separated), each with the locals it defines
    and the words its code (comments aside) uses."""
    chunks = []
    for text in library.strip("\n").split("\n\n"):
        defined: set[str] = set()
        for function, names in _DEFINES.findall(text):
            defined.update([function] if function else (n.strip() for n in names.split(",")))
        used = frozenset(_WORD.findall(_COMMENT.sub("", text))) - defined
        chunks.append((frozenset(defined), used, text))
    return chunks


_CHUNKS = _library_chunks(PRELUDE)


def lua_script(body: str) -> str:
    """``body`` after only the library definitions it uses, directly or through others.

    Redis runs a script's whole text on every call, so each local function of the library
    is a closure built per call: defining all of them cost more than the Redis commands of
    a variable read. The library is a series of blank-line separated paragraphs, each
    defining locals that only earlier paragraphs' locals feed; keeping the needed ones in
    their order keeps every reference bound.
    """
    needed = set(_WORD.findall(_COMMENT.sub("", body)))
    keep = [False] * len(_CHUNKS)
    for i in range(len(_CHUNKS) - 1, -1, -1):
        defined, used, _ = _CHUNKS[i]
        if defined & needed:
            keep[i] = True
            needed |= used
    kept = [text for (_, _, text), k in zip(_CHUNKS, keep, strict=True) if k]
    return "\n\n".join(kept) + "\n" + body


#: The stream fields of an event: its type and its data (JSON).
EVENT_TYPE_FIELD = "t"
EVENT_DATA_FIELD = "d"


#: Arguments per variable record of REGISTER_VARIABLES (name, tag, type, constraints,
#: description, value, metadata, history) and of UPDATE_VARIABLES (token, expected id, value,
#: expected version, metadata, metadata base). The Python side builds records of exactly
#: these sizes.
REGISTER_ARGS_PER_VARIABLE = 8
#: Arguments per variable of RESTORE (name, tag, type, constraints, description, value,
#: metadata, version, history).
RESTORE_ARGS_PER_VARIABLE = 9
UPDATE_ARGS_PER_VARIABLE = 6
