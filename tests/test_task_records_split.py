"""A task's records when Celery's result backend is another Redis database than the
store's: the backend writes STARTED and SUCCESS itself, as Celery does, and a producer
sees the same records as when the store writes them (``test_task_records.py``).

A module of its own, so that its worker never runs beside the ``dspex`` fixture's:
Celery's in-process test workers share process-wide shutdown flags
(``celery.worker.state``), and the two together once failed to stop in time.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celery import Celery, states
from support.dbs import db_url
from support.records import Written, backend_writes, check_records, held_run
from support.worker import Recorder, in_process_worker, recording_lms, worker_app

from dspex_tasks.app import make_celery
from dspex_tasks.client import close_app
from dspex_tasks.resultbackend import writes_to
from dspex_tasks.settings import Settings
from dspex_tasks.store import SessionStore

__all__ = ["backend_writes"]  # a fixture, used by name


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
