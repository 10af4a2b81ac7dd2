"""Watching a task's records in Celery's result backend (``tests/test_task_records*.py``)."""

from __future__ import annotations

import json
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from celery import Celery, states

from dspex_tasks.app import PREDICT_TASK
from dspex_tasks.resultbackend import OneTripRedisBackend
from dspex_tasks.store import SessionStore
from support.worker import Call, Recorder, default_answer, mark

__all__ = ["QA", "HeldRun", "Written", "backend_writes", "check_records", "held_run"]

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
