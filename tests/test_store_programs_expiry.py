"""SessionStore programs (session and global) and expiry (lazy, sweep, native backstop,
stats) on a real redis-server. Expiry is awaited on the server clock (``wait_expired``),
never slept."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis
from support.polling import wait_until
from support.store import (
    StoreFactory,
    deadline_ms,
    server_now_ms,
    server_tick,
    session_key_names,
    wait_expired,
    wait_server_past,
)

from dspex_tasks.errors import (
    InvalidProgram,
    ProgramNotFound,
    SessionExpired,
    SessionNotFound,
    ValidationFailed,
)
from dspex_tasks.store import SessionStore

SID = "sess-1"
QA = {"module": "predict", "signature": "question -> answer"}


@pytest.fixture
def store(make_store: StoreFactory) -> SessionStore:
    return make_store()


def _populated(store: SessionStore, sid: str, ttl_s: float | None = None) -> None:
    """A session that owns a record, a variables hash and a programs hash."""
    store.create_session(sid, ttl_s=ttl_s)
    store.register_variable(sid, "x", "integer", 1)
    store.register_variable(sid, "y", "string", "s")
    store.store_program(sid, "qa", QA)


# --- session programs ---------------------------------------------------------------------


def test_store_get_list_delete_program(store: SessionStore) -> None:
    store.create_session(SID)
    normalized = store.store_program(SID, "qa", QA)
    assert normalized == {
        "module": "predict",
        "signature": {
            "instructions": "",
            "inputs": [{"name": "question", "type": "str"}],
            "outputs": [{"name": "answer", "type": "str"}],
        },
        "config": {},
        "state": None,
    }
    assert store.get_program(SID, "qa") == normalized
    cot = {
        "module": "chain_of_thought",
        "signature": {"instructions": "Be brief.", "inputs": ["q"], "outputs": ["a: int"]},
        "state": {"predict": {"demos": [], "lm": {"model": "x", "api_key": "secret"}}},
    }
    stored = store.store_program(SID, "cot", cot)
    assert stored["signature"]["outputs"] == [{"name": "a", "type": "int"}]
    # LM config never stored; the key stays, blank (DSPy's Predict.load_state needs it).
    assert stored["state"] == {"predict": {"demos": [], "lm": None}}
    assert store.get_program(SID, "cot") == stored
    assert store.list_programs(SID) == ["cot", "qa"]
    # Storing again replaces.
    store.store_program(SID, "qa", {"module": "predict", "signature": "q -> a, b"})
    assert [f["name"] for f in store.get_program(SID, "qa")["signature"]["outputs"]] == ["a", "b"]
    assert store.list_programs(SID) == ["cot", "qa"]
    assert store.delete_program(SID, "qa") is True
    assert store.delete_program(SID, "qa") is False
    with pytest.raises(ProgramNotFound) as exc:
        store.get_program(SID, "qa")
    assert exc.value.code == "program_not_found"
    assert store.list_programs(SID) == ["cot"]


def test_program_in_missing_session(store: SessionStore) -> None:
    with pytest.raises(SessionNotFound):
        store.store_program("nope", "qa", QA)
    with pytest.raises(SessionNotFound):
        store.list_programs("nope")
    assert store.exists("nope") is False


def test_get_unknown_program(store: SessionStore) -> None:
    store.create_session(SID)
    with pytest.raises(ProgramNotFound):
        store.get_program(SID, "nope")
    assert store.list_programs(SID) == []


@pytest.mark.parametrize(
    "spec",
    [
        {"module": "nope", "signature": "q -> a"},
        {"module": "predict", "signature": "a b c"},
        {"module": "predict", "signature": "q -> a -> b"},
        {"module": "predict", "signature": "q: complex -> a"},
        {"module": "predict", "signature": {"inputs": [{"name": "q", "type": "tuple"}]}},
        {"module": "react", "signature": "q -> a"},
        {"module": "react", "signature": "q -> a", "config": {"tools": []}},
        {"module": "predict", "signature": "q -> reasoning"},
        {"module": "predict", "signature": "q -> a", "config": {"tools": ["t"]}},
        {"module": "predict", "signature": "q -> a", "code": "import os"},
        "predict: q -> a",
    ],
    ids=repr,
)
def test_invalid_program_is_rejected_and_nothing_stored(
    store: SessionStore, raw: redis.Redis, spec: Any
) -> None:
    store.create_session(SID)
    with pytest.raises(InvalidProgram) as exc:
        store.store_program(SID, "p", spec)
    assert exc.value.code == "invalid_program"
    assert store.list_programs(SID) == []
    assert not raw.exists(store.keys.programs(SID))


@pytest.mark.parametrize("pid", ["", "a b", "{x}", "p*", "x" * 129])
def test_invalid_program_id(store: SessionStore, pid: str) -> None:
    store.create_session(SID)
    with pytest.raises(InvalidProgram):
        store.store_program(SID, pid, QA)
    with pytest.raises(InvalidProgram):
        store.store_global_program(pid, QA)
    assert store.list_programs(SID) == []
    assert store.list_global_programs() == []


# --- global programs ----------------------------------------------------------------------


def test_global_programs_crud(store: SessionStore) -> None:
    normalized = store.store_global_program("g1", QA)
    store.store_global_program("g0", {"module": "predict", "signature": "a -> b"})
    assert store.get_global_program("g1") == normalized
    assert store.list_global_programs() == ["g0", "g1"]
    # They live outside sessions: no session needed, sessions cannot see them.
    store.create_session(SID)
    assert store.list_programs(SID) == []
    with pytest.raises(ProgramNotFound):
        store.get_program(SID, "g1")
    assert store.delete_global_program("g1") is True
    assert store.delete_global_program("g1") is False
    with pytest.raises(ProgramNotFound) as exc:
        store.get_global_program("g1")
    assert exc.value.code == "program_not_found"
    assert store.list_global_programs() == ["g0"]
    with pytest.raises(InvalidProgram):
        store.store_global_program("bad", {"module": "nope", "signature": "q -> a"})


def test_global_program_own_ttl(store: SessionStore, raw: redis.Redis) -> None:
    # Long enough that a loaded machine still lists it before it expires.
    store.store_global_program("short", QA, ttl_s=2)
    store.store_global_program("long", QA)
    assert 0 < raw.pttl(store.keys.global_program("short")) <= 2000
    assert store.list_global_programs() == ["long", "short"]
    expires = raw.zscore(store.keys.gp_index, "short")
    assert expires is not None
    wait_server_past(raw, expires)
    wait_until(lambda: not raw.exists(store.keys.global_program("short")), 10, what="key TTL")
    with pytest.raises(ProgramNotFound):
        store.get_global_program("short")
    assert store.list_global_programs() == ["long"]
    assert not raw.exists(store.keys.global_program("short"))
    assert store.get_global_program("long")["module"] == "predict"
    assert store.stats()["global_programs"] == 1


@pytest.mark.parametrize("ttl", [0, -1, True, "1"])
def test_global_program_bad_ttl(store: SessionStore, ttl: Any) -> None:
    with pytest.raises(ValidationFailed):
        store.store_global_program("g", QA, ttl_s=ttl)
    assert store.list_global_programs() == []


# --- lazy expiry ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "read",
    [
        lambda s: s.get_session(SID),
        lambda s: s.get_session(SID, touch=False),
        lambda s: s.touch(SID),
        lambda s: s.get_variable(SID, "x"),
        lambda s: s.update_variable(SID, "x", 2),
        lambda s: s.list_variables(SID),
        lambda s: s.get_program(SID, "qa"),
        lambda s: s.register_variable(SID, "z", "integer", 1),
    ],
    ids=[
        "get_session",
        "get_session_no_touch",
        "touch",
        "get_variable",
        "update_variable",
        "list_variables",
        "get_program",
        "register_variable",
    ],
)
def test_lazy_expiry_on_read(
    store: SessionStore, raw: redis.Redis, read: Callable[[SessionStore], Any]
) -> None:
    _populated(store, SID, ttl_s=0.2)
    assert len(session_key_names(raw, store, SID)) == 5  # record, vars, progs, pver, events
    wait_expired(raw, store, SID)
    with pytest.raises(SessionExpired) as exc:
        read(store)
    assert exc.value.code == "session_expired"
    assert isinstance(exc.value, SessionNotFound)
    # The failed read deleted the session: no key remains, not even in the index.
    assert session_key_names(raw, store, SID) == []
    assert raw.zscore(store.keys.sessions, SID) is None
    # Now it is simply gone.
    with pytest.raises(SessionNotFound) as again:
        store.get_session(SID)
    assert again.value.code == "session_not_found"
    stats = store.stats()
    assert (stats["expired"], stats["sessions"], stats["variables"]) == (1, 0, 0)


def test_exists_expires_lazily(store: SessionStore, raw: redis.Redis) -> None:
    _populated(store, SID, ttl_s=0.2)
    assert store.exists(SID) is True
    wait_expired(raw, store, SID)
    assert store.exists(SID) is False
    assert session_key_names(raw, store, SID) == []
    assert store.stats()["expired"] == 1


def test_create_over_an_expired_session_starts_fresh(store: SessionStore, raw: redis.Redis) -> None:
    _populated(store, SID, ttl_s=0.2)
    wait_expired(raw, store, SID)
    s = store.create_session(SID, metadata={"v": 2})
    assert s.metadata == {"v": 2}
    assert store.list_variables(SID) == []
    assert store.list_programs(SID) == []
    stats = store.stats()
    assert (stats["created"], stats["expired"]) == (2, 1)


# --- the sweep ----------------------------------------------------------------------------


def test_expire_sessions_deletes_every_key(store: SessionStore, raw: redis.Redis) -> None:
    for n in range(3):
        _populated(store, f"old-{n}", ttl_s=0.2)
    _populated(store, "live")
    wait_expired(raw, store, "old-0", "old-1", "old-2")
    assert store.expire_sessions() == 3
    for n in range(3):
        assert session_key_names(raw, store, f"old-{n}") == []
    assert raw.zrange(store.keys.sessions, 0, -1) == ["live"]
    assert len(session_key_names(raw, store, "live")) == 5
    assert store.get_value("live", "x") == 1
    assert store.expire_sessions() == 0
    stats = store.stats()
    assert (stats["expired"], stats["sweeps"], stats["sessions"]) == (3, 2, 1)


def test_expire_sessions_limit(store: SessionStore, raw: redis.Redis) -> None:
    for n in range(10):
        store.create_session(f"s{n}", ttl_s=0.2)
    wait_expired(raw, store, *(f"s{n}" for n in range(10)))
    assert store.expire_sessions(limit=4) == 4
    # Six are still indexed (the sweep stopped at its limit) but none of them is live.
    assert store.redis.zcard(store.keys.sessions) == 6
    assert store.stats()["sessions"] == 0
    assert store.expire_sessions() == 6
    assert store.stats()["expired"] == 10


def test_session_touched_during_sweep_window_survives(
    store: SessionStore, raw: redis.Redis
) -> None:
    # Windows of a second or more, measured on the server clock: a loaded machine that
    # stalls for a moment still touches before the deadline and sweeps before the new one.
    store.create_session(SID, ttl_s=2)
    store.register_variable(SID, "x", "integer", 1)
    # The index holds the deadline of the create (the register slid the record's by a
    # millisecond or so): the sweep goes by the index.
    first = int(raw.zscore(store.keys.sessions, SID) or 0)
    assert first <= deadline_ms(raw, store, SID)
    wait_server_past(raw, first - 1000)
    touched = store.touch(SID)  # real deadline now ~1 s later; the index still says `first`
    assert deadline_ms(raw, store, SID) > first
    wait_server_past(raw, first)
    indexed = raw.zscore(store.keys.sessions, SID)
    assert indexed == first
    assert indexed <= server_now_ms(raw)  # the sweep does consider it a candidate
    assert store.expire_sessions() == 0
    # It survived untouched by the sweep, and was re-indexed at its real deadline.
    assert store.get_variable(SID, "x", touch=False).value == 1
    assert store.get_session(SID, touch=False).expires_at == touched.expires_at
    assert raw.zscore(store.keys.sessions, SID) == round(touched.expires_at.timestamp() * 1000)
    # After the new deadline, a later sweep expires it.
    wait_expired(raw, store, SID)
    assert store.expire_sessions() == 1
    assert session_key_names(raw, store, SID) == []
    assert store.stats()["expired"] == 1


def test_concurrent_sweeps_count_each_session_once(
    make_store: StoreFactory, raw: redis.Redis
) -> None:
    store = make_store()
    pipe_sids = [f"s-{n:03d}" for n in range(200)]
    # s-000 gets a variable (more keys to delete) before it can expire: on a loaded
    # machine creating the other 199 can outlast a 0.2 s TTL.
    store.create_session(pipe_sids[0], ttl_s=1.0)
    store.register_variable(pipe_sids[0], "x", "integer", 1)
    for sid in pipe_sids[1:]:
        store.create_session(sid, ttl_s=0.2)
    wait_expired(raw, store, *pipe_sids)
    sweepers = [make_store(), make_store()]
    barrier = threading.Barrier(len(sweepers))
    results: list[int] = []
    errors: list[BaseException] = []

    def sweep(s: SessionStore) -> None:
        try:
            barrier.wait()
            results.append(s.expire_sessions())
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=sweep, args=(s,)) for s in sweepers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert len(results) == 2
    assert sum(results) == 200
    stats = store.stats()
    assert (stats["expired"], stats["sweeps"], stats["sessions"]) == (200, 2, 0)
    assert list(raw.scan_iter(match=f"{store.keys.prefix}:s:*", count=1000)) == []


# --- native expiry backstop -----------------------------------------------------------------


def test_every_session_key_has_a_backstop_expiry(
    make_store: StoreFactory, raw: redis.Redis
) -> None:
    store = make_store(expiry_grace_s=30)
    _populated(store, SID, ttl_s=10)
    keys = [
        store.keys.session(SID),
        store.keys.variables(SID),
        store.keys.programs(SID),
        store.keys.program_versions(SID),
        store.keys.events(SID),
    ]
    assert session_key_names(raw, store, SID) == sorted(keys)

    def check() -> None:
        deadline = int(raw.hget(store.keys.session(SID), "deadline_ms") or 0)
        for key in keys:
            assert raw.pttl(key) > 0, key
            # Exactly the deadline plus the grace: slid along with the deadline.
            assert raw.pexpiretime(key) == deadline + 30_000, key

    check()
    server_tick(raw)
    store.touch(SID)
    check()
    server_tick(raw)
    store.update_variable(SID, "x", 2)
    check()
    server_tick(raw)
    store.store_program(SID, "other", QA)
    check()
    server_tick(raw)
    store.create_session(SID, exist_ok=True)
    check()


def test_native_expiry_reclaims_memory_without_a_sweep(
    make_store: StoreFactory, raw: redis.Redis
) -> None:
    store = make_store(expiry_grace_s=0.1)
    _populated(store, SID, ttl_s=0.2)
    wait_server_past(raw, deadline_ms(raw, store, SID) + 100)
    # Redis itself removes every key (at deadline + grace); only the index entry waits
    # for the sweep.
    wait_until(lambda: session_key_names(raw, store, SID) == [], 10, what="native expiry")
    assert raw.zscore(store.keys.sessions, SID) is not None
    assert store.expire_sessions() == 1
    assert raw.zscore(store.keys.sessions, SID) is None
    assert store.stats()["expired"] == 1


# --- stats ------------------------------------------------------------------------------------


def test_stats_count_exactly(store: SessionStore, raw: redis.Redis) -> None:
    assert store.stats() == {
        "sessions": 0,
        "created": 0,
        "deleted": 0,
        "expired": 0,
        "sweeps": 0,
        "variables": 0,
        "programs": 0,
        "global_programs": 0,
    }
    _populated(store, "a")  # 2 variables, 1 program
    _populated(store, "b")
    store.store_program("b", "second", QA)
    store.create_session("c", ttl_s=2)  # still live at the first count, even if slow
    store.register_variable("c", "v", "integer", 1)
    store.create_session("a", exist_ok=True)  # not a new session
    store.store_global_program("g", QA)
    with pytest.raises(ValidationFailed):
        store.register_variable("a", "bad", "integer", "x")
    store.delete_variable("a", "y")
    store.delete_program("a", "qa")
    assert store.stats() == {
        "sessions": 3,
        "created": 3,
        "deleted": 0,
        "expired": 0,
        "sweeps": 0,
        "variables": 1 + 2 + 1,
        "programs": 0 + 2,
        "global_programs": 1,
    }
    assert store.delete_session("b") is True
    assert store.delete_session("b") is False
    assert store.delete_session("never") is False
    wait_expired(raw, store, "c")
    assert store.expire_sessions() == 1
    assert store.stats() == {
        "sessions": 1,
        "created": 3,
        "deleted": 1,
        "expired": 1,
        "sweeps": 1,
        "variables": 1,
        "programs": 0,
        "global_programs": 1,
    }
