"""SessionStore variables on a real redis-server: the 8 types, versions and compare-and-set,
batches, export/import, size limits, the schema cache, and CAS under threads."""

from __future__ import annotations

import json
import math
import threading
import time
from typing import Any

import pytest
import redis
from support.store import StoreFactory, same

from dspex_tasks.errors import (
    PayloadTooLarge,
    SessionNotFound,
    UnknownType,
    ValidationFailed,
    VariableExists,
    VariableNotFound,
    VersionConflict,
)
from dspex_tasks.store import SessionStore, Variable

SID = "sess-1"


@pytest.fixture
def store(make_store: StoreFactory) -> SessionStore:
    store = make_store()
    store.create_session(SID)
    return store


def _vars_hash(raw: redis.Redis, store: SessionStore, sid: str = SID) -> dict[str, str]:
    return raw.hgetall(store.keys.variables(sid))


def _record_untouched(raw: redis.Redis, store: SessionStore, sid: str = SID) -> dict[str, str]:
    """The session record without the fields a touch changes."""
    record = raw.hgetall(store.keys.session(sid))
    record.pop("accessed_ms")
    record.pop("deadline_ms")
    return record


# --- the eight types --------------------------------------------------------------------

TENSOR = {"shape": [2, 3], "data": [[1, 2, 3], [4.5, 5, 6]]}

TYPE_CASES: list[tuple[str, Any, dict[str, Any] | None, Any]] = [
    # (type, value given, constraints, value expected back)
    ("float", 0.7, {"min": 0, "max": 2}, 0.7),
    ("float", 1, None, 1.0),
    ("float", math.nan, {"min": 0, "max": 1}, math.nan),
    ("float", "NaN", None, math.nan),
    ("float", math.inf, None, math.inf),
    ("float", "-Infinity", {"min": 0}, -math.inf),
    ("integer", 42, {"min": 0, "max": 100}, 42),
    ("integer", 3.0, None, 3),
    ("string", "hello", {"pattern": "^h", "max_length": 10}, "hello"),
    ("string", "ü ✓ 𝄞", None, "ü ✓ 𝄞"),
    ("boolean", True, None, True),
    ("boolean", "false", None, False),
    ("choice", "b", {"choices": ["a", "b", "c"]}, "b"),
    (
        "module",
        "ChainOfThought",
        {"allowed_modules": ["Predict", "ChainOfThought"]},
        "ChainOfThought",
    ),
    ("embedding", [0.1, 2, -3.5], {"dimensions": 3}, [0.1, 2.0, -3.5]),
    ("tensor", TENSOR, {"shape": [2, 3]}, TENSOR),
]


@pytest.mark.parametrize(
    ("type_name", "value", "constraints", "expected"),
    TYPE_CASES,
    ids=[f"{c[0]}-{c[1]!r}"[:40] for c in TYPE_CASES],
)
def test_register_and_read_back_each_type(
    store: SessionStore,
    make_store: StoreFactory,
    type_name: str,
    value: Any,
    constraints: dict[str, Any] | None,
    expected: Any,
) -> None:
    v = store.register_variable(
        SID, "v", type_name, value, constraints=constraints, description="d", metadata={"m": 1}
    )
    assert v.type == type_name
    assert v.version == 1
    assert v.id.startswith("var_")
    assert same(v.value, expected)
    # Read back through a fresh store (no cached schema): the value survived Redis.
    got = make_store().get_variable(SID, "v")
    assert same(got.value, expected)
    assert (got.id, got.name, got.type, got.version) == (v.id, "v", type_name, 1)
    assert got.constraints == (constraints or {})
    assert got.description == "d"
    assert got.metadata == {"m": 1}
    assert got.created_at == v.created_at
    assert same(make_store().get_value(SID, "v"), expected)


def test_special_floats_survive_update(store: SessionStore) -> None:
    store.register_variable(SID, "f", "float", 1.0)
    for value in (math.nan, math.inf, -math.inf, 2.5):
        updated = store.update_variable(SID, "f", value)
        assert same(updated.value, value)
        assert same(store.get_value(SID, "f"), value)


def test_duplicate_name_raises_variable_exists(store: SessionStore, raw: redis.Redis) -> None:
    store.register_variable(SID, "x", "integer", 1)
    before = _vars_hash(raw, store)
    with pytest.raises(VariableExists) as exc:
        store.register_variable(SID, "x", "string", "other")
    assert exc.value.code == "variable_exists"
    assert exc.value.details == {"variables": ["x"]}
    assert _vars_hash(raw, store) == before
    assert store.get_variable(SID, "x").type == "integer"


def test_unknown_type(store: SessionStore, raw: redis.Redis) -> None:
    with pytest.raises(UnknownType) as exc:
        store.register_variable(SID, "x", "complex", 1)
    assert exc.value.code == "unknown_type"
    assert _vars_hash(raw, store) == {}


@pytest.mark.parametrize(
    ("type_name", "value", "constraints"),
    [
        ("float", 3.0, {"max": 2}),
        ("integer", 1.5, None),
        ("string", None, None),
        ("boolean", "yes", None),
        ("choice", "z", {"choices": ["a"]}),
        ("embedding", [1, math.nan], None),
        ("tensor", {"shape": [2], "data": [1]}, None),
        ("string", "x", {"pattern": "("}),  # a bad constraint, not a bad value
    ],
)
def test_invalid_register_writes_nothing(
    store: SessionStore, raw: redis.Redis, type_name: str, value: Any, constraints: Any
) -> None:
    with pytest.raises(ValidationFailed):
        store.register_variable(SID, "x", type_name, value, constraints=constraints)
    assert _vars_hash(raw, store) == {}
    with pytest.raises(VariableNotFound):
        store.get_variable(SID, "x")


def test_register_in_missing_session(store: SessionStore) -> None:
    with pytest.raises(SessionNotFound):
        store.register_variable("nope", "x", "integer", 1)
    assert store.exists("nope") is False


# --- lookup, versions, compare-and-set ----------------------------------------------------


def test_lookup_by_name_and_id(store: SessionStore) -> None:
    v = store.register_variable(SID, "temperature", "float", 0.7)
    assert store.get_variable(SID, v.id) == store.get_variable(SID, "temperature")
    assert store.update_variable(SID, v.id, 0.9).value == 0.9
    assert store.get_value(SID, "temperature") == 0.9
    with pytest.raises(VariableNotFound) as exc:
        store.get_variable(SID, "missing")
    assert exc.value.code == "variable_not_found"
    assert store.get_value(SID, "missing", default=None) is None
    with pytest.raises(VariableNotFound):
        store.get_value(SID, "missing")


def test_ids_name_one_registration(store: SessionStore) -> None:
    first = store.register_variable(SID, "my_var.v-2", "integer", 1)
    assert first.id.startswith("var_my_var.v-2_")
    assert store.get_variable(SID, first.id).name == "my_var.v-2"
    store.delete_variable(SID, first.id)
    again = store.register_variable(SID, "my_var.v-2", "integer", 5)
    assert again.id != first.id
    # The old id names the deleted registration, not the name's current variable.
    with pytest.raises(VariableNotFound):
        store.get_variable(SID, first.id)
    with pytest.raises(VariableNotFound):
        store.update_variable(SID, first.id, 6)
    with pytest.raises(VariableNotFound):
        store.delete_variable(SID, first.id)
    assert store.get_value(SID, "my_var.v-2") == 5
    # A live variable's id cannot become another variable's name (tests/test_store_contract.py).
    with pytest.raises(ValidationFailed):
        store.register_variable(SID, again.id, "string", "by name")
    assert store.get_variable(SID, again.id).value == 5
    for token in ("var_", "var__", "var_my_var.v-2_", "var_my_var.v-2_zz", "var_nope_abc"):
        with pytest.raises(VariableNotFound):
            store.get_variable(SID, token)


def test_small_variables_stay_in_a_compact_hash(store: SessionStore, raw: redis.Redis) -> None:
    # Every field of a small variable fits Redis's listpack limits (64 bytes): the
    # encoding that keeps a session of ten of them under 2 KB (benchmarks/memory.py).
    store.register_variable(
        SID, "mode", "choice", "fast", constraints={"choices": ["fast", "careful"]}
    )
    store.register_variable(SID, "temperature", "float", 0.7, constraints={"min": 0, "max": 2})
    store.register_variable(SID, "persona", "string", "helpful", description="who answers")
    store.register_variable(SID, "flag", "boolean", False, metadata={"owner": "ops"})
    store.update_variables(SID, {"temperature": 1.5, "flag": True})
    assert raw.object("encoding", store.keys.variables(SID)) == "listpack"
    # Times are base-36 milliseconds but read back as the same wall-clock instants.
    v = store.get_variable(SID, "temperature")
    assert v.version == 2 and v.updated_at >= v.created_at
    assert abs(v.updated_at.timestamp() - time.time()) < 60


def test_versions_start_at_one_and_grow_by_one(store: SessionStore) -> None:
    v = store.register_variable(SID, "n", "integer", 0)
    assert v.version == 1
    for i in range(1, 6):
        updated = store.update_variable(SID, "n", i)
        assert updated.version == i + 1
        assert updated.updated_at >= updated.created_at
    got = store.get_variable(SID, "n")
    assert (got.value, got.version) == (5, 6)


def test_compare_and_set(store: SessionStore, raw: redis.Redis) -> None:
    store.register_variable(SID, "n", "integer", 0)
    assert store.update_variable(SID, "n", 1, expected_version=1).version == 2
    vars_before = _vars_hash(raw, store)
    record_before = _record_untouched(raw, store)
    with pytest.raises(VersionConflict) as exc:
        store.update_variable(SID, "n", 99, expected_version=1)
    assert exc.value.code == "version_conflict"
    assert exc.value.details["current_version"] == 2
    assert exc.value.details["expected_version"] == 1
    # The rejected write left the variable byte-identical.
    assert _vars_hash(raw, store) == vars_before
    assert _record_untouched(raw, store) == record_before
    assert store.update_variable(SID, "n", 2, expected_version=2).version == 3
    assert store.get_value(SID, "n") == 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"value": 11},  # breaks the stored max constraint
        {"value": "seven"},  # breaks the type
        {"value": 5, "expected_version": "1"},  # a non-integer expected_version
        {"value": 5, "metadata": ["not", "a", "dict"]},
    ],
)
def test_rejected_update_leaves_variable_byte_identical(
    store: SessionStore, raw: redis.Redis, kwargs: dict[str, Any]
) -> None:
    store.register_variable(SID, "n", "integer", 3, constraints={"max": 10}, metadata={"a": 1})
    store.update_variable(SID, "n", 4)
    before = _vars_hash(raw, store)
    record_before = _record_untouched(raw, store)
    value = kwargs.pop("value")
    with pytest.raises(ValidationFailed):
        store.update_variable(SID, "n", value, **kwargs)
    assert _vars_hash(raw, store) == before
    assert _record_untouched(raw, store) == record_before


def test_update_missing_variable(store: SessionStore) -> None:
    with pytest.raises(VariableNotFound):
        store.update_variable(SID, "ghost", 1)
    with pytest.raises(VariableNotFound):
        store.update_variable(SID, "", 1)


def test_metadata_on_update(store: SessionStore) -> None:
    store.register_variable(SID, "x", "integer", 1, metadata={"src": "init"})
    updated = store.update_variable(SID, "x", 2, metadata={"src": "user", "n": 2})
    assert updated.metadata == {"src": "user", "n": 2}
    assert store.get_variable(SID, "x").metadata == {"src": "user", "n": 2}
    # An update without metadata keeps it.
    assert store.update_variable(SID, "x", 3).metadata == {"src": "user", "n": 2}
    assert store.get_variable(SID, "x").metadata == {"src": "user", "n": 2}


# --- listing and batch reads ------------------------------------------------------------------


def test_list_variables_creation_order_and_glob(store: SessionStore) -> None:
    for name in ("z", "a", "m", "temp_b", "temp_a"):
        store.register_variable(SID, name, "integer", 0)
    assert [v.name for v in store.list_variables(SID)] == ["z", "a", "m", "temp_b", "temp_a"]
    assert [v.name for v in store.list_variables(SID, "temp_*")] == ["temp_b", "temp_a"]
    assert [v.name for v in store.list_variables(SID, "?")] == ["z", "a", "m"]
    assert [v.name for v in store.list_variables(SID, "[am]")] == ["a", "m"]
    assert store.list_variables(SID, "nomatch*") == []
    # Deleted and re-registered: it is now the newest.
    store.delete_variable(SID, "a")
    store.register_variable(SID, "a", "string", "again")
    listed = store.list_variables(SID)
    assert [v.name for v in listed] == ["z", "m", "temp_b", "temp_a", "a"]
    assert listed[-1].value == "again"
    assert listed[0] == store.get_variable(SID, "z")


def test_get_variables_found_and_missing(store: SessionStore) -> None:
    a = store.register_variable(SID, "a", "integer", 1)
    store.register_variable(SID, "b", "string", "x")
    found, missing = store.get_variables(SID, ["a", "nope", "b", "gone"])
    assert set(found) == {"a", "b"}
    assert found["a"] == a
    assert found["b"].value == "x"
    assert missing == ["nope", "gone"]
    found, missing = store.get_variables(SID, [a.id])
    assert found == {a.id: a}
    assert missing == []
    assert store.get_variables(SID, []) == ({}, [])


def test_delete_variable(store: SessionStore, raw: redis.Redis) -> None:
    v = store.register_variable(SID, "x", "integer", 1, metadata={"k": 1})
    store.register_variable(SID, "keep", "integer", 2)
    store.delete_variable(SID, "x")
    with pytest.raises(VariableNotFound):
        store.get_variable(SID, "x")
    with pytest.raises(VariableNotFound):
        store.get_variable(SID, v.id)
    with pytest.raises(VariableNotFound):
        store.delete_variable(SID, "x")
    # No field of x is left behind.
    assert not [f for f in _vars_hash(raw, store) if f == "x" or f.endswith(":x")]
    assert store.get_value(SID, "keep") == 2
    # Deleting by id works too.
    w = store.register_variable(SID, "y", "integer", 1)
    store.delete_variable(SID, w.id)
    assert [x.name for x in store.list_variables(SID)] == ["keep"]


# --- update_variables ---------------------------------------------------------------------


def _three(store: SessionStore) -> None:
    store.register_variable(SID, "a", "integer", 1)
    store.register_variable(SID, "b", "float", 0.5, constraints={"min": 0, "max": 1})
    store.register_variable(SID, "c", "string", "x")


def test_update_variables_atomic_success(store: SessionStore) -> None:
    _three(store)
    result = store.update_variables(SID, {"a": 2, "b": 0.75, "c": "y"})
    assert {n: (v.value, v.version) for n, v in result.items() if isinstance(v, Variable)} == {
        "a": (2, 2),
        "b": (0.75, 2),
        "c": ("y", 2),
    }
    found, _ = store.get_variables(SID, ["a", "b", "c"])
    assert {n: v.value for n, v in found.items()} == {"a": 2, "b": 0.75, "c": "y"}


def test_update_variables_atomic_is_all_or_nothing(store: SessionStore, raw: redis.Redis) -> None:
    _three(store)
    before = _vars_hash(raw, store)
    with pytest.raises(ValidationFailed) as exc:
        store.update_variables(SID, {"a": 2, "b": 5.0, "c": "y"})
    failures = exc.value.details["failures"]
    assert failures["b"]["code"] == "validation_failed"
    assert "max" in failures["b"]["message"]
    # The other names say they were not written, and why.
    assert set(failures) <= {"a", "b", "c"}
    assert all(f["code"] == "version_conflict" for n, f in failures.items() if n != "b")
    assert _vars_hash(raw, store) == before
    assert store.get_value(SID, "a") == 1


def test_update_variables_atomic_missing_name(store: SessionStore, raw: redis.Redis) -> None:
    _three(store)
    before = _vars_hash(raw, store)
    with pytest.raises(VariableNotFound) as exc:
        store.update_variables(SID, {"a": 2, "ghost": 1})
    assert exc.value.details["failures"]["ghost"]["code"] == "variable_not_found"
    assert _vars_hash(raw, store) == before


def test_update_variables_atomic_version_conflict(store: SessionStore, raw: redis.Redis) -> None:
    _three(store)
    store.update_variable(SID, "c", "z")  # c is now at version 2
    before = _vars_hash(raw, store)
    with pytest.raises(VersionConflict) as exc:
        store.update_variables(SID, {"a": 2, "c": "w"}, expected_versions={"a": 1, "c": 1})
    failures = exc.value.details["failures"]
    assert failures["c"]["code"] == "version_conflict"
    assert failures["a"]["code"] == "version_conflict"  # not written: batch aborted
    assert _vars_hash(raw, store) == before
    result = store.update_variables(SID, {"a": 2, "c": "w"}, expected_versions={"a": 1, "c": 2})
    assert {n: v.version for n, v in result.items() if isinstance(v, Variable)} == {
        "a": 2,
        "c": 3,
    }


def test_update_variables_non_atomic_per_name_results(store: SessionStore) -> None:
    _three(store)
    result = store.update_variables(SID, {"a": 7, "b": "bad", "ghost": 1, "c": "ok"}, atomic=False)
    assert isinstance(result["a"], Variable)
    assert (result["a"].value, result["a"].version) == (7, 2)
    assert isinstance(result["b"], ValidationFailed)
    assert isinstance(result["ghost"], VariableNotFound)
    assert isinstance(result["c"], Variable)
    assert result["c"].value == "ok"
    found, _ = store.get_variables(SID, ["a", "b", "c"])
    assert {n: (v.value, v.version) for n, v in found.items()} == {
        "a": (7, 2),
        "b": (0.5, 1),
        "c": ("ok", 2),
    }


def test_update_variables_non_atomic_conflict(store: SessionStore) -> None:
    _three(store)
    result = store.update_variables(
        SID, {"a": 5, "c": "q"}, atomic=False, expected_versions={"a": 9}
    )
    assert isinstance(result["a"], VersionConflict)
    assert result["a"].details["current_version"] == 1
    assert isinstance(result["c"], Variable)
    assert store.get_value(SID, "a") == 1
    assert store.get_value(SID, "c") == "q"


# --- export / import ----------------------------------------------------------------------


def _populate(store: SessionStore) -> None:
    store.register_variable(SID, "temperature", "float", math.nan, constraints={"min": 0})
    store.register_variable(
        SID, "style", "string", "terse", description="tone", metadata={"by": "u"}
    )
    store.register_variable(SID, "emb", "embedding", [0.25, 0.5], constraints={"dimensions": 2})
    store.register_variable(SID, "t", "tensor", TENSOR)
    store.register_variable(SID, "flag", "boolean", False)
    store.update_variable(SID, "style", "verbose")
    store.update_variable(SID, "temperature", -math.inf)


def test_export_import_round_trip(store: SessionStore) -> None:
    _populate(store)
    doc = store.export_variables(SID)
    # The export is strict JSON (special floats are strings), so it can cross the wire.
    doc = json.loads(json.dumps(doc, allow_nan=False))
    store.create_session("copy")
    imported = store.import_variables("copy", doc)
    originals = store.list_variables(SID)
    copies = store.list_variables("copy")
    assert [v.name for v in copies] == [v.name for v in originals] == [v.name for v in imported]
    for orig, copy in zip(originals, copies, strict=True):
        assert (copy.type, copy.constraints, copy.description, copy.metadata) == (
            orig.type,
            orig.constraints,
            orig.description,
            orig.metadata,
        )
        assert same(copy.value, orig.value)
        assert copy.version == 1
        assert copy.id != orig.id


def test_import_is_all_or_nothing_on_name_clash(store: SessionStore, raw: redis.Redis) -> None:
    _populate(store)
    doc = store.export_variables(SID)
    store.create_session("target")
    store.register_variable("target", "emb", "integer", 7)
    before = _vars_hash(raw, store, "target")
    with pytest.raises(VariableExists) as exc:
        store.import_variables("target", doc)
    assert exc.value.details["variables"] == ["emb"]
    assert _vars_hash(raw, store, "target") == before
    assert [v.name for v in store.list_variables("target")] == ["emb"]


def test_import_rejects_invalid_item_and_writes_nothing(
    store: SessionStore, raw: redis.Redis
) -> None:
    doc = {
        "variables": [
            {"name": "ok", "type": "integer", "value": 1},
            {"name": "bad", "type": "integer", "value": "one"},
        ]
    }
    with pytest.raises(ValidationFailed):
        store.import_variables(SID, doc)
    assert _vars_hash(raw, store) == {}
    with pytest.raises(ValidationFailed):
        store.import_variables(SID, {"nope": []})


# --- size limits ------------------------------------------------------------------------------


def test_oversized_value_is_payload_too_large(make_store: StoreFactory, raw: redis.Redis) -> None:
    store = make_store(max_value_bytes=1024)
    store.create_session(SID)
    with pytest.raises(PayloadTooLarge) as exc:
        store.register_variable(SID, "big", "string", "x" * 2000)
    assert exc.value.code == "payload_too_large"
    assert exc.value.details["limit_bytes"] == 1024
    assert exc.value.details["size_bytes"] > 1024
    assert _vars_hash(raw, store) == {}
    with pytest.raises(VariableNotFound):
        store.get_variable(SID, "big")
    # Updates are limited too, and a rejected one writes nothing.
    store.register_variable(SID, "emb", "embedding", [0.5] * 10)
    before = _vars_hash(raw, store)
    with pytest.raises(PayloadTooLarge):
        store.update_variable(SID, "emb", [0.123456789] * 200)
    with pytest.raises(PayloadTooLarge) as batch:
        store.update_variables(SID, {"emb": [0.123456789] * 200})
    assert batch.value.details["failures"]["emb"]["code"] == "payload_too_large"
    assert _vars_hash(raw, store) == before
    # Just under the limit is fine.
    assert store.update_variable(SID, "emb", [0.5] * 100).version == 2


def test_oversized_session_metadata(make_store: StoreFactory) -> None:
    store = make_store(max_value_bytes=1024)
    with pytest.raises(PayloadTooLarge):
        store.create_session("s1", metadata={"blob": "x" * 2000})
    assert store.exists("s1") is False


# --- the schema cache across store instances --------------------------------------------


def _cache_then_retype(make_store: StoreFactory) -> tuple[SessionStore, SessionStore]:
    """Instance A caches x as an integer; instance B re-registers x as a string."""
    a, b = make_store(), make_store()
    a.create_session(SID)
    a.register_variable(SID, "x", "integer", 1)
    assert a.update_variable(SID, "x", 2).version == 2  # A's schema cache holds x
    b.delete_variable(SID, "x")
    b.register_variable(SID, "x", "string", "fresh", constraints={"max_length": 8})
    return a, b


def test_stale_schema_cache_accepts_value_valid_for_new_type(make_store: StoreFactory) -> None:
    a, b = _cache_then_retype(make_store)
    updated = a.update_variable(SID, "x", "hello")
    assert (updated.type, updated.value, updated.version) == ("string", "hello", 2)
    got = b.get_variable(SID, "x")
    assert (got.type, got.value, got.version) == ("string", "hello", 2)


def test_stale_schema_cache_rejects_value_valid_only_for_old_type(
    make_store: StoreFactory, raw: redis.Redis
) -> None:
    a, b = _cache_then_retype(make_store)
    before = _vars_hash(raw, a)
    with pytest.raises(ValidationFailed) as exc:
        a.update_variable(SID, "x", 7)
    assert exc.value.details["type"] == "string"
    assert _vars_hash(raw, a) == before
    # The new constraints apply as well, not just the new type.
    with pytest.raises(ValidationFailed) as exc:
        a.update_variable(SID, "x", "much too long")
    assert exc.value.details["rule"] == "max_length"
    assert b.get_variable(SID, "x").value == "fresh"


def test_stale_schema_cache_in_batches(make_store: StoreFactory) -> None:
    a, b = _cache_then_retype(make_store)
    a.register_variable(SID, "y", "integer", 1)
    result = a.update_variables(SID, {"x": "batch", "y": 2})
    assert isinstance(result["x"], Variable)
    assert (result["x"].type, result["x"].value) == ("string", "batch")
    # Now y changes type behind A's back; a non-atomic batch must see the new type.
    b.delete_variable(SID, "y")
    b.register_variable(SID, "y", "boolean", True)
    result = a.update_variables(SID, {"y": "false"}, atomic=False)
    assert isinstance(result["y"], Variable)
    assert result["y"].value is False
    assert b.get_value(SID, "y") is False


def test_deleted_variable_seen_through_stale_cache(make_store: StoreFactory) -> None:
    a, b = make_store(), make_store()
    a.create_session(SID)
    a.register_variable(SID, "x", "integer", 1)
    b.delete_variable(SID, "x")
    # A still caches x as an integer: a value the old type rejects must not be reported
    # as a validation failure of a variable that no longer exists.
    with pytest.raises(VariableNotFound):
        a.update_variable(SID, "x", "not an int")
    a.register_variable(SID, "z", "integer", 1)
    b.delete_variable(SID, "z")
    with pytest.raises(VariableNotFound):
        a.update_variable(SID, "z", 2)


# --- compare-and-set under threads ----------------------------------------------------------


def test_cas_increments_from_threads_lose_nothing(store: SessionStore) -> None:
    threads_n, per_thread = 8, 200
    store.register_variable(SID, "counter", "integer", 0)
    barrier = threading.Barrier(threads_n)
    errors: list[BaseException] = []
    conflicts = [0] * threads_n

    def work(k: int) -> None:
        try:
            barrier.wait()
            for _ in range(per_thread):
                while True:
                    v = store.get_variable(SID, "counter")
                    try:
                        store.update_variable(
                            SID, "counter", v.value + 1, expected_version=v.version
                        )
                        break
                    except VersionConflict:
                        conflicts[k] += 1
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(threads_n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    final = store.get_variable(SID, "counter")
    assert final.value == threads_n * per_thread == 1600, f"conflicts retried: {conflicts}"
    assert final.version == 1601
    assert time.monotonic() - t0 < 60
