"""The HTTP API for tests: a real ``dspex-tasks api`` process, a real Celery worker
(threads pool) and the fake OpenAI-compatible LM (``fake_openai.py``) streaming its
answers word by word, all on one Redis database of their own (``support.dbs``).

Also a small Server-Sent Events reader over httpx, line by line as a browser reads.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fake_openai import FakeOpenAI

from dspex_tasks.gateway.auth import token_digest
from dspex_tasks.settings import Settings
from dspex_tasks.store import SessionStore
from support.dbs import db_url
from support.polling import wait_until
from support.procs import Proc, base_env, start_api, start_worker
from support.redis_server import free_port

__all__ = ["ApiStack", "SseEvent", "api_stack", "read_sse", "wait_healthy"]

#: The fake LM's pace: the first chunk after DELAY_S, then one word every CHUNK_DELAY_S.
DELAY_S = 0.02
CHUNK_DELAY_S = 0.02
#: Small store limits, so size tests need only a few KB.
MAX_VALUE_BYTES = 4096
MAX_BODY_BYTES = 20_000


@dataclass(frozen=True)
class SseEvent:
    id: str | None
    event: str
    data: Any


@dataclass
class ApiStack:
    url: str
    token: str
    store: SessionStore
    fake: FakeOpenAI
    api: Proc
    worker: Proc
    db: int

    def client(self, *, token: str | None = None, timeout_s: float = 10.0) -> httpx.Client:
        """An HTTP client with the stack's bearer token (``token=""``: none)."""
        chosen = self.token if token is None else token
        headers = {"Authorization": f"Bearer {chosen}"} if chosen else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def session(self) -> str:
        sid = f"api-{uuid.uuid4().hex[:10]}"
        self.store.create_session(sid)
        return sid


def wait_healthy(proc: Proc, url: str, timeout_s: float = 30.0) -> None:
    def healthy() -> bool:
        if not proc.alive():
            raise AssertionError(f"the API exited:\n{proc.log()}")
        try:
            return httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, timeout_s, interval=0.1, what="the API's /healthz", diagnose=proc.log)


@contextmanager
def api_stack(redis_url: str, owner: str, log_dir: Path) -> Iterator[ApiStack]:
    """API server + worker + fake LM on the Redis database of ``owner``."""
    url = db_url(redis_url, owner)
    prefix = f"api{uuid.uuid4().hex[:6]}"
    token = f"tok-{uuid.uuid4().hex}"
    with FakeOpenAI(delay_s=DELAY_S, chunk_delay_s=CHUNK_DELAY_S) as fake:
        profiles = {
            "default": {
                "model": "openai/fake-model",
                "api_base": fake.base_url,
                "api_key_env": "DSPEX_TEST_FAKE_KEY",
                "params": {"temperature": 0.0, "max_tokens": 2000},
            }
        }
        env = base_env(
            url,
            prefix,
            DSPEX_LM_PROFILES=json.dumps(profiles),
            DSPEX_TEST_FAKE_KEY="sk-fake",
            DSPEX_MAX_VALUE_BYTES=str(MAX_VALUE_BYTES),
            DSPEX_API_MAX_BODY_BYTES=str(MAX_BODY_BYTES),
            DSPEX_API_TOKENS=token_digest(token),
        )
        port = free_port()
        worker = start_worker(env, log_dir, concurrency=8)
        api = start_api(env, log_dir, port)
        store = SessionStore.from_settings(Settings.from_env(env))
        try:
            worker.wait_log(" ready.", 60)
            base = f"http://127.0.0.1:{port}"
            wait_healthy(api, base)
            yield ApiStack(base, token, store, fake, api, worker, int(url.rsplit("/", 1)[1]))
        finally:
            api.stop()
            worker.stop()
            store.close()


def _parse(block: list[str]) -> SseEvent | None:
    fields: dict[str, str] = {}
    data: list[str] = []
    for line in block:
        if not line or line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        else:
            fields[name] = value
    if not data and "id" not in fields:
        return None  # a keep-alive comment
    return SseEvent(fields.get("id"), fields.get("event", "message"), json.loads("\n".join(data)))


def read_sse(response: httpx.Response) -> Iterator[SseEvent]:
    """The events of an open ``text/event-stream`` response, as they arrive."""
    block: list[str] = []
    for line in response.iter_lines():
        if line:
            block.append(line)
            continue
        event = _parse(block)
        block = []
        if event is not None:
            yield event
