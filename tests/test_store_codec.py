"""Stored value encoding (store/codec.py) and the task-claim pruning, on a real Redis.

Embeddings are packed (float32 when exact, float64 otherwise) and read back as the very
same list; short embeddings and data stored as plain lists read as before. The done
hash of a busy session is pruned a few records per claim instead of read whole.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator

import pytest
from support.store import raw_client, same

from dspex_tasks.store import SessionStore
from dspex_tasks.store.codec import PACK_MIN_LENGTH, decode_stored, encode_stored

SID = "codec-1"


def f32(x: float) -> float:
    return float(struct.unpack("f", struct.pack("f", x))[0])


@pytest.fixture
def store(redis_url: str, key_prefix: str) -> Iterator[SessionStore]:
    s = SessionStore.from_url(redis_url, prefix=key_prefix, default_ttl_s=60)
    s.create_session(SID)
    yield s
    s.delete_session(SID)
    s.close()


@pytest.mark.parametrize(
    ("values", "packing"),
    [
        ([f32(random.Random(1).uniform(-1, 1)) for _ in range(768)], "f32"),
        ([random.Random(2).uniform(-1, 1) for _ in range(768)], "f64"),
        ([1e300, *([0.5] * 20)], "f64"),  # beyond float32 range
        ([1e-50, *([0.5] * 20)], "f64"),  # float32 would flush it to zero
        ([-0.0, *([0.25] * 20)], "f32"),
        ([0.1] * PACK_MIN_LENGTH, "f64"),
        ([0.5] * (PACK_MIN_LENGTH - 1), None),
    ],
)
def test_embedding_packing_is_lossless(values: list[float], packing: str | None) -> None:
    stored = encode_stored("embedding", values)
    if packing is None:
        assert stored == values
    else:
        assert set(stored) == {packing}
    back = decode_stored("embedding", stored)
    assert same(back, values)
    assert [str(v) for v in back] == [str(v) for v in values]  # sign of zero included


def test_other_types_keep_their_json_form() -> None:
    assert encode_stored("float", float("nan")) == "NaN"
    assert decode_stored("float", "Infinity") == float("inf")
    assert encode_stored("tensor", {"shape": [2], "data": [1, 2]}) == {"shape": [2], "data": [1, 2]}
    assert decode_stored("embedding", [0.5, 1.0]) == [0.5, 1.0]  # stored before packing


def test_store_round_trip_and_size(store: SessionStore, redis_url: str) -> None:
    rng = random.Random(7)
    values = [f32(rng.uniform(-1, 1)) for _ in range(768)]
    var = store.register_variable(SID, "emb", "embedding", values, constraints={"dimensions": 768})
    assert var.value == values
    assert store.get_variable(SID, "emb").value == values
    raw = raw_client(redis_url).hget(store.keys.variables(SID), "emb")
    assert raw is not None and len(raw) < 4200  # JSON digits would be ~15 KB
    updated = [v / 2 for v in values]
    assert store.update_variable(SID, "emb", updated).value == updated
    assert store.get_variables(SID, ["emb"])[0]["emb"].value == updated
    assert store.list_variables(SID)[0].value == updated
    assert store.export_variables(SID)["variables"][0]["value"] == updated  # plain list


def test_plain_json_list_stored_earlier_still_reads(store: SessionStore, redis_url: str) -> None:
    values = [0.25] * 32
    store.register_variable(SID, "old", "embedding", values)
    raw = raw_client(redis_url)
    record = raw.hget(store.keys.variables(SID), "old")
    assert record is not None
    version, updated, _packed = record.split(":", 2)
    plain = "[" + ",".join(["0.25"] * 32) + "]"
    raw.hset(store.keys.variables(SID), "old", f"{version}:{updated}:{plain}")
    assert store.get_variable(SID, "old").value == values


def test_done_hash_is_pruned_incrementally(store: SessionStore, redis_url: str) -> None:
    raw = raw_client(redis_url)
    done = store.keys.done(SID)
    for i in range(600):  # leases lapse at once: every record is prunable
        store.begin_task(SID, task_id=f"lapsed-{i}", lease_s=0.001)
    assert raw.hlen(done) <= 300
    for i in range(300):  # live claims are never pruned
        store.begin_task(SID, task_id=f"live-{i}", lease_s=60)
    fields = raw.hkeys(done)
    assert sum(f.startswith("live-") for f in fields) == 300
    assert len(fields) <= 300 + 300
