"""The HTTP API through a real server process (``dspex-tasks api`` on uvicorn), a real
threads-pool worker and the fake OpenAI-compatible LM streaming word by word.

Every endpoint, every error code an HTTP request can meet (status and body), auth,
body limits, the SSE streams resumed with ``Last-Event-ID``, and a client that leaves
mid-stream (its Redis reader goes away with it).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from support.api import MAX_BODY_BYTES, MAX_VALUE_BYTES, ApiStack, SseEvent, api_stack, read_sse
from support.dbs import db_url
from support.polling import holds_for, wait_until
from support.procs import ROOT, base_env, start_api, stopping
from support.redis_server import free_port

from dspex_tasks import errors
from dspex_tasks.gateway.errors import STATUS_BY_CODE, status_for

QA = "question -> answer"
FINAL = {"succeeded", "failed", "cancelled", "interrupted", "rolled_back", "rejected"}


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    with api_stack(redis_url, "api", tmp_path_factory.mktemp("api")) as s:
        yield s


@pytest.fixture
def http(stack: ApiStack) -> Iterator[httpx.Client]:
    with stack.client() as c:
        yield c


def error_of(reply: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The error of ``reply``, checked: status, the one body shape, the code."""
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], dict)
    return error


def wait_run(http: httpx.Client, run_id: str, timeout_s: float = 30) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        body: dict[str, Any] = http.get(f"/v1/runs/{run_id}").json()
        return body if body["status"] in FINAL and ("result" in body or "error" in body) else None

    return wait_until(final, timeout_s, interval=0.05, what=f"run {run_id} to end")


def stream_events(
    http: httpx.Client, path: str, headers: dict[str, str] | None = None
) -> list[SseEvent]:
    """A whole stream (the run streams end by themselves)."""
    with http.stream("GET", path, headers=headers or {}) as reply:
        assert reply.status_code == 200, reply.read()
        assert reply.headers["content-type"].startswith("text/event-stream")
        return list(read_sse(reply))


def start(http: httpx.Client, sid: str, **body: Any) -> str:
    reply = http.post(f"/v1/sessions/{sid}/runs", json=body)
    assert reply.status_code == 202, reply.text
    run_id: str = reply.json()["run_id"]
    assert reply.json() == {"run_id": run_id, "session_id": sid}
    assert reply.headers["location"] == f"/v1/runs/{run_id}"
    return run_id


# --- the error table -------------------------------------------------------------------------


def test_every_error_code_has_a_status_and_the_readme_table_agrees() -> None:
    codes = {
        cls.code
        for name in errors.__all__
        if isinstance(cls := getattr(errors, name), type)
        and issubclass(cls, errors.DspexError)
        and "code" in vars(cls)
    }
    assert codes - set(STATUS_BY_CODE) == set(), "a code without an HTTP status"
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", readme, re.MULTILINE))
    assert {code: int(s) for code, s in rows.items()} == dict(STATUS_BY_CODE)
    assert status_for("no_such_code") == 500


# --- health, docs, auth ------------------------------------------------------------------------


def test_health_and_openapi_document_every_error_shape(stack: ApiStack) -> None:
    with stack.client(token="") as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        doc = anonymous.get("/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(doc)  # FastAPI's default 422 body
    assert set(doc["components"]["schemas"]["ErrorBody"]["properties"]) == {"error"}
    paths = doc["paths"]
    expected = {
        "/v1/sessions": {"get", "post"},
        "/v1/sessions/{session_id}": {"get", "delete"},
        "/v1/sessions/{session_id}/variables": {"get", "post"},
        "/v1/sessions/{session_id}/variables/{name}": {"get", "put"},
        "/v1/sessions/{session_id}/variables/{name}/history": {"get"},
        "/v1/sessions/{session_id}/programs": {"get"},
        "/v1/sessions/{session_id}/programs/{program_id}": {"get", "put", "delete"},
        "/v1/sessions/{session_id}/runs": {"get", "post"},
        "/v1/runs/{run_id}": {"get"},
        "/v1/runs/{run_id}/cancel": {"post"},
        "/v1/sessions/{session_id}/events": {"get"},
        "/v1/runs/{run_id}/stream": {"get"},
    }
    for path, methods in expected.items():
        assert set(paths[path]) == methods, path
        for method in methods:
            responses = paths[path][method]["responses"]
            assert {"401", "503"} <= set(responses), (path, method)
            for status, answer in responses.items():
                if status.startswith(("4", "5")):
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, status)
                    for code in re.findall(r"`([a-z_]+)`", answer["description"]):
                        assert status_for(code) == int(status), (path, code)


def test_bearer_tokens(stack: ApiStack) -> None:
    sid = stack.session()
    for token in ("", "wrong-token", stack.token + "x"):
        with stack.client(token=token) as c:
            reply = c.get(f"/v1/sessions/{sid}")
            error_of(reply, 401, "unauthorized")
            assert reply.headers["www-authenticate"].startswith("Bearer")
    basic = httpx.get(
        f"{stack.url}/v1/sessions/{sid}", headers={"Authorization": f"Basic {stack.token}"}
    )
    error_of(basic, 401, "unauthorized")
    # Unauthorized requests are refused before their body is read or the route runs.
    with stack.client(token="") as c:
        error_of(c.post("/v1/sessions", json={"session_id": "nope"}), 401, "unauthorized")
    assert not stack.store.exists("nope")
    with stack.client() as c:
        assert c.get(f"/v1/sessions/{sid}").status_code == 200
    # The token is nowhere in the server's log.
    assert stack.token not in stack.api.log()


def test_redis_down_is_503_store_unavailable(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    env = base_env(dead, "apidown", DSPEX_SOCKET_TIMEOUT_S="0.5")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with stopping(start_api(env, tmp_path, port)) as (api,):

        def answers() -> httpx.Response | None:
            assert api.alive(), api.log()
            try:
                return httpx.get(f"{url}/healthz", timeout=5)
            except httpx.TransportError:
                return None

        error_of(wait_until(answers, 30, what="the API"), 503, "store_unavailable")
        error_of(httpx.get(f"{url}/v1/sessions/s1", timeout=5), 503, "store_unavailable")
        reply = httpx.post(f"{url}/v1/sessions", json={"session_id": "s1"}, timeout=5)
        error_of(reply, 503, "store_unavailable")
        assert "Traceback" not in reply.text


def test_no_tokens_no_bind_beyond_loopback(redis_url: str) -> None:
    env = base_env(db_url(redis_url, "api"), "apibind")
    done = subprocess.run(
        [sys.executable, "-m", "dspex_tasks.cli", "api", "--address", "0.0.0.0", "--port", "1"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "DSPEX_API_TOKENS" in done.stderr and "refusing to listen on 0.0.0.0" in done.stderr


# --- sessions, variables, programs -------------------------------------------------------------


def test_sessions(http: httpx.Client) -> None:
    sid = f"api-{uuid.uuid4().hex[:8]}"
    reply = http.post("/v1/sessions", json={"session_id": sid, "ttl_s": 60, "metadata": {"a": 1}})
    assert reply.status_code == 201, reply.text
    made = reply.json()
    assert made["id"] == sid and made["ttl_s"] == 60 and made["metadata"] == {"a": 1}
    error_of(http.post("/v1/sessions", json={"session_id": sid}), 409, "session_exists")
    error_of(http.post("/v1/sessions", json={"session_id": "a b"}), 422, "invalid_session_id")
    error_of(http.post("/v1/sessions", json={"session_id": "x", "ttl_s": -1}), 422,
             "validation_failed")  # fmt: skip
    assert http.get(f"/v1/sessions/{sid}").json()["usage"]["calls"] == 0
    assert sid in http.get("/v1/sessions").json()["sessions"]
    random_id = http.post("/v1/sessions", json={}).json()["id"]
    assert random_id.startswith("s-")
    error_of(http.get("/v1/sessions/no-such-session"), 404, "session_not_found")
    error_of(http.get("/v1/sessions/{bad}"), 422, "invalid_session_id")
    # A session past its deadline that no sweep has reached yet: session_expired.
    short = http.post("/v1/sessions", json={"session_id": f"{sid}-short", "ttl_s": 0.05}).json()
    expired = wait_until(
        lambda: (r := http.get(f"/v1/sessions/{short['id']}")).status_code == 404 and r,
        10,
        what="the short session's deadline",
    )
    error_of(expired, 404, "session_expired")  # the read that found it expired deletes it
    error_of(http.get(f"/v1/sessions/{short['id']}"), 404, "session_not_found")
    assert http.delete(f"/v1/sessions/{sid}").json() == {"session_id": sid, "deleted": True}
    assert http.delete(f"/v1/sessions/{sid}").json() == {"session_id": sid, "deleted": False}
    error_of(http.get(f"/v1/sessions/{sid}"), 404, "session_not_found")


def test_variables_with_compare_and_set_and_history(stack: ApiStack, http: httpx.Client) -> None:
    sid = stack.session()
    base = f"/v1/sessions/{sid}/variables"
    body = {"name": "temperature", "type": "float", "value": 0.5, "constraints": {"max": 2}}
    reply = http.post(base, json=body)
    assert reply.status_code == 201, reply.text
    assert reply.json()["version"] == 1 and reply.json()["value"] == 0.5
    error_of(http.post(base, json=body), 409, "variable_exists")
    error_of(http.post(base, json={**body, "name": "x", "type": "quaternion"}), 422, "unknown_type")
    failed = error_of(http.post(base, json={**body, "name": "y", "value": 9}), 422,
                      "validation_failed")  # fmt: skip
    assert failed["details"]["rule"] == "max"
    assert http.put(f"{base}/temperature", json={"value": 0.7}).json()["version"] == 2
    cas = http.put(f"{base}/temperature", json={"value": 0.9, "expected_version": 2})
    assert cas.status_code == 200 and cas.json()["version"] == 3
    conflict = error_of(
        http.put(f"{base}/temperature", json={"value": 1.0, "expected_version": 2}),
        409,
        "version_conflict",
    )
    assert conflict["details"]["current_version"] == 3
    error_of(http.put(f"{base}/temperature", json={"value": "hot"}), 422, "validation_failed")
    got = http.get(f"{base}/temperature").json()
    assert (got["value"], got["version"]) == (0.9, 3)
    error_of(http.get(f"{base}/nope"), 404, "variable_not_found")
    error_of(http.put(f"{base}/nope", json={"value": 1}), 404, "variable_not_found")
    assert [v["name"] for v in http.get(base).json()["variables"]] == ["temperature"]
    history = http.get(f"{base}/temperature/history").json()
    assert [v["version"] for v in history["versions"]] == [3, 2, 1]
    assert [v["value"] for v in history["versions"]] == [0.9, 0.7, 0.5]
    assert len(http.get(f"{base}/temperature/history?limit=1").json()["versions"]) == 1
    error_of(http.get(f"{base}/temperature/history?limit=0"), 422, "invalid_inputs")
    error_of(http.get("/v1/sessions/no-such-session/variables"), 404, "session_not_found")


def test_programs(stack: ApiStack, http: httpx.Client) -> None:
    sid = stack.session()
    base = f"/v1/sessions/{sid}/programs"
    reply = http.put(f"{base}/qa", json={"module": "predict", "signature": QA})
    assert reply.status_code == 200, reply.text
    spec = reply.json()["spec"]
    assert spec["module"] == "predict" and isinstance(spec["signature"], dict)  # normalized
    assert http.get(f"{base}/qa").json() == {"program_id": "qa", "spec": spec}
    assert http.get(base).json() == {"programs": ["qa"]}
    bad = http.put(f"{base}/bad", json={"module": "predict", "signature": "no arrow"})
    error_of(bad, 422, "invalid_program")
    error_of(http.get(f"{base}/missing"), 404, "program_not_found")
    assert http.delete(f"{base}/qa").json() == {"program_id": "qa", "deleted": True}
    error_of(http.get(f"{base}/qa"), 404, "program_not_found")


# --- request shape, size, routing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"name": "v", "type": "float"}, "value"),  # missing
        ({"name": 5, "type": "float", "value": 1}, "name"),  # wrong JSON type
        ({"name": "v", "type": "float", "value": 1, "colour": "red"}, "colour"),  # unknown
        ({"name": "v", "type": "float", "value": 1, "history": "3"}, "history"),  # no coercion
    ],
)
def test_request_shape_errors_keep_the_python_code(
    stack: ApiStack, http: httpx.Client, body: dict[str, Any], where: str
) -> None:
    sid = stack.session()
    error = error_of(http.post(f"/v1/sessions/{sid}/variables", json=body), 422, "invalid_inputs")
    assert [where] in [p["loc"][1:] for p in error["details"]["problems"]], error
    assert where in error["message"]


def test_malformed_json_and_routing_errors(stack: ApiStack, http: httpx.Client) -> None:
    sid = stack.session()
    reply = http.post(
        f"/v1/sessions/{sid}/variables",
        content=b'{"name": ',
        headers={"Content-Type": "application/json"},
    )
    error_of(reply, 422, "invalid_inputs")
    error_of(http.get("/v1/no/such/route"), 404, "not_found")
    error_of(http.patch(f"/v1/sessions/{sid}"), 405, "method_not_allowed")


def test_body_limits(stack: ApiStack, http: httpx.Client) -> None:
    sid = stack.session()
    url = f"/v1/sessions/{sid}/variables"
    big = {"name": "blob", "type": "string", "value": "x" * (MAX_BODY_BYTES + 1)}
    error = error_of(http.post(url, json=big), 413, "payload_too_large")
    assert error["details"]["limit_bytes"] == MAX_BODY_BYTES

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        yield b'{"name": "blob", "type": "string", "value": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}'

    chunked = http.post(url, content=chunks(), headers={"Content-Type": "application/json"})
    error_of(chunked, 413, "payload_too_large")
    # Within the body limit but over the store's value limit: the store's own 413.
    value = {"name": "blob", "type": "string", "value": "x" * (MAX_VALUE_BYTES + 10)}
    error_of(http.post(url, json=value), 413, "payload_too_large")
    assert http.get(url).json()["variables"] == []
    ok = http.post(url, json={"name": "blob", "type": "string", "value": "x" * 1000})
    assert ok.status_code == 201


# --- runs ----------------------------------------------------------------------------------------


def test_predict_run_streams_tokens_that_make_the_answer(
    stack: ApiStack, http: httpx.Client
) -> None:
    sid = stack.session()
    run_id = start(
        http,
        sid,
        task="predict",
        signature=QA,
        inputs={"question": "WORDS[12] why?"},
        options={"stream": True},
    )
    events = stream_events(http, f"/v1/runs/{run_id}/stream")
    assert events[-1].event == "done"
    body = wait_run(http, run_id)
    assert body["status"] == "succeeded" and body["session_id"] == sid
    assert body["task"] == "dspex.predict"
    result = body["result"]
    assert events[-1].data == result
    answer = result["outputs"]["answer"]
    assert len(answer.split()) == 12
    tokens = [e for e in events if e.event == "token"]
    assert len(tokens) > 1
    assert "".join(e.data["delta"] for e in tokens if e.data["field"] == "answer") == answer
    ids = [e.id for e in events]
    assert None not in ids and len(set(ids)) == len(ids)
    # A run this API did not start (no run index entry) and that has ended is found
    # with its session named.
    stack.store.redis.delete(stack.store.keys.run_session(run_id))
    error_of(http.get(f"/v1/runs/{run_id}"), 404, "run_not_found")
    hinted = http.get(f"/v1/runs/{run_id}", params={"session_id": sid}).json()
    assert hinted["status"] == "succeeded" and hinted["result"] == result
    again = stream_events(http, f"/v1/runs/{run_id}/stream?session_id={sid}")
    assert again == events
    # A session's runs are listed, newest first.
    listed = http.get(f"/v1/sessions/{sid}/runs").json()["runs"]
    assert [r["id"] for r in listed] == [run_id] and listed[0]["status"] == "succeeded"


def test_run_stream_resumes_after_last_event_id(stack: ApiStack, http: httpx.Client) -> None:
    sid = stack.session()
    run_id = start(
        http,
        sid,
        task="chain_of_thought",
        signature=QA,
        inputs={"question": "WORDS[8] why?"},
        options={"stream": True},
    )
    whole = stream_events(http, f"/v1/runs/{run_id}/stream")
    assert {e.event for e in whole} >= {"token", "output", "done"}
    assert {e.data["field"] for e in whole if e.event == "token"} == {"reasoning", "answer"}
    for cut in (1, len(whole) // 2, len(whole) - 1):
        rest = stream_events(
            http, f"/v1/runs/{run_id}/stream", headers={"Last-Event-ID": str(whole[cut - 1].id)}
        )
        assert rest == whole[cut:], cut  # no gap, no duplicate
    # ?after= is the same for a client that cannot set headers; the header wins.
    assert stream_events(http, f"/v1/runs/{run_id}/stream?after={whole[-2].id}") == whole[-1:]
    error_of(
        http.get(f"/v1/runs/{run_id}/stream", headers={"Last-Event-ID": "yesterday"}),
        422,
        "invalid_inputs",
    )


def test_run_request_errors(stack: ApiStack, http: httpx.Client) -> None:
    sid = stack.session()
    url = f"/v1/sessions/{sid}/runs"
    unknown = error_of(http.post(url, json={"task": "teleport", "inputs": {}}), 422,
                       "invalid_inputs")  # fmt: skip
    assert "predict, chain_of_thought, program, compile" in unknown["message"]
    error_of(http.post(url, json={"task": "predict", "inputs": {}}), 422, "invalid_inputs")
    wrong_inputs = {"task": "predict", "signature": QA, "inputs": {"nope": "x"}}
    error_of(http.post(url, json=wrong_inputs), 422, "invalid_inputs")
    bad_signature = {"task": "predict", "signature": "question", "inputs": {"question": "q"}}
    error_of(http.post(url, json=bad_signature), 422, "invalid_program")
    missing = {"task": "program", "program_id": "absent", "inputs": {}}
    error_of(http.post(url, json=missing), 404, "program_not_found")
    gone = {"task": "predict", "signature": QA, "inputs": {"question": "q"}}
    error_of(http.post("/v1/sessions/no-such-session/runs", json=gone), 404, "session_not_found")
    error_of(http.get("/v1/runs/00000000-0000-0000-0000-000000000000"), 404, "run_not_found")
    error_of(http.get("/v1/runs/bad{id}"), 422, "invalid_inputs")
    error_of(http.post("/v1/runs/00000000-0000-0000-0000-000000000000/cancel"), 404,
             "run_not_found")  # fmt: skip
    error_of(http.get("/v1/runs/00000000-0000-0000-0000-000000000000/stream"), 404,
             "run_not_found")  # fmt: skip
    # Nothing was queued by any of these.
    assert http.get(url).json()["runs"] == []


def test_stored_program_run_and_a_failed_run(stack: ApiStack, http: httpx.Client) -> None:
    sid = stack.session()
    http.put(f"/v1/sessions/{sid}/programs/qa", json={"module": "predict", "signature": QA})
    ok = start(http, sid, task="program", program_id="qa", inputs={"question": "MARK[p1] q"})
    body = wait_run(http, ok)
    assert body["status"] == "succeeded" and body["task"] == "dspex.run_program"
    assert body["result"]["outputs"]["answer"] == "answer for MARK[p1]"
    # The fake LM answers 401 to ECHO-AUTH: the run fails with lm_error.
    bad = start(http, sid, task="predict", signature=QA, inputs={"question": "ECHO-AUTH"})
    body = wait_run(http, bad)
    assert body["status"] == "failed" and body["error_code"] == "lm_error"
    assert body["error"]["code"] == "lm_error" and "result" not in body
    assert "sk-fake" not in json.dumps(body)  # the echoed key never reaches the caller
    # The stream of a run that did not stream ends with its error.
    (event,) = stream_events(http, f"/v1/runs/{bad}/stream")
    assert event.event == "error" and event.data["code"] == "lm_error"


def test_busy_session_cancel_and_compile(stack: ApiStack, http: httpx.Client) -> None:
    sid = stack.session()
    slow = {"question": "WORDS[400] take your time"}  # ~8 s of tokens
    # A serialized run (multitask enqueue), so that a later enqueue run waits behind it.
    serial = {"stream": True, "multitask": "enqueue"}
    first = start(http, sid, task="predict", signature=QA, inputs=slow, options=serial)
    with http.stream("GET", f"/v1/runs/{first}/stream") as reply:
        assert next(e for e in read_sse(reply) if e.event == "token")  # it is running
    busy = http.post(
        f"/v1/sessions/{sid}/runs",
        json={"task": "predict", "signature": QA, "inputs": {"question": "q"},
              "options": {"multitask": "reject"}},
    )  # fmt: skip
    error_of(busy, 409, "session_busy")
    # compile goes out by name, through the same admission path: behind the running run
    # (multitask enqueue) it is parked, its message kept until its turn.
    http.put(f"/v1/sessions/{sid}/programs/qa", json={"module": "predict", "signature": QA})
    url = f"/v1/sessions/{sid}/runs"
    trainset = [{"question": "2+2?", "answer": "4"}]
    error_of(http.post(url, json={"task": "compile", "program_id": "qa"}), 422, "invalid_inputs")
    error_of(
        http.post(url, json={"task": "compile", "program_id": "zz", "trainset": trainset}),
        404,
        "program_not_found",
    )
    options = {"metric": "f1", "multitask": "enqueue"}
    compile_id = start(
        http, sid, task="compile", program_id="qa", trainset=trainset, options=options
    )
    run = http.get(f"/v1/runs/{compile_id}").json()
    assert (run["task"], run["status"]) == ("dspex.compile", "queued")
    message = stack.store.sent_task(compile_id)
    assert message is not None and message["task"] == "dspex.compile"
    assert message["args"] == [sid, "qa", trainset, options]
    stopped = http.post(f"/v1/runs/{compile_id}/cancel").json()
    assert stopped["outcome"] == "stopped"  # it never started

    error_of(http.post(f"/v1/runs/{first}/cancel", json={"action": "undo"}), 422,
             "invalid_inputs")  # fmt: skip
    cancel = http.post(f"/v1/runs/{first}/cancel", json={})
    assert cancel.status_code == 202, cancel.text
    assert cancel.json() == {"run_id": first, "session_id": sid, "outcome": "signalled"}
    body = wait_run(http, first)
    assert body["status"] == "cancelled" and body["error"]["code"] == "run_cancelled"
    events = stream_events(http, f"/v1/runs/{first}/stream")
    assert events[-1].event == "error" and events[-1].data["code"] == "run_cancelled"
    again = http.post(f"/v1/runs/{first}/cancel")
    assert again.status_code == 202 and again.json()["outcome"] == "finished"


# --- session events ---------------------------------------------------------------------------


def test_session_events_live_from_now_and_resumable(stack: ApiStack, http: httpx.Client) -> None:
    sid = stack.session()
    stack.store.register_variable(sid, "style", "string", "plain")
    url = f"/v1/sessions/{sid}/events"
    with http.stream("GET", url) as reply:
        assert reply.status_code == 200
        # From now: the registration above is not replayed; a write by another client
        # (the store directly) arrives live.
        stack.store.update_variable(sid, "style", "terse")
        first = next(read_sse(reply))
    assert first.event == "variable.updated"
    assert first.data["name"] == "style" and first.data["value"] == "terse"
    assert first.data["version"] == 2

    everything = []
    with http.stream("GET", f"{url}?after=0") as reply:
        for event in read_sse(reply):
            everything.append(event)
            if event.id == first.id:
                break
    assert [e.event for e in everything] == [
        "session.created",
        "variable.registered",
        "variable.updated",
    ]
    # Resume after the first event: the rest, once each, then what comes next.
    with http.stream("GET", url, headers={"Last-Event-ID": str(everything[0].id)}) as reply:
        events = read_sse(reply)
        assert [next(events), next(events)] == everything[1:]
        stack.store.delete_variable(sid, "style")
        deleted = next(events)
    assert deleted.event == "variable.deleted" and deleted.data["name"] == "style"
    filtered = f"{url}?after=0&types=variable.deleted"
    with http.stream("GET", filtered) as reply:
        assert next(read_sse(reply)) == deleted

    error_of(http.get("/v1/sessions/no-such-session/events"), 404, "session_not_found")
    error_of(http.get(f"{url}?after=soon"), 422, "invalid_inputs")


def test_session_stream_says_when_the_session_goes_away(
    stack: ApiStack, http: httpx.Client
) -> None:
    sid = stack.session()
    with http.stream("GET", f"/v1/sessions/{sid}/events") as reply:
        events = read_sse(reply)
        stack.store.delete_session(sid)
        last = list(events)  # the stream ends by itself
    assert last[-1].event == "error" and last[-1].data["code"] == "session_not_found"
    assert last[-1].id is None  # a reconnecting client resumes after a real event


def _stream_readers(raw: redis.Redis, db: int) -> int:
    """Redis connections of database ``db`` whose last command was a stream read: one
    per SSE client the server is serving (a live reader is nearly always in XREAD)."""
    return sum(
        1 for c in raw.client_list() if int(c["db"]) == db and c["cmd"] in {"xread", "xrange"}
    )


def test_a_client_leaving_mid_stream_frees_its_reader(
    stack: ApiStack, http: httpx.Client, redis_url: str
) -> None:
    sid = stack.session()
    raw = redis.Redis.from_url(redis_url)
    try:
        # Streams of earlier tests have ended: none is being read now.
        wait_until(lambda: _stream_readers(raw, stack.db) == 0, 10, what="no reader at start")
        long_run = start(
            http,
            sid,
            task="predict",
            signature=QA,
            inputs={"question": "WORDS[300] long"},
            options={"stream": True},
        )
        for path in (f"/v1/sessions/{sid}/events", f"/v1/runs/{long_run}/stream"):
            with http.stream("GET", path) as reply:
                assert reply.status_code == 200
                wait_until(lambda: _stream_readers(raw, stack.db) == 1, 10, what="the reader")
            # The client hung up: the server's reader and its connection go away, and
            # stay away (a live reader would be back in XREAD within its 1 s block).
            wait_until(lambda: _stream_readers(raw, stack.db) == 0, 10, what="no reader")
            holds_for(lambda: _stream_readers(raw, stack.db) == 0, 2.5, what="no reader")
        http.post(f"/v1/runs/{long_run}/cancel")
    finally:
        raw.close()
    assert stack.api.alive()


# --- CORS (in-process: no request reaches Redis) ---------------------------------------------


@pytest.mark.parametrize("origins", ["", "https://app.example"])
def test_cors_is_off_unless_configured(redis_url: str, origins: str) -> None:
    from fastapi.testclient import TestClient

    from dspex_tasks.client import Client
    from dspex_tasks.gateway import create_app
    from dspex_tasks.settings import Settings

    settings = Settings.from_env(
        {"DSPEX_REDIS_URL": db_url(redis_url, "api"), "DSPEX_API_CORS_ORIGINS": origins}
    )
    with Client(settings=settings) as client, TestClient(create_app(settings, client=client)) as c:
        preflight = c.options(
            "/v1/sessions",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        other = c.options(
            "/v1/sessions",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
    allowed = preflight.headers.get("access-control-allow-origin")
    assert allowed == (origins or None)
    assert "access-control-allow-origin" not in other.headers
    if origins:
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
