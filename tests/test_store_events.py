"""The session event log, watch, history, rollback, snapshot and restore (DESIGN.md §8), on
a real redis-server."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from support.store import StoreFactory, session_key_names

from dspex_tasks.errors import (
    DspexError,
    HistoryUnavailable,
    InvalidInputs,
    SessionNotFound,
    VersionConflict,
)
from dspex_tasks.store import Event, SessionStore

SID = "ev"


@pytest.fixture
def store(make_store: StoreFactory) -> SessionStore:
    store = make_store()
    store.create_session(SID, metadata={"user": 7})
    return store


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _kinds(events: list[Event]) -> list[str]:
    return [e.type for e in events]


# --- what gets recorded ----------------------------------------------------------------


def test_every_change_records_one_event_in_order(store: SessionStore) -> None:
    x = store.register_variable(SID, "x", "float", 0.5)
    store.update_variable(SID, "x", 0.75)
    store.store_program(SID, "qa", {"module": "predict", "signature": "q -> a"})
    store.set_session_lm(SID, profile="default", temperature=0.2)
    store.delete_program(SID, "qa")
    store.delete_program(SID, "qa")  # nothing deleted: no event
    store.get_variable(SID, "x")  # reads and touches make no event
    store.touch(SID)
    store.delete_variable(SID, "x")
    events = store.events(SID)
    assert _kinds(events) == [
        "session.created",
        "variable.registered",
        "variable.updated",
        "program.stored",
        "session.updated",
        "program.deleted",
        "variable.deleted",
    ]
    assert events[0].data == {"ttl_s": 60, "metadata": {"user": 7}}
    assert events[1].data == {
        "name": "x", "id": x.id, "version": 1, "type": "float", "value": 0.5,
    }  # fmt: skip
    assert events[2].data["version"] == 2 and events[2].data["value"] == 0.75
    assert events[3].data == {"program_id": "qa", "version": 1}
    assert events[4].data["lm"]["params"] == {"temperature": 0.2}
    assert events[6].data == {
        "name": "x", "id": x.id, "version": 2, "type": "float", "value": None,
    }  # fmt: skip
    ids = [e.id for e in events]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    assert all(e.at.tzinfo is not None for e in events)


def test_events_after_types_and_limit(store: SessionStore) -> None:
    store.register_variable(SID, "n", "integer", 0)
    for i in range(1, 6):
        store.update_variable(SID, "n", i)
    updates = store.events(SID, types=["variable.updated"])
    assert [e.data["value"] for e in updates] == [1, 2, 3, 4, 5]
    after = store.events(SID, after=updates[1].id, types=["variable.updated"], limit=2)
    assert [e.data["value"] for e in after] == [3, 4]
    assert store.events(SID, after=updates[-1].id) == []


def test_run_writes_carry_the_run_id(store: SessionStore) -> None:
    store.register_variable(SID, "answer", "string", "")
    store.update_variables(SID, {"answer": "42"}, task_id="run-1", task_result={"ok": 1})
    event = store.events(SID, types=["variable.updated"])[0]
    assert event.data["run_id"] == "run-1"
    assert store.variable_history(SID, "answer")[0].run_id == "run-1"


@pytest.mark.parametrize("after", ["abc", "1-x", "-1", "", "$", None, "1 2"])
def test_bad_after_is_invalid_inputs(store: SessionStore, after: Any) -> None:
    with pytest.raises(InvalidInputs) as info:
        store.events(SID, after=after)
    assert info.value.code == "invalid_inputs"


def test_unknown_session_events(store: SessionStore) -> None:
    with pytest.raises(SessionNotFound):
        store.events("nobody")
    with pytest.raises(SessionNotFound):
        store.watch("nobody", block_s=0.1)


def test_events_off_makes_no_stream(make_store: StoreFactory, raw: redis.Redis) -> None:
    store = make_store(events_maxlen=0)
    store.create_session("quiet")
    store.register_variable("quiet", "x", "integer", 1)
    store.update_variable("quiet", "x", 2)
    assert raw.exists(store.keys.events("quiet")) == 0
    assert store.events("quiet") == []


def test_stream_is_trimmed_near_maxlen(make_store: StoreFactory, raw: redis.Redis) -> None:
    store = make_store(events_maxlen=50)
    store.create_session("busy")
    store.register_variable("busy", "n", "integer", 0)
    for i in range(500):
        store.update_variable("busy", "n", i)
    length = raw.xlen(store.keys.events("busy"))
    # Approximate trimming removes whole nodes of 100 entries: never far over.
    assert 50 <= length <= 150
    assert store.events("busy", after="0", limit=1000)[-1].data["value"] == 499


def test_delete_and_expiry_remove_the_stream(
    make_store: StoreFactory, raw: redis.Redis, store: SessionStore
) -> None:
    store.register_variable(SID, "x", "integer", 1)
    assert raw.exists(store.keys.events(SID)) == 1
    store.delete_session(SID)
    assert session_key_names(raw, store, SID) == []
    short = make_store(default_ttl_s=0.2, expiry_grace_s=0)
    short.create_session("gone")
    short.register_variable("gone", "x", "integer", 1)

    def expired() -> bool:
        return short.expire_sessions() == 1

    _wait(expired, timeout_s=10)
    assert session_key_names(raw, short, "gone") == []


def _wait(predicate: Any, timeout_s: float) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# --- watch: every version once, in order, resumable ----------------------------------------


def test_watch_sees_every_cas_version_once_and_resumes_without_gap(
    make_store: StoreFactory,
) -> None:
    store = make_store()
    store.create_session("hot")
    store.register_variable("hot", "counter", "integer", 0)
    writers, increments = 20, 25
    total = writers * increments
    start = store.last_event_id("hot")
    seen: list[int] = []
    resumed_at: list[int] = []
    errors: list[BaseException] = []

    def watcher() -> None:
        try:
            cursor = start
            # Disconnect twice (after 100 and 300 events) and resume from the last id.
            for stop_after in (100, 300, None):
                stream = store.watch("hot", names=["counter"], after=cursor, block_s=20)
                for got, event in enumerate(stream, start=1):
                    seen.append(event.data["version"])
                    cursor = event.id
                    if len(seen) == total or (stop_after and got == stop_after):
                        break
                resumed_at.append(len(seen))
                if len(seen) == total:
                    return
        except BaseException as e:  # reported by the test
            errors.append(e)

    def writer() -> None:
        done = 0
        while done < increments:
            current = store.get_variable("hot", "counter")
            try:
                store.update_variable(
                    "hot", "counter", current.value + 1, expected_version=current.version
                )
                done += 1
            except VersionConflict:
                continue

    watch_thread = threading.Thread(target=watcher)
    watch_thread.start()
    threads = [threading.Thread(target=writer) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    watch_thread.join(timeout=60)
    assert not errors
    assert store.get_value("hot", "counter") == total
    assert seen == list(range(2, total + 2))  # every version exactly once, in order
    assert resumed_at[:2] == [100, 400]


def test_state_and_events_agree_at_any_instant(make_store: StoreFactory, redis_url: str) -> None:
    """Write and event are one script: a MULTI read of both always agrees."""
    store = make_store()
    store.create_session("atom")
    store.register_variable("atom", "v", "integer", 0)
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            store.update_variable("atom", "v", n)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    reader = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for _ in range(300):
            pipe = reader.pipeline(transaction=True)
            pipe.hget(store.keys.variables("atom"), "v")
            pipe.xrevrange(store.keys.events("atom"), count=1)
            record, newest = pipe.execute()
            version = int(record.split(":", 1)[0])
            assert newest[0][1]["d"].startswith('["v",')
            assert int(newest[0][1]["d"].split(",")[2]) == version
            if random.random() < 0.1:
                threading.Event().wait(0.001)
    finally:
        stop.set()
        for t in threads:
            t.join()
        reader.close()


def test_awatch_on_asyncio(store: SessionStore) -> None:
    async def main() -> list[int]:
        got: list[int] = []
        start = store.last_event_id(SID)
        store.register_variable(SID, "a", "integer", 1)

        async def consume() -> None:
            async for event in store.awatch(SID, names=["a"], after=start, block_s=5):
                got.append(event.data["version"])
                if len(got) == 3:
                    return

        task = asyncio.create_task(consume())
        await asyncio.to_thread(store.update_variable, SID, "a", 2)
        await asyncio.to_thread(store.update_variable, SID, "a", 3)
        await asyncio.wait_for(task, timeout=10)
        return got

    assert asyncio.run(main()) == [1, 2, 3]


def test_watch_ends_when_the_session_goes(store: SessionStore) -> None:
    stream = store.watch(SID)
    store.delete_session(SID)
    with pytest.raises(SessionNotFound):
        next(iter(stream))


# --- history and rollback ------------------------------------------------------------------


def test_history_depth_is_honoured(store: SessionStore) -> None:
    store.register_variable(SID, "h", "integer", 0, history=3)
    for i in range(1, 6):
        store.update_variable(SID, "h", i)
    versions = store.variable_history(SID, "h")
    assert [(v.version, v.value) for v in versions] == [(6, 5), (5, 4), (4, 3)]
    assert store.variable_history(SID, "h", limit=1)[0].version == 6
    store.register_variable(SID, "none", "integer", 0, history=0)
    store.update_variable(SID, "none", 1)
    assert [v.version for v in store.variable_history(SID, "none")] == [2]


def test_default_history_comes_from_the_store(make_store: StoreFactory) -> None:
    store = make_store(variable_history=2)
    store.create_session("d")
    store.register_variable("d", "x", "string", "a")
    for value in "bcd":
        store.update_variable("d", "x", value)
    assert [v.value for v in store.variable_history("d", "x")] == ["d", "c"]


def test_rollback_writes_the_old_value_as_a_new_version(store: SessionStore) -> None:
    store.register_variable(SID, "t", "float", 0.1, constraints={"min": 0, "max": 1})
    store.update_variable(SID, "t", 0.2)
    store.update_variable(SID, "t", 0.3)
    back = store.rollback_variable(SID, "t", 1)
    assert (back.version, back.value) == (4, 0.1)
    assert store.get_variable(SID, "t").value == 0.1
    assert store.events(SID)[-1].type == "variable.rolled_back"
    with pytest.raises(VersionConflict):
        store.rollback_variable(SID, "t", 2, expected_version=3)
    again = store.rollback_variable(SID, "t", 2, expected_version=4)
    assert (again.version, again.value) == (5, 0.2)


def test_rollback_to_a_version_not_kept(store: SessionStore) -> None:
    store.register_variable(SID, "t", "integer", 1, history=2)
    for i in range(2, 6):
        store.update_variable(SID, "t", i)
    before = store.get_variable(SID, "t")
    with pytest.raises(HistoryUnavailable) as info:
        store.rollback_variable(SID, "t", 1)
    assert info.value.code == "history_unavailable"
    assert store.get_variable(SID, "t") == before


# --- snapshot and restore --------------------------------------------------------------------


def test_snapshot_restore_round_trip(store: SessionStore) -> None:
    store.register_variable(SID, "t", "float", 0.5, metadata={"k": 1}, description="temp")
    store.register_variable(
        SID, "style", "choice", "terse", constraints={"choices": ["terse", "long"]}
    )
    store.register_variable(SID, "e", "embedding", [0.25] * 20)
    store.store_program(SID, "qa", {"module": "predict", "signature": "q -> a"})
    store.set_session_lm(SID, profile="default", temperature=0.3)
    snap = store.snapshot(SID)
    t_before = store.get_variable(SID, "t")
    # Change everything afterwards.
    store.update_variable(SID, "t", 0.9, metadata={"k": None, "j": 2})
    store.delete_variable(SID, "style")
    store.register_variable(SID, "extra", "integer", 1)
    store.delete_program(SID, "qa")
    store.store_program(SID, "other", {"module": "predict", "signature": "x -> y"})
    store.set_session_lm(SID, profile="default", temperature=1.5)
    store.restore(SID, snap)
    again = store.snapshot(SID)

    # Same variables, ids, types, constraints, values, metadata; versions only grow, and a
    # re-created variable is listed after the others (creation order).
    def strip(doc: dict[str, Any]) -> list[dict[str, Any]]:
        items = [{k: v for k, v in i.items() if k != "version"} for i in doc["variables"]]
        return sorted(items, key=lambda i: str(i["name"]))

    assert strip(again) == strip(snap)
    assert again["programs"] == snap["programs"] and again["lm"] == snap["lm"]
    t_after = store.get_variable(SID, "t")
    assert t_after.id == t_before.id and t_after.value == 0.5
    assert t_after.version == t_before.version + 2  # never backwards: 1 -> 2 -> 3
    # A restore of the state it already has changes nothing.
    versions = {v.name: v.version for v in store.list_variables(SID)}
    marker = store.last_event_id(SID)
    store.restore(SID, snap)
    assert {v.name: v.version for v in store.list_variables(SID)} == versions
    assert store.events(SID, after=marker) == []


@pytest.mark.parametrize(
    "breakage",
    [
        lambda s: s.update(format="dspex.snapshot/0"),
        lambda s: s["variables"][0].update(value="not a float"),
        lambda s: s["variables"][1].update(value="neither"),  # not one of the choices
        lambda s: s["variables"][0].update(type="nonsense"),
        lambda s: s["programs"].update(bad={"module": "predict", "signature": "no arrow"}),
        lambda s: s["lm"].update(params={"api_base": "http://evil"}),
        lambda s: s["variables"].append(dict(s["variables"][0])),
    ],
)
def test_a_rejected_restore_leaves_the_session_byte_identical(
    store: SessionStore, raw: redis.Redis, breakage: Any
) -> None:
    store.register_variable(SID, "t", "float", 0.5)
    store.register_variable(SID, "style", "choice", "a", constraints={"choices": ["a", "b"]})
    store.store_program(SID, "qa", {"module": "predict", "signature": "q -> a"})
    snap = store.snapshot(SID)
    store.update_variable(SID, "t", 0.7)
    breakage(snap)
    before = {k: raw.dump(k) for k in session_key_names(raw, store, SID)}
    with pytest.raises(DspexError) as info:
        store.restore(SID, snap)
    assert info.value.code in {"validation_failed", "invalid_program", "unknown_type"}
    # Every key of the session, the record with its deadline included, byte for byte.
    assert {k: raw.dump(k) for k in session_key_names(raw, store, SID)} == before
