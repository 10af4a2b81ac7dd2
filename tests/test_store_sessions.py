"""SessionStore sessions on a real redis-server: lifecycle, ids, TTL, quota, LM settings,
and StoreUnavailable when Redis cannot be reached."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta, timezone
from typing import Any

import pytest
import redis
from support.store import (
    StoreFactory,
    deadline_ms,
    server_tick,
    session_key_names,
    wait_server_past,
)

from dspex_tasks.errors import (
    InvalidSessionId,
    SessionExists,
    SessionNotFound,
    SessionQuotaExceeded,
    StoreUnavailable,
    ValidationFailed,
)
from dspex_tasks.store import Session, SessionStore


@pytest.fixture
def store(make_store: StoreFactory) -> SessionStore:
    return make_store()


def _record(raw: redis.Redis, store: SessionStore, sid: str) -> dict[str, str]:
    return raw.hgetall(store.keys.session(sid))


# --- create / get / exists / touch / delete / list --------------------------------------


def test_create_returns_session_with_ttl_and_utc_times(store: SessionStore) -> None:
    s = store.create_session("s1", ttl_s=30, metadata={"user": "u1"})
    assert isinstance(s, Session)
    assert s.id == "s1"
    assert s.ttl_s == 30
    assert s.created_at.tzinfo == timezone.utc
    assert s.last_accessed == s.created_at
    assert s.expires_at - s.last_accessed == timedelta(seconds=30)
    assert s.metadata == {"user": "u1"}
    assert s.lm == {}


def test_get_returns_what_create_stored(store: SessionStore) -> None:
    created = store.create_session("s1", metadata={"k": [1, 2]})
    got = store.get_session("s1", touch=False)
    assert got == created


def test_duplicate_create_raises_session_exists(store: SessionStore, raw: redis.Redis) -> None:
    store.create_session("dup", metadata={"v": 1})
    before = _record(raw, store, "dup")
    with pytest.raises(SessionExists) as exc:
        store.create_session("dup", metadata={"v": 2})
    assert exc.value.code == "session_exists"
    assert exc.value.details == {"session_id": "dup"}
    assert _record(raw, store, "dup") == before
    assert store.stats()["created"] == 1


def test_create_exist_ok_returns_existing_and_touches(
    store: SessionStore, raw: redis.Redis
) -> None:
    first = store.create_session("dup", ttl_s=30, metadata={"v": 1})
    server_tick(raw)
    again = store.create_session("dup", ttl_s=99, metadata={"v": 2}, exist_ok=True)
    # The existing session, not a new one: same creation time, ttl and metadata.
    assert again.created_at == first.created_at
    assert again.ttl_s == 30
    assert again.metadata == {"v": 1}
    # ...but touched.
    assert again.last_accessed > first.last_accessed
    assert again.expires_at > first.expires_at
    assert store.stats()["created"] == 1


def test_get_missing_session_raises_session_not_found(store: SessionStore) -> None:
    with pytest.raises(SessionNotFound) as exc:
        store.get_session("nope")
    assert exc.value.code == "session_not_found"
    assert store.exists("nope") is False


def test_exists_does_not_touch(store: SessionStore, raw: redis.Redis) -> None:
    store.create_session("s1")
    before = store.get_session("s1", touch=False)
    server_tick(raw)
    assert store.exists("s1") is True
    after = store.get_session("s1", touch=False)
    assert after.last_accessed == before.last_accessed
    assert after.expires_at == before.expires_at


def test_get_with_touch_false_does_not_touch(store: SessionStore, raw: redis.Redis) -> None:
    created = store.create_session("s1")
    server_tick(raw)
    store.get_session("s1", touch=False)
    assert store.get_session("s1", touch=False).expires_at == created.expires_at


def test_touch_slides_expires_at(store: SessionStore, raw: redis.Redis) -> None:
    created = store.create_session("s1", ttl_s=10)
    server_tick(raw)
    touched = store.touch("s1")
    assert touched.last_accessed > created.last_accessed
    assert touched.expires_at > created.expires_at
    assert touched.expires_at - touched.last_accessed == timedelta(seconds=10)
    assert touched.created_at == created.created_at
    # get_session touches by default too.
    server_tick(raw)
    assert store.get_session("s1").expires_at > touched.expires_at


def test_delete_is_idempotent_and_removes_every_key(store: SessionStore, raw: redis.Redis) -> None:
    store.create_session("s1")
    store.register_variable("s1", "x", "integer", 1)
    store.store_program("s1", "qa", {"module": "predict", "signature": "q -> a"})
    assert len(session_key_names(raw, store, "s1")) == 5  # record, vars, progs, pver, events
    assert store.delete_session("s1") is True
    assert store.delete_session("s1") is False
    assert session_key_names(raw, store, "s1") == []
    assert raw.zscore(store.keys.sessions, "s1") is None
    assert store.exists("s1") is False
    assert store.stats()["deleted"] == 1


def test_list_sessions_sorted_and_live_only(store: SessionStore) -> None:
    assert store.list_sessions() == []
    for sid in ("c", "a", "b"):
        store.create_session(sid)
    assert store.list_sessions() == ["a", "b", "c"]
    store.delete_session("b")
    assert store.list_sessions() == ["a", "c"]


def test_list_sessions_drops_expired_keeps_touched(store: SessionStore, raw: redis.Redis) -> None:
    # Second-long windows on the server clock, so a stalled CI machine still touches
    # "kept" before its first deadline and lists before its second.
    store.create_session("short", ttl_s=0.2)
    store.create_session("kept", ttl_s=2)
    store.create_session("long")
    first = deadline_ms(raw, store, "kept")
    wait_server_past(raw, first - 1000)
    store.touch("kept")  # real deadline now ~1 s later; its index entry still says `first`
    wait_server_past(raw, max(first, deadline_ms(raw, store, "short")))
    assert raw.zscore(store.keys.sessions, "kept") == first  # the index alone says expired
    assert store.list_sessions() == ["kept", "long"]


def test_sessions_of_other_prefixes_are_invisible(
    store: SessionStore, redis_url: str, key_prefix: str
) -> None:
    other = SessionStore.from_url(redis_url, prefix=key_prefix + "x")
    try:
        other.create_session("s1")
        assert store.list_sessions() == []
        assert store.exists("s1") is False
    finally:
        other.delete_session("s1")
        other.close()


# --- metadata ---------------------------------------------------------------------------


def test_metadata_round_trip_and_update(store: SessionStore) -> None:
    meta = {"user": "ü-42", "tags": ["a", "b"], "nested": {"n": 1.5, "ok": True, "none": None}}
    store.create_session("s1", metadata=meta)
    assert store.get_session("s1").metadata == meta
    updated = store.update_session_metadata("s1", {"replaced": 1})
    assert updated.metadata == {"replaced": 1}
    assert store.get_session("s1", touch=False).metadata == {"replaced": 1}


@pytest.mark.parametrize("bad", [["a"], "text", 5])
def test_metadata_must_be_an_object(store: SessionStore, bad: Any) -> None:
    with pytest.raises(ValidationFailed):
        store.create_session("s1", metadata=bad)
    assert store.exists("s1") is False
    store.create_session("s2", metadata={"v": 1})
    with pytest.raises(ValidationFailed):
        store.update_session_metadata("s2", bad)
    assert store.get_session("s2").metadata == {"v": 1}


def test_update_metadata_of_missing_session(store: SessionStore) -> None:
    with pytest.raises(SessionNotFound):
        store.update_session_metadata("nope", {"a": 1})
    assert store.exists("nope") is False


# --- TTL ------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [0, -1, -0.5, True, False, "10", [10], float("nan")])
def test_invalid_ttl_is_rejected_and_nothing_created(
    store: SessionStore, raw: redis.Redis, ttl: Any
) -> None:
    with pytest.raises(ValidationFailed) as exc:
        store.create_session("s1", ttl_s=ttl)
    assert exc.value.code == "validation_failed"
    assert session_key_names(raw, store, "s1") == []
    assert store.list_sessions() == []


def test_default_ttl_comes_from_the_store(make_store: StoreFactory) -> None:
    store = make_store(default_ttl_s=123)
    s = store.create_session("s1")
    assert s.ttl_s == 123
    assert s.expires_at - s.created_at == timedelta(seconds=123)
    assert store.create_session("s2", ttl_s=7).ttl_s == 7


# --- quota ----------------------------------------------------------------------------


def test_quota_rejects_and_creates_nothing(make_store: StoreFactory, raw: redis.Redis) -> None:
    store = make_store(max_sessions=2)
    store.create_session("a")
    store.create_session("b")
    with pytest.raises(SessionQuotaExceeded) as exc:
        store.create_session("c", metadata={"x": 1})
    assert exc.value.code == "session_quota_exceeded"
    assert exc.value.details == {"limit": 2}
    assert store.exists("c") is False
    assert session_key_names(raw, store, "c") == []
    assert store.list_sessions() == ["a", "b"]
    assert store.stats()["created"] == 2
    # An existing id with exist_ok is not a new session: no quota error.
    assert store.create_session("a", exist_ok=True).id == "a"
    # Freeing a slot lets the next one in.
    store.delete_session("a")
    assert store.create_session("c").id == "c"
    assert store.list_sessions() == ["b", "c"]


# --- session ids ----------------------------------------------------------------------

BAD_IDS = ["", "a b", "{x}", "a*", "x" * 129, None, 5, "ü", "a\n", "a?", "[a]", "a}b"]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_bad_session_id_is_rejected_everywhere(
    store: SessionStore, raw: redis.Redis, key_prefix: str, bad: Any
) -> None:
    with pytest.raises(InvalidSessionId) as exc:
        store.create_session(bad)
    assert exc.value.code == "invalid_session_id"
    with pytest.raises(InvalidSessionId):
        store.get_session(bad)
    with pytest.raises(InvalidSessionId):
        store.register_variable(bad, "x", "integer", 1)
    with pytest.raises(InvalidSessionId):
        store.exists(bad)
    with pytest.raises(InvalidSessionId):
        store.delete_session(bad)
    assert list(raw.scan_iter(match=f"{key_prefix}:*")) == []


GOOD_IDS = [":", "@", ".", "-", "_", "a:b@c.d-e_f", "A9", "x" * 128, "1" * 128]


@pytest.mark.parametrize("sid", GOOD_IDS)
def test_edge_session_ids_work(store: SessionStore, raw: redis.Redis, sid: str) -> None:
    assert store.create_session(sid).id == sid
    assert store.get_session(sid).id == sid
    assert store.exists(sid) is True
    store.register_variable(sid, "x", "integer", 1)
    assert store.get_value(sid, "x") == 1
    assert session_key_names(raw, store, sid) == sorted(
        [store.keys.session(sid), store.keys.variables(sid), store.keys.events(sid)]
    )
    assert store.list_sessions() == [sid]
    assert store.delete_session(sid) is True
    assert session_key_names(raw, store, sid) == []


def test_similar_ids_do_not_share_keys(store: SessionStore, raw: redis.Redis) -> None:
    store.create_session("a")
    store.create_session("ab")
    store.register_variable("ab", "x", "integer", 1)
    assert session_key_names(raw, store, "a") == [store.keys.session("a"), store.keys.events("a")]
    store.delete_session("a")
    assert store.get_value("ab", "x") == 1


# --- LM settings ------------------------------------------------------------------------


def test_set_session_lm_stores_profile_and_params(store: SessionStore) -> None:
    store.create_session("s1")
    s = store.set_session_lm("s1", profile="fast", temperature=0.3, max_tokens=256, stop="END")
    expected = {
        "profile": "fast",
        "params": {"temperature": 0.3, "max_tokens": 256, "stop": ["END"]},
    }
    assert s.lm == expected
    assert store.get_session("s1", touch=False).lm == expected
    # Setting again replaces, it does not merge.
    assert store.set_session_lm("s1", top_p=0.5).lm == {
        "profile": "default",
        "params": {"top_p": 0.5},
    }


@pytest.mark.parametrize(
    ("profile", "params"),
    [
        ("default", {"api_base": "http://evil.example"}),
        ("default", {"api_key": "sk-123"}),
        ("default", {"model": "openai/gpt-4o"}),
        ("default", {"temperature": 5}),
        ("default", {"temperature": True}),
        ("default", {"max_tokens": 0}),
        ("default", {"n": 1.5}),
        ("bad profile", {}),
        ("", {}),
    ],
)
def test_set_session_lm_rejects_unsafe_settings(
    store: SessionStore, raw: redis.Redis, profile: str, params: dict[str, Any]
) -> None:
    store.create_session("s1")
    store.set_session_lm("s1", profile="fast", temperature=0.1)
    before = _record(raw, store, "s1")
    with pytest.raises(ValidationFailed) as exc:
        store.set_session_lm("s1", profile=profile, **params)
    assert exc.value.code == "validation_failed"
    assert _record(raw, store, "s1") == before
    assert store.get_session("s1").lm == {"profile": "fast", "params": {"temperature": 0.1}}


def test_set_session_lm_on_missing_session(store: SessionStore) -> None:
    with pytest.raises(SessionNotFound):
        store.set_session_lm("nope", temperature=0.2)


# --- StoreUnavailable -------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.create_session("s1"),
        lambda s: s.get_session("s1"),
        lambda s: s.list_sessions(),
        lambda s: s.stats(),
        lambda s: s.expire_sessions(),
    ],
    ids=["create_session", "get_session", "list_sessions", "stats", "expire_sessions"],
)
def test_unreachable_redis_raises_store_unavailable_quickly(
    call: Callable[[SessionStore], Any],
) -> None:
    store = SessionStore.from_url("redis://127.0.0.1:1", socket_timeout_s=1.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable) as exc:
            call(store)
        assert time.monotonic() - t0 < 3
        assert exc.value.code == "store_unavailable"
        assert isinstance(exc.value.__cause__, redis.ConnectionError)
    finally:
        store.close()
