"""Lua scripts of the SessionStore: every multi-step write is one of these.

Session-scoped scripts take the session's keys, ``KEYS = [session, vars, progs, done,
events, runs, runq]`` (one hash-tag slot), and ``ARGV[1] = grace_ms`` (native-expiry
backstop after the deadline), ``ARGV[2] = touch`` ("1" slides the deadline), ``ARGV[3] =
events_maxlen`` (approximate length of the session's event stream; 0: no events). Time
always comes from the server's ``TIME`` so hosts with skewed clocks agree on deadlines.

Each session-scoped script answers ``{status, ...}``; :class:`Status` lists every status
a reply or a per-variable row can carry, and what it means.

Session record fields: ``created_ms``, ``accessed_ms``, ``ttl_ms``, ``deadline_ms``,
``metadata`` and ``lm`` (JSON), ``var_seq``, ``var_count``, ``done_cursor`` (where the
done-hash pruning resumes).

Variables hash, per variable (names never contain ``:``, so the bare name is free):
``<name>`` -> ``<version>:<updated>:<value JSON>`` (the part every write changes),
``m:<name>`` -> ``[tag, type, seq, "<created>"]`` (immutable), and only when present
``c:<name>`` constraints JSON, ``s:<name>`` description JSON, ``d:<name>`` metadata JSON.
A variable's id is ``var_<name>_<tag>`` with a random hex tag per registration, so an id
resolves without an index field and a re-registered name never matches an old id.
Short, name-keyed fields keep a session of small variables under Redis's listpack limits
(64-byte values, 128 fields). Times in the variables hash (``<updated>``,
``<created>``) are server milliseconds in base 36: 8 characters instead of 13, which
is 100 bytes over ten variables and one allocator size class less per session.
"""

from __future__ import annotations


class Status:
    """Reply statuses of the scripts (first element of a reply or of a per-variable row)."""

    #: Done; the rest of the reply is the answer.
    OK = "ok"
    #: No such session.
    MISSING = "missing"
    #: The session's deadline passed; the caller runs the expiry script.
    EXPIRED = "expired"
    #: Create without exist_ok of a live session / register of a taken variable name.
    EXISTS = "exists"
    #: DSPEX_MAX_SESSIONS reached.
    QUOTA = "quota"
    #: No live variable answers to the token.
    NOVAR = "novar"
    #: The caller's cached variable schema names another id than the stored one.
    STALE = "stale"
    #: ``expected_version`` differs from the stored version (row carries the current one).
    CONFLICT = "conflict"
    #: Not written because another variable of an atomic batch failed.
    SKIPPED = "skipped"
    #: An atomic batch wrote nothing (rows say why per variable).
    FAILED = "failed"
    #: The task id already recorded its result (reply carries it); nothing written.
    DUPLICATE = "duplicate"
    #: The task id's earlier delivery still holds its lease.
    RUNNING = "running"
    #: The task id already finished (reply carries its result).
    DONE = "done"
    #: The program a task names does not exist.
    NOPROGRAM = "noprogram"
    #: Run admission: publish the run now / it waits for the run ahead / refused.
    GO = "go"
    PARKED = "parked"
    BUSY = "busy"
    #: A run the worker must not run (cancelled before it started, or final already).
    STOPPED = "stopped"
    #: The run was refused when a worker admitted it (reject strategy).
    REJECTED = "rejected"
    #: The run is running; its worker has been asked to stop it.
    SIGNALLED = "signalled"
    #: No run with that id in the session.
    NORUN = "norun"
    #: The run already ended; nothing to do.
    FINAL = "final"
    #: A name to register is the id of a live variable (reply carries the names).
    ISID = "isid"
    #: A drawn variable tag makes an id equal to a live name: draw again.
    RETAG = "retag"
    #: The version to roll back to is not in the variable's history.
    NOHISTORY = "nohistory"
    #: The stored metadata is not what the caller merged its patch into (row carries the
    #: stored metadata): merge again.
    METASTALE = "metastale"


#: Keys a session owns (``Keys.session_keys``): session, vars, progs, done, events.
SESSION_KEY_COUNT = 7
#: Scripts that also touch cross-session keys get them right after the session's keys:
#: ``KEYS[X1]`` and ``KEYS[X2]`` (the expiry index and stats, or the task ledger).
_SESSION_KEYS = (
    f"local SESSION_KEYS = {SESSION_KEY_COUNT}\n"
    f"local X1, X2 = {SESSION_KEY_COUNT + 1}, {SESSION_KEY_COUNT + 2}\n"
    # Session-scoped LM cache entries (lm/cache.py) have keys of their own, per prompt,
    # so they cannot be among a script's fixed KEYS: their index, the zset
    # ``<session key>:lmc`` (``Keys.lm_cache_index``), lists them; deleting a session
    # deletes them through it. Every one of these keys carries the session's hash tag.
    """
local function drop_lm_cache(session_key)
  local index = session_key .. ':lmc'
  local entries = redis.call('ZRANGE', index, 0, -1)
  for i = 1, #entries do redis.call('DEL', entries[i]) end
  redis.call('DEL', index)
end
"""
)

#: Milliseconds of the server's clock, as ``NOW``: the one time source of every script.
_NOW = (
    _SESSION_KEYS
    + """
local t = redis.call('TIME')
local NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
)

_PRELUDE = (
    _NOW
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
  if depth > 1 then
    local h = redis.call('HGET', KEYS[2], 'h:' .. name)
    local entries = h and cjson.decode(h) or {}
    local old_run = redis.call('HGET', KEYS[2], 'r:' .. name)
    table.insert(entries, 1, old_run and {old_record, old_run} or old_record)
    while #entries > depth - 1 do table.remove(entries) end
    redis.call('HSET', KEYS[2], 'h:' .. name, cjson.encode(entries))
  end
  redis.call('HSET', KEYS[2], name, version .. ':' .. b36(NOW) .. ':' .. value)
  if run ~= '' then
    redis.call('HSET', KEYS[2], 'r:' .. name, run)
  else
    redis.call('HDEL', KEYS[2], 'r:' .. name)
  end
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
  local rec = {task = task, status = 'queued', created_ms = NOW, multitask = strategy}
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


def _session_script(body: str) -> str:
    return _PRELUDE + body


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


# KEYS: session, vars, progs, done, events, runs, runq, index, stats
# ARGV: grace_ms, touch, events_maxlen, sid, ttl_ms, metadata_json, exist_ok, max_sessions (0: none)
# Creates the session record and indexes it, or (exist_ok) touches the existing one.
# An existing but expired session is expired first (counted), then created anew.
CREATE_SESSION = (
    _PRELUDE
    + """
local sid, ttl = ARGV[4], tonumber(ARGV[5])
local deadline, status = open_session(ARGV[7] == '1')
if deadline then
  if ARGV[7] ~= '1' then return {'exists'} end
  backstop(deadline)
  return {'ok', 0, redis.call('HGETALL', KEYS[1])}
end
if status == 'expired' then
  for i = 1, SESSION_KEYS do redis.call('DEL', KEYS[i]) end
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

# KEYS: session, vars, progs, done, events, runs, runq.  ARGV: grace_ms, touch, events_maxlen
# Reads the session record (sliding the deadline when touch).
GET_SESSION = _session_script(
    """
local deadline, status = open_session(TOUCH)
if not deadline then return {status} end
if TOUCH then backstop(deadline) end
return {'ok', redis.call('HGETALL', KEYS[1])}
"""
)

# KEYS: the session's keys.  ARGV: grace_ms, touch, events_maxlen, field, json
# Replaces one JSON field of the session record (metadata or lm) and touches.
SET_SESSION_FIELD = _session_script(
    """
local deadline, status = open_session(true)
if not deadline then return {status} end
redis.call('HSET', KEYS[1], ARGV[4], ARGV[5])
emit('session.updated', '{"' .. ARGV[4] .. '":' .. ARGV[5] .. '}')
backstop(deadline)
return {'ok', redis.call('HGETALL', KEYS[1])}
"""
)

# KEYS: session, vars, progs, done, events, runs, runq, index, stats.  ARGV: sid
# Deletes every key of the session and its index entry; counts a deletion if it existed.
DELETE_SESSION = (
    _SESSION_KEYS
    + """
local existed = redis.call('EXISTS', KEYS[1])
for i = 1, SESSION_KEYS do redis.call('DEL', KEYS[i]) end
drop_lm_cache(KEYS[1])
redis.call('ZREM', KEYS[X1], ARGV[1])
if existed == 1 then redis.call('HINCRBY', KEYS[X2], 'deleted', 1) end
return existed
"""
)

# KEYS: index.  ARGV: limit
# Session ids whose indexed deadline (a lower bound of the real one) has passed.
EXPIRY_CANDIDATES = (
    _NOW
    + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', NOW, 'LIMIT', 0, tonumber(ARGV[1]))
"""
)

# KEYS: index, stats, then the 7 keys of each session.  ARGV: sids
# Re-checks each deadline atomically: an expired session loses every key and is counted
# once; a session touched since it was indexed is re-indexed at its real deadline; one
# already removed by native expiry is dropped from the index and counted.
EXPIRE_SESSIONS = (
    _NOW
    + """
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
    drop_lm_cache(KEYS[base + 1])
    if redis.call('ZREM', KEYS[1], sid) == 1 then expired = expired + 1 end
  end
end
if expired > 0 then redis.call('HINCRBY', KEYS[2], 'expired', expired) end
return {expired, kept}
"""
)

# KEYS: session, vars, progs, done, events, runs, runq.
# ARGV: grace_ms, touch, events_maxlen, count, then per variable: name, tag, type_json,
#       constraints_json, description_json, value_json, metadata_json ('' for none),
#       history (versions kept, the current one included)
# Registers variables all or nothing; the server adds seq and created_ms to the meta.
REGISTER_VARIABLES = _session_script(
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
GET_VARIABLES = _session_script(
    """
local deadline, status = open_session(TOUCH)
if not deadline then return {status} end
local out = read_variables(4)
if TOUCH then backstop(deadline) end
return {'ok', out}
"""
)

# KEYS: session, vars, progs, done, events, runs, runq.  ARGV: grace_ms, touch, events_maxlen
# Every variable field of the session (for listing and export).
LIST_VARIABLES = _session_script(
    """
local deadline, status = open_session(TOUCH)
if not deadline then return {status} end
if TOUCH then backstop(deadline) end
return {'ok', redis.call('HGETALL', KEYS[2])}
"""
)

# KEYS: session, vars, progs, done, events, runs, runq.
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
UPDATE_VARIABLES = _session_script(
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
local results, names, metas, records, failed = {}, {}, {}, {}, false
for n = 0, count - 1 do
  local b = 10 + n * UPDATE_ARGS
  local name, meta, id = resolve(ARGV[b])
  if not name then
    results[n + 1] = {'novar', 0}
  elseif id ~= ARGV[b + 1] then
    results[n + 1] = {'stale', 0}
  else
    local record = redis.call('HGET', KEYS[2], name)
    local version = tonumber(string.match(record, '^(%d+):'))
    local stored_meta = redis.call('HGET', KEYS[2], 'd:' .. name) or ''
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
    if ARGV[b + 4] == '{}' then
      redis.call('HDEL', KEYS[2], 'd:' .. name)
    elseif ARGV[b + 4] ~= '' then
      redis.call('HSET', KEYS[2], 'd:' .. name, ARGV[b + 4])
    end
    results[n + 1][3] = redis.call('HGET', KEYS[2], 'd:' .. name)
  end
end
if task_id ~= '' then
  redis.call('HSET', KEYS[4], task_id, 'done:' .. (NOW + tonumber(ARGV[6])) .. ':' .. ARGV[7])
end
backstop(deadline)
return {'ok', results, NOW}
"""
)

# KEYS: session, vars, progs, done, events, runs, runq.  ARGV: grace_ms, touch, events_maxlen, token
DELETE_VARIABLE = _session_script(
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

# KEYS: session, vars, progs, done, events, runs, runq.
# ARGV: grace_ms, touch, events_maxlen, op, program_id, spec_json
# op: put | get | del | list over the session's programs hash.
PROGRAM_OP = _session_script(
    """
local op = ARGV[4]
local deadline, status = open_session(TOUCH or op == 'put' or op == 'del')
if not deadline then return {status} end
local out
if op == 'put' then
  redis.call('HSET', KEYS[3], ARGV[5], ARGV[6])
  emit('program.stored', '{"program_id":"' .. ARGV[5] .. '"}')
  out = 1
elseif op == 'get' then
  out = redis.call('HGET', KEYS[3], ARGV[5])
elseif op == 'del' then
  out = redis.call('HDEL', KEYS[3], ARGV[5])
  if out == 1 then emit('program.deleted', '{"program_id":"' .. ARGV[5] .. '"}') end
else
  out = redis.call('HGETALL', KEYS[3])
end
if TOUCH or op == 'put' or op == 'del' then backstop(deadline) end
return {'ok', out}
"""
)

# KEYS: session, vars, progs, done, events, runs, runq.
# ARGV: grace_ms, touch, events_maxlen, task_id ('' for none), attempt, lease_ms, program_id ('' for
#       none), tokens...
# A task's whole context in one round trip: the session record (touched), the program
# spec, the named variables, and a claim on the task id. A task id whose earlier delivery
# still holds its lease (same or later attempt) answers {'running'}; one that already
# wrote its outputs answers {'done', result_json}. Lapsed records are pruned here, a few
# per claim (the session record's ``done_cursor`` remembers where), so the done hash stays
# near its live size at O(1) cost per claim.
TASK_CONTEXT = _session_script(
    """
local deadline, status = open_session(true)
if not deadline then return {status} end
local task_id, attempt = ARGV[4], tonumber(ARGV[5])
if task_id ~= '' then
  local rec = redis.call('HGET', KEYS[4], task_id)
  if rec then
    local kind, until_ms, rest = string.match(rec, '^(%a+):(%d+):(.*)$')
    if kind == 'done' then return {'done', rest} end
    if kind == 'running' and tonumber(until_ms) > NOW and tonumber(rest) >= attempt then
      return {'running'}
    end
  end
  -- Prune lapsed records a few at a time: HSCAN from a cursor kept in the session
  -- record, so a claim costs O(1) however many records the window holds (reading the
  -- whole hash on every claim made a busy session's tasks O(n)). Every claim adds one
  -- record and visits 16, so the hash stays near its live size.
  if redis.call('HLEN', KEYS[4]) > 256 then
    local scan = redis.call('HSCAN', KEYS[4], redis.call('HGET', KEYS[1], 'done_cursor') or '0',
      'COUNT', 16)
    local batch = scan[2]
    for i = 1, #batch, 2 do
      local until_ms = string.match(batch[i + 1], '^%a+:(%d+):')
      if until_ms and tonumber(until_ms) <= NOW then redis.call('HDEL', KEYS[4], batch[i]) end
    end
    redis.call('HSET', KEYS[1], 'done_cursor', scan[1])
  end
  redis.call('HSET', KEYS[4], task_id, 'running:' .. (NOW + tonumber(ARGV[6])) .. ':' .. attempt)
end
local spec = false
if ARGV[7] ~= '' then
  spec = redis.call('HGET', KEYS[3], ARGV[7])
  if not spec then
    if task_id ~= '' then redis.call('HDEL', KEYS[4], task_id) end
    return {'noprogram'}
  end
end
local out = read_variables(8)
backstop(deadline)
return {'ok', out, redis.call('HGETALL', KEYS[1]), spec}
"""
)

# KEYS: session, vars, progs, done, events, runs, runq.
# ARGV: grace_ms, touch, events_maxlen, task_id, attempt, lease_ms
# Extends a running claim's lease (the holder's heartbeat) if this attempt still holds it.
RENEW_TASK = _session_script(
    """
local rec = redis.call('HGET', KEYS[4], ARGV[4])
if not rec then return 0 end
local kind, until_ms, rest = string.match(rec, '^(%a+):(%d+):(.*)$')
if kind ~= 'running' or rest ~= ARGV[5] then return 0 end
redis.call('HSET', KEYS[4], ARGV[4], 'running:' .. (NOW + tonumber(ARGV[6])) .. ':' .. rest)
return 1
"""
)

# KEYS: session, vars, progs, done, events, runs, runq[, ledger hash, ledger due zset]
# ARGV: grace_ms, touch, events_maxlen, task_id, keep_ms, result_json
# Records that a task finished (a task that wrote no variables), with its result, so a
# later delivery of the same message answers that result instead of running again. If
# another delivery finished first, answers {'duplicate', its result} and writes nothing.
# Given the task ledger's keys (not in Cluster mode: another slot), the task also leaves
# the ledger, whatever the answer: either way it is final.
FINISH_TASK = _session_script(
    """
if KEYS[X1] then
  redis.call('HDEL', KEYS[X1], ARGV[4])
  redis.call('ZREM', KEYS[X2], ARGV[4])
end
local rec = redis.call('HGET', KEYS[4], ARGV[4])
if rec and string.sub(rec, 1, 5) == 'done:' then
  return {'duplicate', string.match(rec, '^done:%d+:(.*)$')}
end
local deadline, status = open_session(false)
if not deadline then return {status} end
redis.call('HSET', KEYS[4], ARGV[4], 'done:' .. (NOW + tonumber(ARGV[5])) .. ':' .. ARGV[6])
backstop(deadline)
return {'ok'}
"""
)

# KEYS: the session's keys.  ARGV: grace_ms, touch, events_maxlen, task_id
# Drops a task's running claim (a failed attempt), leaving a done record alone.
RELEASE_TASK = _session_script(
    """
local rec = redis.call('HGET', KEYS[4], ARGV[4])
if rec and string.sub(rec, 1, 8) == 'running:' then redis.call('HDEL', KEYS[4], ARGV[4]) end
return {'ok'}
"""
)

# KEYS: global program key, global program index.
# ARGV: op (put | get | del | list), program_id, spec_json, ttl_ms
# Global programs live outside sessions with their own fixed TTL (no sliding on read).
GLOBAL_PROGRAM_OP = (
    _NOW
    + """
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

# KEYS: session, vars, progs, done, events, runs, runq.
# ARGV: grace_ms, touch, events_maxlen, token, version, expected_version ('' for none)
# Writes the value that ``token`` had at ``version`` as a new version (history kept by
# write_record); answers {'ok', new_version, value_json, metadata}, {'novar'},
# {'conflict', current} or {'nohistory', current} when that version was not kept.
ROLLBACK_VARIABLE = _session_script(
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

# KEYS: session, vars, progs, done, events, runs, runq.  ARGV: grace_ms, touch, events_maxlen, token
# A variable's meta, current record, the run that wrote it and its kept older versions:
# {'ok', meta, record, run_id or false, history JSON or false} or {'novar'}.
GET_VARIABLE_HISTORY = _session_script(
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

# KEYS: session, vars, progs, done, events, runs, runq.  ARGV: grace_ms, touch, events_maxlen
# One consistent read of everything a snapshot holds: the variables hash, the programs
# hash and the session record.
SNAPSHOT = _session_script(
    """
local deadline, status = open_session(TOUCH)
if not deadline then return {status} end
if TOUCH then backstop(deadline) end
return {'ok', redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3]),
  redis.call('HGETALL', KEYS[1])}
"""
)

# KEYS: session, vars, progs, done, events, runs, runq.
# ARGV: grace_ms, touch, events_maxlen, lm_json, nvars, then per variable: name, tag,
#       type_json, constraints_json, description_json, value_json, metadata_json,
#       version, history; then nprogs, then per program: program_id, spec_json.
# Makes the session's variables, programs and LM settings those given (validated by the
# caller), all in this one script. Versions never go backwards: a variable still there
# with the same id gets a new version only if its value or metadata differs; one with
# another id (deleted and registered again since) is replaced at max(both versions) + 1;
# a missing one comes back with its id at its snapshot version + 1. Variables and
# programs not in the snapshot are deleted. Each change appends its event.
RESTORE = _session_script(
    f"local RESTORE_ARGS = {RESTORE_ARGS_PER_VARIABLE}\n"
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
    emit('program.deleted', '{"program_id":"' .. stored[i] .. '"}')
  end
end
for pid, spec in pairs(programs) do
  if redis.call('HGET', KEYS[3], pid) ~= spec then
    redis.call('HSET', KEYS[3], pid, spec)
    emit('program.stored', '{"program_id":"' .. pid .. '"}')
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

# KEYS: session's keys.  ARGV: grace_ms, touch, events_maxlen, run_id, task, strategy ('':
#       the session's), message_json
# Registers a run before its message is published (the Client) and says what to do:
# {'go', dropped} publish it, {'parked', dropped} do not (it is published when the run
# ahead ends), {'busy'} refused (reject strategy; recorded as rejected), {'exists',
# status}. ``dropped``: parked runs an interrupt or rollback ended before they started.
QUEUE_RUN = _session_script(
    """
local deadline, status = open_session(true)
if not deadline then return {status} end
local existing = run_get(ARGV[4])
if existing then return {'exists', existing.status} end
local verdict, dropped = run_admit(ARGV[4], ARGV[5], ARGV[6], ARGV[7])
backstop(deadline)
return {verdict, dropped}
"""
)

# KEYS: session's keys.  ARGV: grace_ms, touch, events_maxlen, run_id, task, strategy,
#       message_json
# A worker starts a run. A run no producer registered (a foreign producer) is admitted
# here first. Answers {'ok'} (now running), {'parked'} (not its turn: drop the message,
# it is published again when the run ahead ends), {'rejected'} (reject strategy, busy),
# or {'stopped', status} (cancelled before it started, or already final).
START_RUN = _session_script(
    """
local deadline, status = open_session(true)
if not deadline then return {status} end
local id = ARGV[4]
local rec = run_get(id)
if not rec then
  local verdict, dropped = run_admit(id, ARGV[5], ARGV[6], ARGV[7])
  if verdict == 'busy' then return {'rejected'} end
  if verdict == 'parked' then backstop(deadline) return {'parked', dropped} end
  rec = run_get(id)
  if #dropped > 0 then
    rec.status, rec.started_ms = 'running', NOW
    run_put(id, rec)
    run_event('run.started', id, rec)
    backstop(deadline)
    return {'ok', dropped}
  end
end
if FINAL[rec.status] then return {'stopped', rec.status} end
if rec.cancel then
  local final = stop_status(rec)
  apply_undo(id, rec, final == 'rolled_back')
  run_finalize(id, rec, final, 'run_cancelled')
  local next_id, message = release_next(id)
  backstop(deadline)
  if next_id then return {'stopped', final, next_id, message} end
  return {'stopped', final}
end
if rec.parked then return {'parked'} end
if rec.status ~= 'running' then
  rec.status, rec.started_ms = 'running', NOW
  run_put(id, rec)
  run_event('run.started', id, rec)
end
backstop(deadline)
return {'ok'}
"""
)

# KEYS: session's keys.  ARGV: grace_ms, touch, events_maxlen, run_id, outcome
#       (succeeded | failed | stopped), error_code
# Ends a run (a run asked to stop ends cancelled / interrupted / rolled_back whatever the
# outcome, unless it succeeded first). If it was the session's current serialized run,
# the next parked run goes: {'ok', status, next_id, next_message}.
FINISH_RUN = _session_script(
    """
local deadline, status = open_session(false)
if not deadline then return {status} end
local id = ARGV[4]
local rec = run_get(id)
if not rec then return {'ok', 'unknown'} end
local final = rec.status
if not FINAL[rec.status] then
  final = ARGV[5]
  if final ~= 'succeeded' and (rec.cancel or final == 'stopped') then final = stop_status(rec) end
  apply_undo(id, rec, final == 'rolled_back')
  run_finalize(id, rec, final, ARGV[6])
end
local next_id, message = release_next(id)
backstop(deadline)
if next_id then return {'ok', final, next_id, message} end
return {'ok', final}
"""
)

# KEYS: session's keys.  ARGV: grace_ms, touch, events_maxlen, run_id, action (cancel |
#       rollback)
# Stops a run: one that has not started ends at once (and, if it held the session's turn,
# the next parked run goes); a running one is flagged and its worker stops it.
# Answers {'norun'}, {'final', status} (nothing to do), {'stopped', status[, next_id,
# message]} or {'signalled'}.
CANCEL_RUN = _session_script(
    """
local deadline, status = open_session(false)
if not deadline then return {status} end
local id = ARGV[4]
local rec = run_get(id)
if not rec then return {'norun'} end
if FINAL[rec.status] then return {'final', rec.status} end
rec.cancel = ARGV[5]
if rec.status == 'running' then
  run_put(id, rec)
  return {'signalled'}
end
local final = stop_status(rec)
redis.call('LREM', KEYS[7], 0, id)
run_finalize(id, rec, final, 'run_cancelled')
local next_id, message = release_next(id)
backstop(deadline)
if next_id then return {'stopped', final, next_id, message} end
return {'stopped', final}
"""
)

# KEYS: session's keys.  ARGV: grace_ms, touch, events_maxlen, run_id ('': all)
# The run records: {'ok', flat hash fields} (messages left out).
GET_RUNS = _session_script(
    """
local deadline, status = open_session(false)
if not deadline then return {status} end
if ARGV[4] ~= '' then
  return {'ok', {ARGV[4], redis.call('HGET', KEYS[6], ARGV[4]) or false}}
end
local fields, out = redis.call('HGETALL', KEYS[6]), {}
for i = 1, #fields, 2 do
  if is_record(fields[i]) then
    out[#out + 1] = fields[i]
    out[#out + 1] = fields[i + 1]
  end
end
return {'ok', out}
"""
)

# KEYS: session's keys.  ARGV: grace_ms, touch, events_maxlen, field, value
# Sets one plain field of the session record (the default multitask strategy).
CONFIGURE_SESSION = _session_script(
    """
local deadline, status = open_session(true)
if not deadline then return {status} end
redis.call('HSET', KEYS[1], ARGV[4], ARGV[5])
emit('session.updated', '{"' .. ARGV[4] .. '":"' .. ARGV[5] .. '"}')
backstop(deadline)
return {'ok', redis.call('HGETALL', KEYS[1])}
"""
)

# --- Redis Cluster mode -----------------------------------------------------------------
# In a cluster a script may only touch keys of one hash slot. These are the session-slot
# halves of CREATE_SESSION, DELETE_SESSION and EXPIRE_SESSIONS; the caller then updates
# the index and stats with single-key commands (see StoreCore's docstring).

# KEYS: session, vars, progs, done, events, runs, runq.
# ARGV: grace_ms, touch, events_maxlen, sid, ttl_ms, metadata_json, exist_ok, quota_full
#       ('1': the index is at DSPEX_MAX_SESSIONS)
# Like CREATE_SESSION without the index and stats: answers {'exists'}, {'quota'},
# {'ok', 0, record} (exist_ok, live) or {'ok', 1, record, deadline} (created; an expired
# record in the way was deleted first).
CLUSTER_CREATE_SESSION = (
    _PRELUDE
    + """
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
  drop_lm_cache(KEYS[1])
end
deadline = new_session(ttl, ARGV[6])
emit('session.created', '{"ttl_s":' .. ttl / 1000 .. ',"metadata":' .. ARGV[6] .. '}')
backstop(deadline)
return {'ok', 1, redis.call('HGETALL', KEYS[1]), deadline}
"""
)

# KEYS: session, vars, progs, done, events, runs, runq.
# Deletes every key of the session; answers 1 if its record existed.
CLUSTER_DELETE_SESSION = (
    _SESSION_KEYS
    + """
local existed = redis.call('EXISTS', KEYS[1])
for i = 1, SESSION_KEYS do redis.call('DEL', KEYS[i]) end
drop_lm_cache(KEYS[1])
return existed
"""
)

# KEYS: session, vars, progs, done, events, runs, runq.
# Re-checks the deadline: a live session answers its deadline (the caller re-indexes it);
# an expired or vanished one loses every key and answers 0.
CLUSTER_EXPIRE_SESSION = (
    _NOW
    + """
local deadline = redis.call('HGET', KEYS[1], 'deadline_ms')
if deadline and tonumber(deadline) > NOW then return tonumber(deadline) end
for i = 1, SESSION_KEYS do redis.call('DEL', KEYS[i]) end
drop_lm_cache(KEYS[1])
return 0
"""
)


# KEYS: the session's keys (Keys.session_keys).
# ARGV: grace_ms, touch, events_maxlen, prompt_tokens, completion_tokens, calls, cached_calls
# Adds one run's LM usage to the session record (u_prompt, u_completion, u_calls,
# u_cached); a session deleted or expired meanwhile records nothing (no key is re-made).
ADD_USAGE = _session_script(
    """
local deadline, status = open_session(false)
if not deadline then return {status} end
redis.call('HINCRBY', KEYS[1], 'u_prompt', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'u_completion', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'u_calls', ARGV[6])
redis.call('HINCRBY', KEYS[1], 'u_cached', ARGV[7])
return {'ok', redis.call('HGETALL', KEYS[1])}
"""
)

# KEYS: the session's keys (Keys.session_keys).
# ARGV: grace_ms, touch, events_maxlen, max_tokens_total ('': no budget)
# Sets (or clears) the session's token budget and touches it.
SET_BUDGET = _session_script(
    """
local deadline, status = open_session(true)
if not deadline then return {status} end
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[1], 'max_tokens_total')
  emit('session.updated', '{"max_tokens_total":null}')
else
  redis.call('HSET', KEYS[1], 'max_tokens_total', ARGV[4])
  emit('session.updated', '{"max_tokens_total":' .. ARGV[4] .. '}')
end
backstop(deadline)
return {'ok', redis.call('HGETALL', KEYS[1])}
"""
)


def all_scripts() -> dict[str, str]:
    """Every script of this module by name (its public upper-case ``str`` constants)."""
    return {
        name: value
        for name, value in globals().items()
        if name.isupper() and not name.startswith("_") and isinstance(value, str)
    }
