"""Task scripts: a task's context and claim in one round trip, its lease, its finish."""

from __future__ import annotations

from dspex_tasks.store.scripts.lua import lua_script

__all__ = ["FINISH_TASK", "RELEASE_TASK", "RENEW_TASK", "TASK_CONTEXT"]

# KEYS: session, vars, progs, done, events, runs, runq, data, pver[, the task's result record].
# ARGV: grace_ms, touch, events_maxlen, task_id ('' for none), attempt, lease_ms, program_id ('' for
#       none), run task ('' : not a run), run strategy, run message, result record value,
#       its expiry (s), tokens...
# A task's whole context in one round trip: the session record (touched), the program
# spec, the named variables, a claim on the task id, and (given a run task) the start of
# its run, first: a run that may not go now answers {'run', run_start's answer} and
# claims nothing. A task id whose earlier delivery
# still holds its lease (same or later attempt) answers {'running'}; one that already
# wrote its outputs answers {'done', result_json}. Lapsed records are pruned here, a few
# per claim (the session record's ``done_cursor`` remembers where), so the done hash stays
# near its live size at O(1) cost per claim. Given the task's result record key (Celery's
# backend on this Redis), a task that goes writes its STARTED record there.
TASK_CONTEXT = lua_script(
    """
local deadline, status = open_session(true)
if not deadline then return {status} end
local task_id, attempt = ARGV[4], tonumber(ARGV[5])
local run = false
if ARGV[8] ~= '' then
  run = run_start(task_id, ARGV[8], ARGV[9], ARGV[10])
  if run[1] ~= 'ok' then
    -- A run that succeeded, delivered again (its worker died after recording the result,
    -- before the broker saw the acknowledgement): answer the recorded result.
    if run[1] == 'stopped' and run[2] == 'succeeded' then
      local rec = redis.call('HGET', KEYS[4], task_id)
      if rec and string.sub(rec, 1, 5) == 'done:' then
        return {'done', string.match(rec, '^done:%d+:(.*)$')}
      end
    end
    backstop(deadline)
    return {'run', run}
  end
end
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
local out = read_variables(13)
if KEYS[X1] then store_task_state(KEYS[X1], ARGV[11], tonumber(ARGV[12])) end
backstop(deadline)
return {'ok', out, redis.call('HGETALL', KEYS[1]), spec, run}
"""
)


# KEYS: session, vars, progs, done, events, runs, runq, data, pver.
# ARGV: grace_ms, touch, events_maxlen, task_id, attempt, lease_ms
# Extends a running claim's lease (the holder's heartbeat) if this attempt still holds it.
RENEW_TASK = lua_script(
    """
local rec = redis.call('HGET', KEYS[4], ARGV[4])
if not rec then return 0 end
local kind, until_ms, rest = string.match(rec, '^(%a+):(%d+):(.*)$')
if kind ~= 'running' or rest ~= ARGV[5] then return 0 end
redis.call('HSET', KEYS[4], ARGV[4], 'running:' .. (NOW + tonumber(ARGV[6])) .. ':' .. rest)
return 1
"""
)


# KEYS: session, vars, progs, done, events, runs, runq, data, pver[, ledger hash, ledger due
#       zset][, the task's result record]
# ARGV: grace_ms, touch, events_maxlen, task_id, keep_ms, result_json, end_run ('1': the task
#       is a run, which succeeded), result record value ('': none), its expiry (s)[,
#       prompt_tokens, completion_tokens, calls, cached_calls: the run's LM usage, added to
#       the session as ADD_USAGE does]
# Records that a task finished (a task that wrote no variables), with its result, so a
# later delivery of the same message answers that result instead of running again, and
# ends its run in the same round trip: {'ok'[, run_finish's answer...]}. If another
# delivery finished first, answers {'duplicate', its result} and writes nothing.
# Given the task ledger's keys (not in Cluster mode: another slot), the task also leaves
# the ledger, whatever the answer: either way it is final. Given a result record (Celery's
# backend on this Redis; the last key), it is written unless the answer is 'duplicate',
# whether or not the session is still there: the task succeeded all the same.
FINISH_TASK = lua_script(
    """
-- The ledger's keys come in pairs and the result record alone: KEYS[X2] is the ledger's.
if KEYS[X2] then
  redis.call('HDEL', KEYS[X1], ARGV[4])
  redis.call('ZREM', KEYS[X2], ARGV[4])
end
local rec = redis.call('HGET', KEYS[4], ARGV[4])
if rec and string.sub(rec, 1, 5) == 'done:' then
  return {'duplicate', string.match(rec, '^done:%d+:(.*)$')}
end
if ARGV[8] ~= '' then store_task_state(KEYS[#KEYS], ARGV[8], tonumber(ARGV[9])) end
local deadline, status = open_session(false)
if not deadline then return {status} end
redis.call('HSET', KEYS[4], ARGV[4], 'done:' .. (NOW + tonumber(ARGV[5])) .. ':' .. ARGV[6])
if ARGV[10] then
  redis.call('HINCRBY', KEYS[1], 'u_prompt', ARGV[10])
  redis.call('HINCRBY', KEYS[1], 'u_completion', ARGV[11])
  redis.call('HINCRBY', KEYS[1], 'u_calls', ARGV[12])
  redis.call('HINCRBY', KEYS[1], 'u_cached', ARGV[13])
end
local reply = {'ok'}
if ARGV[7] == '1' then reply = {'ok', unpack(run_finish(ARGV[4], 'succeeded', ''))} end
backstop(deadline)
return reply
"""
)


# KEYS: the session's keys.  ARGV: grace_ms, touch, events_maxlen, task_id
# Drops a task's running claim (a failed attempt), leaving a done record alone.
RELEASE_TASK = lua_script(
    """
local rec = redis.call('HGET', KEYS[4], ARGV[4])
if rec and string.sub(rec, 1, 8) == 'running:' then redis.call('HDEL', KEYS[4], ARGV[4]) end
return {'ok'}
"""
)
