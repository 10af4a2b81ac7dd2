"""A task's records in Celery's result backend: STARTED and SUCCESS written by the round
trips that claim the task and record its end when the backend is the store's Redis, by
the backend itself (as Celery writes them) when not.

Either way a producer sees the same records (Celery's fields, the extended result's, the
expiry), published to a waiting producer, and nothing is written over a stored SUCCESS.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery, states
from support.dbs import db_url
from support.polling import wait_until
from support.worker import (
    Call,
    DspexWorker,
    Recorder,
    default_answer,
    in_process_worker,
    mark,
    recording_lms,
    worker_app,
)

from dspex_tasks.app import PREDICT_TASK, make_celery
from dspex_tasks.client import close_app
from dspex_tasks.errors import DuplicateDelivery
from dspex_tasks.resultbackend import OneTripRedisBackend, TaskRecords, writes_to
from dspex_tasks.settings import Settings
from dspex_tasks.store import SessionStore

QA = "question -> answer"

#: (task id, state) of every record the result backend itself wrote, in order.
Written = list[tuple[str, str]]


@pytest.fixture
def backend_writes(monkeypatch: pytest.MonkeyPatch) -> Written:
    written: Written = []
    write = OneTripRedisBackend._store_state_once

    def spy(self: OneTripRedisBackend, key: str, value: Any, expires_s: int) -> Any:
        meta = json.loads(value)
        written.append((meta["task_id"], meta["status"]))
        return write(self, key, value, expires_s)

    monkeypatch.setattr(OneTripRedisBackend, "_store_state_once", spy)
    return written


@dataclass
class HeldRun:
    """A predict whose LM call waited until its STARTED record was read."""

    task_id: str
    running: dict[str, Any]  # its record while it ran
    final: dict[str, Any]  # its record once it returned
    result: dict[str, Any]  # what the producer got


def held_run(
    producer: Celery, recorder: Recorder, store: SessionStore, backend_url: str
) -> HeldRun:
    sid, m = f"st-{uuid.uuid4().hex[:10]}", mark()
    store.create_session(sid)
    entered, release = threading.Event(), threading.Event()

    def hold(call: Call) -> dict[str, str]:
        entered.set()
        release.wait(30)
        return default_answer(call)

    recorder.script(m, hold)
    handle = producer.send_task(PREDICT_TASK, args=[sid, QA, {"question": f"q MARK[{m}]"}])
    raw = redis.Redis.from_url(backend_url)
    key = producer.backend.get_key_for_task(handle.id)
    try:
        try:
            assert entered.wait(20), "the task never reached its LM call"
            running = json.loads(raw.get(key))
            assert handle.state == states.STARTED  # what a producer reads
        finally:
            release.set()
        result: dict[str, Any] = handle.get(timeout=20)  # published to the waiting producer
        return HeldRun(handle.id, running, json.loads(raw.get(key)), result)
    finally:
        raw.close()


def check_records(run: HeldRun) -> None:
    """The records are Celery's: its fields, the extended result's, the expiry's."""
    started, final = run.running, run.final
    assert started["status"] == states.STARTED and started["task_id"] == run.task_id
    assert started["result"]["pid"] == os.getpid()  # the in-process worker's
    assert started["result"]["hostname"] == started["worker"] != ""
    assert started["date_done"] is None
    assert final["status"] == states.SUCCESS and final["task_id"] == run.task_id
    assert final["result"] == run.result and final["traceback"] is None
    assert final["date_done"] and final["children"] == []
    for record in (started, final):  # result_extended
        assert record["name"] == PREDICT_TASK and record["args"][1] == QA
        assert record["worker"] == started["worker"] and record["queue"] == "dspex"


def test_the_store_writes_started_and_success(dspex: DspexWorker, backend_writes: Written) -> None:
    run = held_run(dspex.producer, dspex.recorder, dspex.store, dspex.url)
    check_records(run)
    assert run.result["outputs"]["answer"].startswith("answer for ")
    # Both went with the claim's and the finish record's round trips.
    assert [state for tid, state in backend_writes if tid == run.task_id] == []


def test_a_task_that_writes_variables_leaves_success_to_the_backend(
    dspex: DspexWorker, backend_writes: Written
) -> None:
    sid, m = dspex.session(), mark()
    dspex.store.register_variable(sid, "last_answer", "string", "none yet")
    options = {"store_outputs": {"answer": "last_answer"}}
    result = dspex.run(PREDICT_TASK, sid, QA, {"question": f"q MARK[{m}]"}, options)
    assert dspex.store.get_variable(sid, "last_answer").value == result["outputs"]["answer"]
    written = [state for _, state in backend_writes]
    assert written == [states.SUCCESS]


@pytest.fixture
def split_worker(redis_url: str) -> Iterator[tuple[Celery, Recorder, SessionStore, str]]:
    """A worker whose result backend is another database than its store and broker."""
    url, backend_url = db_url(redis_url, "records"), db_url(redis_url, "records.backend")
    environ = {"DSPEX_RESULT_BACKEND": backend_url}
    settings = Settings.from_env(environ=environ, redis_url=url, key_prefix="st")
    recorder = Recorder()
    app, runtime = worker_app(settings, lms=recording_lms(recorder))
    producer = make_celery(settings)
    store = runtime.store
    store.redis.flushdb()
    try:
        with in_process_worker(app, shutdown_timeout=15):
            yield producer, recorder, store, backend_url
    finally:
        close_app(producer)
        close_app(app)
        store.redis.flushdb()
        store.close()


def test_another_redis_gets_them_from_the_backend(
    split_worker: tuple[Celery, Recorder, SessionStore, str], backend_writes: Written
) -> None:
    producer, recorder, store, backend_url = split_worker
    assert not writes_to(producer.backend, store.redis)
    run = held_run(producer, recorder, store, backend_url)
    check_records(run)
    assert [state for tid, state in backend_writes if tid == run.task_id] == [
        states.STARTED,
        states.SUCCESS,
    ]


def test_the_store_never_writes_over_success(dspex: DspexWorker) -> None:
    backend = dspex.producer.backend
    assert writes_to(backend, dspex.store.redis)
    store, sid = dspex.store, dspex.session()
    raw = redis.Redis.from_url(dspex.url)
    pubsub = raw.pubsub(ignore_subscribe_messages=True)
    try:
        # A fresh task: the claim writes STARTED, with the backend's expiry, and publishes
        # it to waiting result consumers; the finish record writes SUCCESS.
        records = TaskRecords(backend, _request(f"fresh-{uuid.uuid4().hex}"))
        key = records.started().key
        pubsub.subscribe(key)
        store.begin_task(sid, task_id=records.request.id, started=records.started())
        assert json.loads(raw.get(key))["status"] == states.STARTED
        assert 0 < raw.ttl(key) <= backend.expires
        # (The first read may return the ignored subscribe confirmation.)
        message = wait_until(lambda: pubsub.get_message(timeout=1), 10, what="the publish")
        assert json.loads(message["data"])["status"] == states.STARTED
        answer = {"answer": 1}
        assert (
            store.finish_task(sid, records.request.id, answer, succeeded=records.succeeded(answer))
            is None
        )
        assert json.loads(raw.get(key))["result"] == answer

        # Delivered again: the claim answers the first result and writes nothing.
        again = TaskRecords(backend, records.request)
        with pytest.raises(DuplicateDelivery):
            store.begin_task(sid, task_id=records.request.id, started=again.started())
        assert json.loads(raw.get(key))["status"] == states.SUCCESS

        # A task whose SUCCESS is stored (its claim record lapsed): the claim leaves it.
        done = TaskRecords(backend, _request(f"done-{uuid.uuid4().hex}"))
        backend.store_result(done.request.id, {"answer": 2}, states.SUCCESS)
        before = raw.get(done.started().key)
        store.begin_task(sid, task_id=done.request.id, started=done.started())
        assert raw.get(done.started().key) == before

        # Another delivery finished first: its result stands, and this one writes none.
        late = TaskRecords(backend, _request(f"late-{uuid.uuid4().hex}"))
        store.begin_task(sid, task_id=late.request.id)
        assert store.finish_task(sid, late.request.id, {"answer": 3}) is None  # the first
        first = raw.get(late.started().key)
        earlier = store.finish_task(
            sid, late.request.id, {"answer": 4}, succeeded=late.succeeded({"answer": 4})
        )
        assert earlier == {"answer": 3} and raw.get(late.started().key) == first
    finally:
        pubsub.close()
        raw.close()


def test_same_redis_is_told_apart_from_another(redis_url: str) -> None:
    """The store's client and the backend name the same Redis in different ways."""
    base = redis_url.rsplit("/", 1)[0] if redis_url.count("/") > 2 else redis_url
    app = make_celery(Settings.from_env(environ={}, redis_url=f"{base}/0", key_prefix="st"))
    clients = {
        url: redis.Redis.from_url(url)
        for url in (base, f"{base}/0", f"{base}/1", base.replace("127.0.0.1", "localhost"))
    }
    try:
        same = {url for url, client in clients.items() if writes_to(app.backend, client)}
        assert same == {base, f"{base}/0"}  # no database in the URL: database 0
    finally:
        for client in clients.values():
            client.close()
        close_app(app)


def _request(task_id: str) -> SimpleNamespace:
    """The request fields Celery's (extended) result record reads."""
    return SimpleNamespace(
        id=task_id,
        hostname="test@host",
        task=PREDICT_TASK,
        args=["s", QA, {}],
        kwargs={},
        retries=0,
        delivery_info={"routing_key": "dspex"},
    )
