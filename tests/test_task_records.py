"""A task's records in Celery's result backend when the backend is the store's Redis:
STARTED and SUCCESS written by the round trips that claim the task and record its end,
the same records Celery writes (``test_task_records_split.py``: another Redis), published
to a waiting producer, and nothing written over a stored SUCCESS.
"""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace

import pytest
import redis
from celery import states
from support.polling import wait_until
from support.records import QA, Written, backend_writes, check_records, held_run
from support.worker import DspexWorker, mark

from dspex_tasks.app import PREDICT_TASK, make_celery
from dspex_tasks.client import close_app
from dspex_tasks.errors import DuplicateDelivery
from dspex_tasks.resultbackend import TaskRecords, writes_to
from dspex_tasks.settings import Settings

__all__ = ["backend_writes"]  # a fixture, used by name


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
