"""Run scripts: admission under the multitask strategies, start, finish, cancel, read."""

from __future__ import annotations

from dspex_tasks.store.scripts.lua import lua_script

__all__ = ["CANCEL_RUN", "FINISH_RUN", "GET_RUNS", "QUEUE_RUN", "START_RUN"]

# KEYS: session's keys.  ARGV: grace_ms, touch, events_maxlen, run_id, task, strategy ('':
#       the session's), message_json
# Registers a run before its message is published (the Client) and says what to do:
# {'go', dropped} publish it, {'parked', dropped} do not (it is published when the run
# ahead ends), {'busy'} refused (reject strategy; recorded as rejected), {'exists',
# status}. ``dropped``: parked runs an interrupt or rollback ended before they started.
QUEUE_RUN = lua_script(
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
#       message_json ('' if the caller has none at hand)
# A worker starts a run (``run_start`` in the prelude says how it answers). Workers start
# runs inside TASK_CONTEXT; this one is for callers that do not claim a task.
START_RUN = lua_script(
    """
local deadline, status = open_session(true)
if not deadline then return {status} end
local reply = run_start(ARGV[4], ARGV[5], ARGV[6], ARGV[7])
backstop(deadline)
return reply
"""
)


# KEYS: session's keys.  ARGV: grace_ms, touch, events_maxlen, run_id, outcome
#       (succeeded | failed | stopped), error_code
# Ends a run (``run_finish`` in the prelude): {'ok', final status[, next_id, next_message]}.
FINISH_RUN = lua_script(
    """
local deadline, status = open_session(false)
if not deadline then return {status} end
local reply = run_finish(ARGV[4], ARGV[5], ARGV[6])
backstop(deadline)
return {'ok', unpack(reply)}
"""
)


# KEYS: session's keys.  ARGV: grace_ms, touch, events_maxlen, run_id, action (cancel |
#       rollback)
# Stops a run: one that has not started ends at once (and, if it held the session's turn,
# the next parked run goes); a running one is flagged and its worker stops it.
# Answers {'norun'}, {'final', status} (nothing to do), {'stopped', status[, next_id,
# message]} or {'signalled'}.
CANCEL_RUN = lua_script(
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
GET_RUNS = lua_script(
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
