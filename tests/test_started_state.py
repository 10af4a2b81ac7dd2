"""A task's STARTED state: written by the round trip that claims the task when Celery's
result backend is the store's Redis, by the backend itself (as Celery writes it) when not.

Either way a producer sees the same record: ``STARTED`` with the worker's pid and
hostname and the extended-result fields, never written over a stored ``SUCCESS``.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
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
from dspex_tasks.resultbackend import OneTripRedisBackend, started_record, writes_to
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


def held_run(
    producer: Celery, recorder: Recorder, store: SessionStore, backend_url: str
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Run a predict whose LM call waits until its STARTED record was read.

    Returns (task id, the record while the task ran, the task's result)."""
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
    try:
        assert entered.wait(20), "the task never reached its LM call"
        running = json.loads(raw.get(producer.backend.get_key_for_task(handle.id)))
        assert handle.state == states.STARTED  # what a producer reads
    finally:
        release.set()
        raw.close()
    result: dict[str, Any] = handle.get(timeout=20)
    return handle.id, running, result


def check_started(record: dict[str, Any], task_id: str) -> None:
    assert record["status"] == states.STARTED and record["task_id"] == task_id
    assert record["result"]["pid"] == os.getpid()  # the in-process worker's
    assert record["result"]["hostname"] == record["worker"] != ""
    assert record["name"] == PREDICT_TASK and record["args"][1] == QA  # result_extended


def test_the_claim_writes_started(dspex: DspexWorker, backend_writes: Written) -> None:
    task_id, running, result = held_run(dspex.producer, dspex.recorder, dspex.store, dspex.url)
    check_started(running, task_id)
    assert result["outputs"]["answer"].startswith("answer for ")
    # The backend wrote the outcome only: STARTED went with the claim's round trip.
    assert [state for tid, state in backend_writes if tid == task_id] == [states.SUCCESS]


@pytest.fixture
def split_worker(redis_url: str) -> Iterator[tuple[Celery, Recorder, SessionStore, str]]:
    """A worker whose result backend is another database than its store and broker."""
    url, backend_url = db_url(redis_url, "started"), db_url(redis_url, "started.backend")
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


def test_another_redis_gets_started_from_the_backend(
    split_worker: tuple[Celery, Recorder, SessionStore, str], backend_writes: Written
) -> None:
    producer, recorder, store, backend_url = split_worker
    assert not writes_to(producer.backend, store.redis)
    task_id, running, _ = held_run(producer, recorder, store, backend_url)
    check_started(running, task_id)
    assert [state for tid, state in backend_writes if tid == task_id] == [
        states.STARTED,
        states.SUCCESS,
    ]


def test_a_claim_never_writes_started_over_success(dspex: DspexWorker) -> None:
    backend = dspex.producer.backend
    assert writes_to(backend, dspex.store.redis)
    store, sid = dspex.store, dspex.session()
    raw = redis.Redis.from_url(dspex.url)
    pubsub = raw.pubsub(ignore_subscribe_messages=True)
    try:
        # A fresh task: the claim writes the record, with the backend's expiry, and
        # publishes it to waiting result consumers.
        request = _request(f"fresh-{uuid.uuid4().hex}")
        record = started_record(backend, request)
        pubsub.subscribe(record.key)
        store.begin_task(sid, task_id=request.id, started=record)
        assert json.loads(raw.get(record.key))["status"] == states.STARTED
        assert 0 < raw.ttl(record.key) <= backend.expires
        # (The first read may return the ignored subscribe confirmation.)
        message = wait_until(lambda: pubsub.get_message(timeout=1), 10, what="the publish")
        assert json.loads(message["data"])["status"] == states.STARTED

        # A task whose SUCCESS is stored (its claim record lapsed): the claim leaves it.
        done = _request(f"done-{uuid.uuid4().hex}")
        backend.store_result(done.id, {"answer": 1}, states.SUCCESS)
        key = backend.get_key_for_task(done.id)
        before = raw.get(key)
        store.begin_task(sid, task_id=done.id, started=started_record(backend, done))
        assert raw.get(key) == before
    finally:
        pubsub.close()
        raw.close()


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
