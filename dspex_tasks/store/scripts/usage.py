"""Usage scripts: a run's LM usage added to its session, and the session's token budget
(``store/usage.py``, DESIGN.md §11)."""

from __future__ import annotations

from dspex_tasks.store.scripts.lua import lua_script

__all__ = ["ADD_USAGE", "SET_BUDGET"]

# KEYS: the session's keys (Keys.session_keys).
# ARGV: grace_ms, touch, events_maxlen, prompt_tokens, completion_tokens, calls, cached_calls
# Adds one run's LM usage to the session record (u_prompt, u_completion, u_calls,
# u_cached); a session deleted or expired meanwhile records nothing (no key is re-made).
ADD_USAGE = lua_script(
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
SET_BUDGET = lua_script(
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
