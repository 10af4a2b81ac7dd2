"""Compile state in the store (store/compile.py) against a real Redis: datasets, program
versions and rollback, the optimization lease and the checkpoint, and that all of it
lives and dies with the session."""

from __future__ import annotations

import pytest
import redis
from support.polling import wait_until
from support.store import StoreFactory, session_key_names

from dspex_tasks.errors import (
    DatasetNotFound,
    HistoryUnavailable,
    InvalidInputs,
    OptimizationInProgress,
    PayloadTooLarge,
    ProgramNotFound,
)
from dspex_tasks.store import SessionStore

SID = "sess-c"
QA = {"module": "predict", "signature": "question -> answer"}
COT = {"module": "chain_of_thought", "signature": "question -> answer"}
EXAMPLES = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]


@pytest.fixture
def store(make_store: StoreFactory) -> SessionStore:
    s = make_store(program_history=3, max_dataset_bytes=2_000)
    s.create_session(SID)
    s.store_program(SID, "qa", QA)
    return s


def test_datasets_round_trip_and_are_checked(store: SessionStore) -> None:
    assert store.store_dataset(SID, "train", EXAMPLES) == 2
    assert store.get_dataset(SID, "train") == EXAMPLES
    assert store.list_datasets(SID) == ["train"]
    with pytest.raises(DatasetNotFound) as info:
        store.get_dataset(SID, "nope")
    assert info.value.code == "dataset_not_found"
    for bad in ([], [{}], ["text"], "not a list"):
        with pytest.raises(InvalidInputs):
            store.store_dataset(SID, "bad", bad)
    with pytest.raises(InvalidInputs):
        store.store_dataset(SID, "bad name", EXAMPLES)
    with pytest.raises(PayloadTooLarge):
        store.store_dataset(SID, "big", [{"question": "x" * 3_000, "answer": "y"}])
    assert store.delete_dataset(SID, "train") is True
    assert store.delete_dataset(SID, "train") is False


def test_every_write_is_a_version_kept_to_the_history_depth(store: SessionStore) -> None:
    for _ in range(3):
        store.store_program(SID, "qa", COT)
    history = store.program_history(SID, "qa")
    assert [v["version"] for v in history] == [4, 3, 2]  # depth 3
    assert set(history[0]) == {"version", "created_at", "score", "run_id"}
    assert [v["version"] for v in store.program_history(SID, "qa", limit=1)] == [4]
    with pytest.raises(HistoryUnavailable):
        store.rollback_program(SID, "qa", 1)  # no longer kept
    with pytest.raises(ProgramNotFound):
        store.program_history(SID, "missing")


def test_rollback_writes_the_old_spec_as_a_new_version(store: SessionStore) -> None:
    store.store_program(SID, "qa", COT)
    assert store.rollback_program(SID, "qa", 1) == 3
    assert store.get_program(SID, "qa")["module"] == "predict"
    assert [v["version"] for v in store.program_history(SID, "qa")] == [3, 2, 1]


def test_delete_program_forgets_its_versions(store: SessionStore, raw: redis.Redis) -> None:
    assert store.delete_program(SID, "qa") is True
    assert not raw.hkeys(store.keys.program_versions(SID))
    store.store_program(SID, "qa", QA)
    assert [v["version"] for v in store.program_history(SID, "qa")] == [1]


def test_the_lease_one_delivery_at_a_time(store: SessionStore) -> None:
    first = store.begin_compile(SID, "qa", "run-1", "tok-a", lease_s=30)
    assert first.status == "ok" and first.checkpoint is None
    assert store.begin_compile(SID, "qa", "run-1", "tok-b", lease_s=30).status == "running"
    other = store.begin_compile(SID, "qa", "run-2", "tok-c", lease_s=30)
    assert other.status == "locked" and other.holder == "run-1"
    lease = store.program_lease(SID, "qa")
    assert lease is not None and lease["run_id"] == "run-1"

    store.save_checkpoint(SID, "qa", "run-1", "tok-a", {"done": {"baseline": 0.5}})
    with pytest.raises(OptimizationInProgress):  # not the holder
        store.save_checkpoint(SID, "qa", "run-1", "tok-b", {})
    assert store.renew_compile(SID, "qa", "tok-a", 30) is True
    assert store.renew_compile(SID, "qa", "tok-b", 30) is False
    # A retry of the run keeps its checkpoint; the same run gets it back.
    assert store.release_compile(SID, "qa", "tok-a", keep_checkpoint=True) is True
    again = store.begin_compile(SID, "qa", "run-1", "tok-d", lease_s=30)
    assert again.checkpoint == {"done": {"baseline": 0.5}}
    version = store.commit_compile(SID, "qa", "run-1", "tok-d", COT, 0.9, 0.5)
    assert version == 2 and store.program_lease(SID, "qa") is None
    assert store.get_program(SID, "qa")["module"] == "chain_of_thought"
    top = store.program_versions(SID, "qa")[0]
    assert (top.score, top.baseline_score, top.run_id) == (0.9, 0.5, "run-1")
    # A late delivery of the committed run learns it is done, and writes nothing.
    late = store.begin_compile(SID, "qa", "run-1", "tok-e", lease_s=30)
    assert late.status == "done" and late.committed is not None
    assert late.committed.version == 2


def test_another_runs_checkpoint_is_dropped(store: SessionStore) -> None:
    store.begin_compile(SID, "qa", "run-1", "tok-a", lease_s=0.2)
    store.save_checkpoint(SID, "qa", "run-1", "tok-a", {"done": {"baseline": 0.1}})
    wait_until(lambda: store.program_lease(SID, "qa") is None, 5, what="the lapse")
    start = store.begin_compile(SID, "qa", "run-2", "tok-b", lease_s=30)
    assert start.status == "ok" and start.checkpoint is None


def test_compile_state_is_a_session_key_set_with_backstop_and_expiry(
    make_store: StoreFactory, raw: redis.Redis
) -> None:
    store = make_store(expiry_grace_s=30)
    store.create_session(SID, ttl_s=0.3)
    store.store_program(SID, "qa", QA)
    store.store_dataset(SID, "train", EXAMPLES)
    store.begin_compile(SID, "qa", "run-1", "tok", lease_s=30)
    store.save_checkpoint(SID, "qa", "run-1", "tok", {"done": {}})
    deadline = int(raw.hget(store.keys.session(SID), "deadline_ms") or 0)
    for key in (store.keys.datasets(SID), store.keys.program_versions(SID)):
        assert raw.pexpiretime(key) == deadline + 30_000, key
    wait_until(lambda: store.expire_sessions() == 1, 5, what="the sweep")
    assert session_key_names(raw, store, SID) == []


def test_restore_writes_programs_as_versions_and_forgets_removed_ones(
    store: SessionStore, raw: redis.Redis
) -> None:
    snapshot = store.snapshot(SID)
    store.store_program(SID, "qa", COT)
    store.store_program(SID, "later", QA)
    store.restore(SID, snapshot)
    assert store.get_program(SID, "qa")["module"] == "predict"
    assert [v["version"] for v in store.program_history(SID, "qa")] == [3, 2, 1]
    assert "later" not in store.list_programs(SID)
    fields = raw.hkeys(store.keys.program_versions(SID))
    assert fields and not [f for f in fields if f.startswith("later")]
