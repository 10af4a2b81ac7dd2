"""Every Redis key name of the service, built in one place.

Every key of one session carries the hash tag ``{session_id}`` so the session lives in one
Redis Cluster slot and multi-key Lua scripts over it stay legal. Cross-session indexes
(the expiry index, global programs, stats) are separate keys.

Layout (prefix ``dspex``)::

    dspex:s:{sid}          hash  session record (times, ttl, deadline, metadata, lm)
    dspex:s:{sid}:vars     hash  variables: <name> -> version:updated:value, m:/c:/s:/d:/h:/r:<name>
    dspex:s:{sid}:progs    hash  program id -> spec JSON
    dspex:s:{sid}:done     hash  task id -> idempotency record of state-changing tasks
    dspex:s:{sid}:events   stream  the session's event log (t: type, d: data JSON)
    dspex:s:{sid}:run:{run_id}:stream  stream  one streamed run's events (t, d); own TTL
    dspex:s:{sid}:streams  zset  run stream key -> its expiry (ms): what a session delete
                                 or expiry also deletes (store/streams.py)
    dspex:s:{sid}:runs     hash  run id -> run record JSON, m:<run id> -> its parked message
    dspex:s:{sid}:runq     list  ids of runs parked until the session's current run ends
    dspex:s:{sid}:data     hash  dataset name -> examples JSON (compile trainsets)
    dspex:s:{sid}:pver     hash  program versions (store/compile.py): <pid> -> version
                                 index JSON, <pid>#<n> -> spec JSON of version n,
                                 <pid>#lock -> optimization lease, <pid>#ckpt -> the
                                 running compile's checkpoint
    dspex:sessions         zset  session id -> deadline (ms) lower bound; the sweep's index
    dspex:stats            hash  created / deleted / expired / sweeps counters, last_sweep_ms
    dspex:gp:<program_id>  string global program spec JSON (own TTL)
    dspex:gp               zset  global program id -> expiry (ms)
    dspex:task_outcomes    hash  <task name>:<state> -> count (workers/outcomes.py)
    dspex:task_failures    hash  <task name>:<error code> -> count of failures
    dspex:run:<run_id>     string  the session of a run the HTTP API started (own TTL)
    dspex:{ledger}:sent    hash  task id -> the task message a Client sent (store/ledger.py)
    dspex:{ledger}:due     zset  task id -> when to resend it if it has not finished (ms)
    dspex:metrics          set   compile metric names the workers registered
    dspex:lm:{<profile>}        hash  rate schedule of an LM profile (lm/limits.py)
    dspex:lm:{<profile>}:slots  zset  concurrency leases: lease id -> expiry (ms)
    dspex:lm:{<profile>}:stats  hash  calls, tokens, 429s, waits, cache hits of a profile
    dspex:lm:profiles           set   names of the profiles with counters (exporter, doctor)
    dspex:lmc:{<digest>}        string  a shared LM cache entry, JSON (lm/cache.py)
    dspex:lmc:{<digest>}:lock   string  the single-flight lock of that entry
    dspex:s:{sid}:lmc:<digest>  string  a session-scoped cache entry (and ``:lock``)
    dspex:s:{sid}:lmc           zset  those keys -> their expiry (ms): what a session
                                      delete or expiry also deletes
"""

from __future__ import annotations

import re

from dspex_tasks.errors import InvalidInputs, InvalidProgram, InvalidSessionId

__all__ = [
    "SESSION_ID_RE",
    "Keys",
    "check_dataset_name",
    "check_program_id",
    "check_session_id",
]

#: No braces, spaces or glob characters: they would let one id reach another's keys.
SESSION_ID_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
PROGRAM_ID_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")


def check_session_id(session_id: object) -> str:
    """Return ``session_id`` if it follows the id rule, else raise ``InvalidSessionId``."""
    if not isinstance(session_id, str) or not SESSION_ID_RE.fullmatch(session_id):
        shown = repr(session_id)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise InvalidSessionId(
            f"invalid session id {shown}: use 1-128 characters of A-Z a-z 0-9 _ . : @ -"
        )
    return session_id


def check_program_id(program_id: object) -> str:
    """Return ``program_id`` if it follows the id rule, else raise ``InvalidProgram``."""
    if not isinstance(program_id, str) or not PROGRAM_ID_RE.fullmatch(program_id):
        raise InvalidProgram(
            f"invalid program id {program_id!r}: use 1-128 characters of A-Z a-z 0-9 _ . : @ -"
        )
    return program_id


def check_dataset_name(name: object) -> str:
    """Return ``name`` if it is a valid dataset name (the program id rule), else raise
    ``InvalidInputs``."""
    if not isinstance(name, str) or not PROGRAM_ID_RE.fullmatch(name):
        raise InvalidInputs(
            f"invalid dataset name {name!r}: use 1-128 characters of A-Z a-z 0-9 _ . : @ -",
            {"option": "dataset"},
        )
    return name


class Keys:
    """Key names under one prefix. Ids must be checked before they reach this class."""

    __slots__ = (
        "gp_index",
        "ledger",
        "ledger_due",
        "metrics",
        "prefix",
        "sessions",
        "stats",
        "task_failures",
        "task_outcomes",
    )

    def __init__(self, prefix: str = "dspex") -> None:
        self.prefix = prefix
        self.sessions = f"{prefix}:sessions"
        self.stats = f"{prefix}:stats"
        self.gp_index = f"{prefix}:gp"
        #: Task outcome counters (success / failure / retry / revoked), read by the exporter.
        self.task_outcomes = f"{prefix}:task_outcomes"
        #: Task failures by error code (``DspexError.code``, else ``unknown``).
        self.task_failures = f"{prefix}:task_failures"
        #: The task ledger (store/ledger.py): task id -> message, and task id -> when to
        #: resend it if it has not finished. One hash tag: one Cluster slot for both.
        self.ledger = f"{prefix}:{{ledger}}:sent"
        self.ledger_due = f"{prefix}:{{ledger}}:due"
        #: Names of the compile metrics the workers registered (store/compile.py).
        self.metrics = f"{prefix}:metrics"

    def session(self, sid: str) -> str:
        return f"{self.prefix}:s:{{{sid}}}"

    def variables(self, sid: str) -> str:
        return f"{self.prefix}:s:{{{sid}}}:vars"

    def programs(self, sid: str) -> str:
        return f"{self.prefix}:s:{{{sid}}}:progs"

    def done(self, sid: str) -> str:
        return f"{self.prefix}:s:{{{sid}}}:done"

    def events(self, sid: str) -> str:
        return f"{self.prefix}:s:{{{sid}}}:events"

    def run_stream(self, sid: str, run_id: str) -> str:
        """The event stream of one streamed run (``options={"stream": True}``)."""
        return f"{self.prefix}:s:{{{sid}}}:run:{run_id}:stream"

    def run_streams(self, sid: str) -> str:
        """The index of a session's run streams; always ``session(sid) + ":streams"``
        (the delete and expiry scripts derive it from the session key)."""
        return f"{self.prefix}:s:{{{sid}}}:streams"

    def runs(self, sid: str) -> str:
        return f"{self.prefix}:s:{{{sid}}}:runs"

    def run_queue(self, sid: str) -> str:
        return f"{self.prefix}:s:{{{sid}}}:runq"

    def datasets(self, sid: str) -> str:
        return f"{self.prefix}:s:{{{sid}}}:data"

    def program_versions(self, sid: str) -> str:
        """Versions of a session's programs, their optimization leases and checkpoints."""
        return f"{self.prefix}:s:{{{sid}}}:pver"

    def session_keys(self, sid: str) -> list[str]:
        """Every key a session may own, the session record first (the scripts' KEYS)."""
        return [
            self.session(sid),
            self.variables(sid),
            self.programs(sid),
            self.done(sid),
            self.events(sid),
            self.runs(sid),
            self.run_queue(sid),
            self.datasets(sid),
            self.program_versions(sid),
        ]

    def session_pattern(self, sid: str) -> str:
        """A SCAN pattern matching every key of one session (tests and audits)."""
        return f"{self.prefix}:s:{{{sid}}}*"

    def run_session(self, run_id: str) -> str:
        """Which session a run belongs to, for the HTTP API's ``/v1/runs/{run_id}``."""
        return f"{self.prefix}:run:{run_id}"

    def global_program(self, program_id: str) -> str:
        return f"{self.prefix}:gp:{program_id}"

    # --- LM traffic (lm/limits.py, lm/cache.py); profile names follow PROFILE_RE ---------

    def lm_limits(self, profile: str) -> list[str]:
        """The rate schedule, concurrency leases and counters of one LM profile (one slot)."""
        base = f"{self.prefix}:lm:{{{profile}}}"
        return [base, f"{base}:slots", f"{base}:stats"]

    def lm_stats(self, profile: str) -> str:
        return f"{self.prefix}:lm:{{{profile}}}:stats"

    def lm_profiles(self) -> str:
        """Names of the profiles whose counters workers have written (no SCAN needed)."""
        return f"{self.prefix}:lm:profiles"

    def lm_cache(self, digest: str, session_id: str | None = None) -> list[str]:
        """A cache entry and its single-flight lock; session scope adds the session's
        cache index and record (all in the session's slot)."""
        if session_id is None:
            base = f"{self.prefix}:lmc:{{{digest}}}"
            return [base, f"{base}:lock"]
        base = f"{self.prefix}:s:{{{session_id}}}:lmc:{digest}"
        return [base, f"{base}:lock", self.lm_cache_index(session_id), self.session(session_id)]

    def lm_cache_index(self, sid: str) -> str:
        """The index of a session's LM cache entries; always ``session(sid) + ":lmc"``
        (the delete and expiry scripts derive it from the session key)."""
        return f"{self.prefix}:s:{{{sid}}}:lmc"
