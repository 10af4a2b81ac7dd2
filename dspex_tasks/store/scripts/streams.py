"""Run stream scripts (``store/streams.py``): a run's token and status events."""

from __future__ import annotations

from dspex_tasks.store.scripts.lua import lua_script

__all__ = ["APPEND_RUN_STREAM"]

# KEYS: session, run stream, run streams index (Keys.run_streams).
# ARGV: keep_ms (the stream's TTL from now), final ('1': the run ended), then type, data
#       pairs. Appends the events in order, in one round trip; (re)sets the stream's TTL
#       and indexes it so a session delete or expiry deletes it. A session that is gone
#       gets no stream (answers 0; a stream left from before is deleted). Answers the id
#       of the last event appended.
APPEND_RUN_STREAM = lua_script(
    """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2])
  return 0
end
local keep = tonumber(ARGV[1])
local last = 0
for i = 3, #ARGV, 2 do
  last = redis.call('XADD', KEYS[2], '*', 't', ARGV[i], 'd', ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[2], keep)
redis.call('ZADD', KEYS[3], NOW + keep, KEYS[2])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', NOW)
if redis.call('PTTL', KEYS[3]) < keep then redis.call('PEXPIRE', KEYS[3], keep) end
return last
"""
)
