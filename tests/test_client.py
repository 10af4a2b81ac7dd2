"""The producer Client against a real Redis and a real Celery worker (echo LM)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from support.dbs import db_url
from support.polling import wait_until
from support.worker import close_app, in_process_worker, worker_app

from dspex_tasks import Client
from dspex_tasks.errors import (
    InvalidInputs,
    InvalidProgram,
    ProgramNotFound,
    SessionNotFound,
    UnknownLMProfile,
    ValidationFailed,
    VariableNotFound,
    VersionConflict,
)
from dspex_tasks.settings import Settings

ECHO = '{"default": {"model": "dspex/echo"}}'


def _settings(url: str, prefix: str) -> Settings:
    return Settings.from_env(environ={"DSPEX_LM_PROFILES": ECHO}, redis_url=url, key_prefix=prefix)


@pytest.fixture(scope="module")
def worker_url(redis_url: str) -> Iterator[str]:
    """A real threads-pool worker consuming this module's db of the test server."""
    url = db_url(redis_url, "client")
    app, runtime = worker_app(_settings(url, "client"))
    try:
        with in_process_worker(app):
            yield url
    finally:
        close_app(app)
        runtime.store.close()


@pytest.fixture
def client(worker_url: str) -> Iterator[Client]:
    with Client(settings=_settings(worker_url, "client")) as c:
        yield c


@pytest.fixture
def idle_client(redis_url: str) -> Iterator[Client]:
    """A client whose broker (its own db) no worker consumes: what it enqueues stays queued."""
    url = db_url(redis_url, "client.idle")
    with Client(settings=_settings(url, f"idle{uuid.uuid4().hex[:6]}")) as c:
        c.store.redis.delete("dspex")
        yield c


def _sid() -> str:
    return f"c-{uuid.uuid4().hex[:10]}"


def test_sessions_create_get_list_delete(client: Client) -> None:
    s = client.create_session(_sid(), ttl_s=60, metadata={"user": 42})
    assert client.session(s.id).info().metadata == {"user": 42}
    assert s.id in client.list_sessions()
    assert client.delete_session(s.id) is True
    assert client.delete_session(s.id) is False
    with pytest.raises(SessionNotFound) as err:
        client.session(s.id)
    assert err.value.code == "session_not_found"
    generated = client.create_session()
    assert generated.id.startswith("s-") and client.stats()["sessions"] >= 1


def test_variables_through_the_handle(client: Client) -> None:
    s = client.create_session(_sid())
    v = s.register_variable("temperature", "float", 0.7, constraints={"min": 0, "max": 2})
    assert v.version == 1 and s.get("temperature") == 0.7
    assert s.set("temperature", 0.2, expected_version=1).version == 2
    with pytest.raises(VersionConflict) as conflict:
        s.set("temperature", 0.3, expected_version=1)
    assert conflict.value.code == "version_conflict"
    with pytest.raises(ValidationFailed):
        s["temperature"] = 9
    assert s["temperature"] == 0.2
    s.register_variable("style", "choice", "short", constraints={"choices": ["short", "long"]})
    result = s.update_variables({"temperature": 1.0, "style": "long"})
    assert {k: v.value for k, v in result.items()} == {"temperature": 1.0, "style": "long"}
    assert list(s) == ["temperature", "style"] and len(s) == 2
    assert "style" in s and "nope" not in s
    assert s.get("nope", "fallback") == "fallback"
    del s["style"]
    with pytest.raises(VariableNotFound):
        s.variable("style")
    assert list(s.variables()) == ["temperature"]


def test_predict_and_cot_return_outputs(client: Client) -> None:
    s = client.create_session(_sid())
    h = s.predict("question -> answer: int", question="how many?")
    result = h.get_result(timeout=30)
    assert set(result) == {"session_id", "outputs", "lm", "duration_ms"}
    assert result["session_id"] == s.id and result["lm"]["model"] == "dspex/echo"
    assert isinstance(result["outputs"]["answer"], int)
    assert h.ready() and h.status == "SUCCESS"
    cot = s.chain_of_thought("question -> answer", question="why?").get(timeout=30)
    assert set(cot) == {"reasoning", "answer"} and cot["answer"].startswith("echo answer")


def test_programs_and_store_outputs(client: Client) -> None:
    s = client.create_session(_sid())
    s.create_program("qa", "predict", "question -> answer: int")
    assert s.list_programs() == ["qa"]
    s.register_variable("answer", "integer", 0)
    out = s.run_program("qa", question="q", options={"store_outputs": ["answer"]}).get(timeout=30)
    assert s.variable("answer").value == out["answer"]
    assert s.variable("answer").version == 2


def test_producer_errors_raise_before_enqueue(idle_client: Client) -> None:
    s = idle_client.create_session(_sid())
    broker = idle_client.store.redis
    cases = [
        (InvalidProgram, lambda: s.predict("no arrow here", question="x")),
        (InvalidInputs, lambda: s.predict("question -> answer", query="x")),
        (InvalidInputs, lambda: s.predict("n: int -> answer", n="three")),
        (InvalidInputs, lambda: s.predict("q -> a", q="x", options={"store_outputs": ["b"]})),
        (ProgramNotFound, lambda: s.run_program("missing", q="x")),
        (SessionNotFound, lambda: idle_client.submit("predict", "ghost", "q -> a", {"q": "x"})),
    ]
    for cls, call in cases:
        with pytest.raises(cls) as err:
            call()
        assert err.value.code == cls.code
    assert broker.llen("dspex") == 0  # nothing was enqueued


def test_worker_errors_keep_class_and_code(client: Client) -> None:
    s = client.create_session(_sid())
    s.configure_lm(profile="nonexistent", temperature=0.1)
    h = s.predict("question -> answer", question="x")
    with pytest.raises(UnknownLMProfile) as err:
        h.get(timeout=30)
    assert err.value.code == "unknown_lm_profile" and "nonexistent" in str(err.value)


def test_async_wait_does_not_block_the_event_loop(client: Client, idle_client: Client) -> None:
    s = client.create_session(_sid())
    # A task no worker will run keeps the wait going for its whole timeout.
    stuck = idle_client.create_session(_sid()).predict("question -> answer", question="x")

    async def scenario() -> tuple[list[object], int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        tick_task = asyncio.create_task(ticker())
        handles = [s.predict("question -> answer", question=f"q{i}") for i in range(5)]
        waits = [h.wait(timeout=30) for h in handles] + [stuck.wait(timeout=0.4)]
        outs = await asyncio.gather(*waits, return_exceptions=True)
        stop.set()
        await tick_task
        return list(outs), ticks

    outs, ticks = asyncio.run(scenario())
    assert all(isinstance(o, dict) and "answer" in o for o in outs[:5])
    assert isinstance(outs[5], TimeoutError)
    # 0.4 s of waiting at 5 ms per tick: a blocked loop would manage a handful at most.
    assert ticks >= 30


def test_async_wait_times_out(idle_client: Client) -> None:
    s = idle_client.create_session(_sid())
    h = s.predict("question -> answer", question="never runs")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        asyncio.run(h.wait(timeout=0.3))
    assert time.monotonic() - started < 2
    with pytest.raises(TimeoutError):
        h.get(timeout=0.2)


def test_submit_batch_collects_every_result(client: Client) -> None:
    sessions = [client.create_session(_sid()) for _ in range(3)]
    sessions[0].create_program("qa", "chain_of_thought", "question -> answer")
    requests = [
        {
            "task": "predict",
            "session_id": s.id,
            "signature": "question -> answer",
            "inputs": {"question": f"q{i}"},
        }
        for i, s in enumerate(sessions * 6)
    ]
    requests.append(
        {
            "task": "run_program",
            "session_id": sessions[0].id,
            "program_id": "qa",
            "inputs": {"question": "stored"},
        }
    )
    batch = client.submit_batch(requests)
    results = batch.results(timeout=60)
    assert len(batch) == 19 and batch.completed_count() == 19 and batch.ready()
    assert all(isinstance(r, dict) for r in results)
    assert [r["session_id"] for r in results if isinstance(r, dict)] == [
        r["session_id"] for r in requests
    ]
    assert "reasoning" in results[-1]["outputs"]  # type: ignore[index]


def test_submit_batch_validates_every_request_first(idle_client: Client) -> None:
    s = idle_client.create_session(_sid())
    good = {"session_id": s.id, "signature": "q -> a", "inputs": {"q": "x"}}
    bad = {"session_id": s.id, "signature": "q -> a", "inputs": {}}
    with pytest.raises(InvalidInputs) as err:
        idle_client.submit_batch([good, good, bad])
    assert err.value.details["request_index"] == 2
    assert idle_client.store.redis.llen("dspex") == 0


def test_revoke_before_it_runs(client: Client) -> None:
    s = client.create_session(_sid())
    from dspex_tasks.client import TaskHandle

    result = client.app.send_task(
        "dspex.predict", args=[s.id, "question -> answer", {"question": "x"}], countdown=1.5
    )
    handle = TaskHandle(result)
    handle.revoke()
    wait_until(lambda: handle.status == "REVOKED", 10, what="the task to be revoked")


def _subscribes(raw: redis.Redis) -> int:
    stats = raw.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("subscribe", "ssubscribe")
    )


def test_sending_subscribes_to_no_result_and_waiting_misses_none(client: Client) -> None:
    """Celery would subscribe to each sent task's result channel and drop it at once;
    the Client subscribes only when it waits, and a result stored before that still
    reaches it."""
    raw = client.store.redis
    s = client.create_session(_sid())
    before = _subscribes(raw)
    handles = [s.predict("question -> answer", question=f"q{i}") for i in range(5)]
    assert _subscribes(raw) == before
    # Every result is stored before anyone waits: each get() still answers at once.
    wait_until(lambda: all(h._result.ready() for h in handles), 30, what="the results")
    for i, h in enumerate(handles):
        assert h.get(timeout=5)["answer"] == f"echo answer: q{i}"


def test_client_module_does_not_import_dspy() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import dspex_tasks; from dspex_tasks import Client; "
        "print('dspy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
