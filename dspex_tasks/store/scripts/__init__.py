"""Lua scripts of the SessionStore: every multi-step write is one of these, one module
per concern (sessions, variables, history, programs, compile, tasks, runs, cluster,
usage).

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

from types import ModuleType

from dspex_tasks.store.scripts import (
    cluster,
    compile,
    history,
    programs,
    runs,
    sessions,
    streams,
    tasks,
    usage,
    variables,
)
from dspex_tasks.store.scripts.lua import (
    EVENT_DATA_FIELD,
    EVENT_TYPE_FIELD,
    REGISTER_ARGS_PER_VARIABLE,
    RESTORE_ARGS_PER_VARIABLE,
    SESSION_KEY_COUNT,
    UPDATE_ARGS_PER_VARIABLE,
)
from dspex_tasks.store.scripts.status import Status

__all__ = [
    "EVENT_DATA_FIELD",
    "EVENT_TYPE_FIELD",
    "REGISTER_ARGS_PER_VARIABLE",
    "RESTORE_ARGS_PER_VARIABLE",
    "SESSION_KEY_COUNT",
    "UPDATE_ARGS_PER_VARIABLE",
    "Status",
    "all_scripts",
]

_MODULES: tuple[ModuleType, ...] = (
    sessions,
    variables,
    history,
    programs,
    compile,
    tasks,
    runs,
    streams,
    cluster,
    usage,
)


def all_scripts() -> dict[str, str]:
    """Every script by name: what the script modules list in their ``__all__``."""
    found: dict[str, str] = {}
    for module in _MODULES:
        for name in module.__all__:
            assert name not in found, f"two scripts named {name}"
            found[name] = getattr(module, name)
    return found
