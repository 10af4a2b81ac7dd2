"""What DSPy and Snakepit users expect of the store (DESIGN.md §3 "Settled details"), on a
real redis-server: ids always reach the variable they were issued for, metadata updates
merge, and any redis-py client works whatever its ``decode_responses``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from support.store import StoreFactory

from dspex_tasks.errors import ValidationFailed, VariableExists, VersionConflict
from dspex_tasks.store import SessionStore

SID = "contract"


@pytest.fixture
def store(make_store: StoreFactory) -> SessionStore:
    store = make_store()
    store.create_session(SID)
    return store


def _state(store: SessionStore) -> list[tuple[str, str, object, int, object]]:
    return [(v.id, v.name, v.value, v.version, v.metadata) for v in store.list_variables(SID)]


# --- an id always resolves to the variable it was issued for ----------------------------


def test_a_name_equal_to_a_live_id_is_refused_and_changes_nothing(
    store: SessionStore,
) -> None:
    x = store.register_variable(SID, "x", "integer", 1)
    before = _state(store)
    with pytest.raises(ValidationFailed) as info:
        store.register_variable(SID, x.id, "integer", 2)
    assert info.value.code == "validation_failed"
    assert x.id in info.value.message
    assert _state(store) == before
    # The id still reads, writes and deletes x, and only x.
    assert store.get_variable(SID, x.id).name == "x"
    assert store.update_variable(SID, x.id, 5).name == "x"
    store.delete_variable(SID, x.id)
    assert store.list_variables(SID) == []


def test_a_batch_with_a_live_id_as_a_name_registers_nothing(store: SessionStore) -> None:
    x = store.register_variable(SID, "x", "integer", 1)
    document = {
        "variables": [
            {"name": "fresh", "type": "integer", "value": 1},
            {"name": x.id, "type": "integer", "value": 2},
        ]
    }
    with pytest.raises(ValidationFailed):
        store.import_variables(SID, document)
    assert [v.name for v in store.list_variables(SID)] == ["x"]


def test_an_id_shaped_name_registered_first_never_takes_a_later_id(
    store: SessionStore,
) -> None:
    # The other way round: a name that looks like an id but is nobody's id is fine, and a
    # later variable's own id reaches that later variable, not the id-shaped name.
    shaped = store.register_variable(SID, "var_y_abc123", "string", "shaped")
    y = store.register_variable(SID, "y", "string", "real")
    assert y.id != shaped.name
    assert store.get_variable(SID, "var_y_abc123").value == "shaped"
    assert store.get_variable(SID, y.id).value == "real"
    assert store.get_variable(SID, shaped.id).value == "shaped"
    store.update_variable(SID, y.id, "real2")
    assert store.get_variable(SID, "var_y_abc123").value == "shaped"
    store.delete_variable(SID, y.id)
    assert store.get_variable(SID, "var_y_abc123").value == "shaped"


def test_an_id_of_a_deleted_variable_does_not_block_the_name(store: SessionStore) -> None:
    x = store.register_variable(SID, "x", "integer", 1)
    store.delete_variable(SID, "x")
    # Nobody holds that id any more: the id-shaped name is a plain name now.
    assert store.register_variable(SID, x.id, "integer", 3).name == x.id


# --- metadata updates merge ------------------------------------------------------------


def test_update_metadata_merges_and_none_removes(store: SessionStore) -> None:
    store.register_variable(SID, "t", "float", 0.5, metadata={"a": 1, "b": [1, 2.5], "c": "x"})
    v = store.update_variable(SID, "t", 0.6, metadata={"b": None, "d": {"e": 0.1}})
    assert v.metadata == {"a": 1, "c": "x", "d": {"e": 0.1}}
    assert store.get_variable(SID, "t").metadata == {"a": 1, "c": "x", "d": {"e": 0.1}}
    # A value write without metadata keeps it; removing every key leaves {}.
    assert store.update_variable(SID, "t", 0.7).metadata == v.metadata
    cleared = store.update_variable(SID, "t", 0.8, metadata={"a": None, "c": None, "d": None})
    assert cleared.metadata == {}
    assert store.get_variable(SID, "t").metadata == {}
    assert store.get_variable(SID, "t").version == 4


def test_metadata_merge_keeps_exact_numbers_and_empty_lists(store: SessionStore) -> None:
    store.register_variable(SID, "t", "integer", 1, metadata={"big": 12345678901234567})
    v = store.update_variable(SID, "t", 2, metadata={"f": 0.30000000000000004, "l": []})
    assert v.metadata == {"big": 12345678901234567, "f": 0.30000000000000004, "l": []}
    assert store.get_variable(SID, "t").metadata == v.metadata


def test_batch_update_metadata_merges_too(store: SessionStore) -> None:
    store.register_variable(SID, "a", "integer", 1, metadata={"k": 1, "gone": True})
    store.register_variable(SID, "b", "integer", 1)
    out = store._update_many(  # the batch path that update_variables and tasks use
        SID, [("a", 2, None, {"gone": None, "n": 2}), ("b", 2, None, {"m": 1})], atomic=True
    )
    assert [getattr(v, "metadata", v) for v in out] == [{"k": 1, "n": 2}, {"m": 1}]
    assert store.get_variable(SID, "a").metadata == {"k": 1, "n": 2}
    assert store.get_variable(SID, "b").metadata == {"m": 1}


def test_a_rejected_metadata_write_changes_nothing(store: SessionStore) -> None:
    store.register_variable(SID, "t", "integer", 1, metadata={"k": 1})
    before = _state(store)
    with pytest.raises(VersionConflict):
        store.update_variable(SID, "t", 2, expected_version=7, metadata={"k": None})
    with pytest.raises(ValidationFailed):
        store.update_variable(SID, "t", "not an int", metadata={"k": 2})
    assert _state(store) == before


def test_concurrent_metadata_patches_lose_no_key(store: SessionStore) -> None:
    import threading

    store.register_variable(SID, "t", "integer", 0)
    barrier = threading.Barrier(8)

    def patch(n: int) -> None:
        barrier.wait()
        store.update_variable(SID, "t", n, metadata={f"k{n}": n})

    threads = [threading.Thread(target=patch, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    v = store.get_variable(SID, "t")
    assert v.metadata == {f"k{n}": n for n in range(8)}
    assert v.version == 9


# --- any redis-py client works -----------------------------------------------------------


@pytest.fixture
def bytes_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)  # a user's default: replies are bytes
    yield client
    client.close()


def test_a_default_bytes_client_works(bytes_client: redis.Redis, key_prefix: str) -> None:
    store = SessionStore(bytes_client, prefix=key_prefix)
    try:
        store.create_session("b1")
        v = store.register_variable("b1", "name", "string", "héllo", metadata={"k": "v"})
        assert store.get_variable("b1", v.id).value == "héllo"
        assert store.update_variable("b1", "name", "wörld").version == 2
        assert store.get_session("b1").id == "b1"
        assert store.list_sessions() == ["b1"]
        with pytest.raises(VariableExists):
            store.register_variable("b1", "name", "string", "again")
    finally:
        store.close()
    # The user's own client is theirs: still open, still bytes.
    assert bytes_client.ping() is True
    assert isinstance(bytes_client.hget(store.keys.session("b1"), "ttl_ms"), bytes)


def test_a_decoding_client_is_used_as_it_is(redis_url: str, key_prefix: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = SessionStore(client, prefix=key_prefix)
    try:
        assert store.redis is client
        store.create_session("d1")
        assert store.exists("d1")
    finally:
        store.close()
