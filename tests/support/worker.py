"""A real Celery worker (threads pool) over a real Redis, with recording fake LMs.

``tests/conftest.py`` lists this module in ``pytest_plugins``: a test asks for the
``dspex`` fixture by name. The worker is module scoped and keeps its broker, result
backend and store in its own Redis database (``support.dbs``, owner ``"worker"``) under
its own key prefix, so the per-test ``redis_client`` fixture (FLUSHDB of db 0) never
pulls its queue away.

:func:`in_process_worker` is the one way tests run a Celery worker inside the test
process (threads pool, no ping check); :func:`close_app` closes a producer or worker
app the way ``Client.close()`` does, so no socket is left for the garbage collector.

The fake LM is a ``dspy.LM(..., engine=RecordingEngine(...))``: every call is recorded
(profile, the request's temperature / max_tokens / top_p, output fields, messages) and
attributed to the ``MARK[...]`` token found in the last user message, so concurrent tasks
can be told apart. Answers are in ChatAdapter format; per-marker scripts can replace the
default answer, sleep, or raise.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import dspy
import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from dspy.lm15 import (
    Response,
    StreamDeltaEvent,
    StreamStartEvent,
    TextDelta,
)

from dspex_tasks.app import make_celery
from dspex_tasks.client import close_app
from dspex_tasks.errors import DspexError
from dspex_tasks.lm import LMRegistry
from dspex_tasks.lm.engines.chat_format import chat_sections, output_fields
from dspex_tasks.lm.engines.chunked import pieces, response_events, text_response
from dspex_tasks.runtime import Runtime
from dspex_tasks.settings import Settings
from dspex_tasks.store import SessionStore
from dspex_tasks.tasks import register_tasks
from support.dbs import db_url

__all__ = [
    "PROFILE_PARAMS",
    "Call",
    "DspexWorker",
    "FailAfter",
    "RateLimitError",
    "Recorder",
    "RecordingEngine",
    "close_app",
    "default_answer",
    "dspex",
    "in_process_worker",
    "mark",
    "recording_lms",
    "worker_app",
]

#: Small limits so payload tests need only a few KB (every other test stays far below).
MAX_INPUTS_BYTES = 4096
MAX_RESULT_BYTES = 16384
#: Base params of the installed profiles (what a session sees with no LM settings).
PROFILE_PARAMS: Mapping[str, Mapping[str, Any]] = {
    "default": {"temperature": 0.0, "max_tokens": 1000},
    "alt": {"temperature": 0.5, "max_tokens": 500},
}
#: Usage every fake call reports.
PROMPT_TOKENS = 11
COMPLETION_TOKENS = 7

_MARK = re.compile(r"MARK\[([A-Za-z0-9_.:@#-]+)\]")


def mark() -> str:
    """A fresh marker token; put ``MARK[<token>]`` in a question to attribute its calls."""
    return uuid.uuid4().hex[:12]


class RateLimitError(Exception):
    """What a provider client raises when throttled (matched by name, like litellm's)."""


@dataclass(frozen=True)
class Call:
    """One LM request as the fake LM saw it."""

    profile: str
    model: str
    marker: str | None
    temperature: float | None
    max_tokens: int | None
    top_p: float | None
    #: ``[(name, type_text)]`` of the output fields the adapter asked for.
    fields: tuple[tuple[str, str], ...]
    #: The last user message (the actual inputs, after any demos).
    user: str
    #: Every message, ``role: text``, joined: demos and trajectories show up here.
    transcript: str

    @property
    def field_names(self) -> list[str]:
        return [name for name, _ in self.fields]


Responder = Callable[[Call], Mapping[str, str]]


def _default_value(name: str, type_text: str, marker: str | None) -> str:
    literal = re.fullmatch(r"Literal\[(.*)\]", type_text.strip())
    if literal:
        return literal.group(1).split(",")[0].strip().strip("'\"")
    if type_text == "float":
        return "0.25"
    if type_text == "int":
        return "3"
    if type_text == "bool":
        return "True"
    if type_text.startswith("list"):
        return '["x"]'
    if type_text.startswith("dict"):
        return "{}"
    return f"{name} for {marker}"


def default_answer(call: Call) -> dict[str, str]:
    """The answer the fake LM gives unless scripted: ``"<field> for <marker>"`` for str
    fields, fixed values for typed ones (float 0.25, int 3, bool True, first choice)."""
    return {name: _default_value(name, type_text, call.marker) for name, type_text in call.fields}


def react_capital_steps(call: Call) -> dict[str, str] | None:
    """ReAct's tool steps for a question about France's capital: look it up with the
    ``capital_lookup`` tool, then finish. None for the extract step, which answers from
    the observation (``observation_of``) as the test wants."""
    if "next_tool_name" not in call.field_names:
        return None
    if "observation_0" not in call.user:
        return {
            "next_thought": "I should look up the capital.",
            "next_tool_name": "capital_lookup",
            "next_tool_args": json.dumps({"country": "France"}),
        }
    return {"next_thought": "I know it now.", "next_tool_name": "finish", "next_tool_args": "{}"}


def observation_of(call: Call) -> str:
    """The first word the tool observed, as ReAct's extract step shows it."""
    return call.user.split("[[ ## observation_0 ## ]]")[1].split()[0]


@dataclass
class Recorder:
    """Thread-safe store of calls and per-marker scripts, shared by every fake engine."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _calls: list[Call] = field(default_factory=list)
    _scripts: dict[str, Responder] = field(default_factory=dict)
    _inflight: int = 0
    max_inflight: int = 0

    def script(self, marker: str, responder: Responder) -> None:
        """Answer calls carrying ``marker`` with ``responder(call)`` (it may raise)."""
        with self._lock:
            self._scripts[marker] = responder

    def responder(self, marker: str | None) -> Responder:
        with self._lock:
            return self._scripts.get(marker or "", default_answer)

    def calls(self, marker: str) -> list[Call]:
        with self._lock:
            return [c for c in self._calls if c.marker == marker]

    def count(self) -> int:
        """Every call recorded so far, whatever its marker."""
        with self._lock:
            return len(self._calls)

    def reset_max_inflight(self) -> None:
        with self._lock:
            self.max_inflight = self._inflight

    def enter(self, call: Call) -> None:
        with self._lock:
            self._calls.append(call)
            self._inflight += 1
            self.max_inflight = max(self.max_inflight, self._inflight)

    def leave(self) -> None:
        with self._lock:
            self._inflight -= 1


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return "".join(getattr(p, "text", "") or "" for p in value)


class FailAfter(Exception):
    """Raised by a responder: stream ``pieces`` of ``text``, then fail with ``error``
    (once ``hold`` is set, if given: a stream that stalls mid-answer)."""

    def __init__(
        self,
        text: str,
        pieces: int,
        error: BaseException,
        hold: threading.Event | None = None,
    ) -> None:
        super().__init__(text)
        self.text, self.pieces, self.error, self.hold = text, pieces, error, hold


def _failing(fail: FailAfter) -> Iterator[Any]:
    yield StreamStartEvent(id=None, model="test")
    for piece in pieces(fail.text)[: fail.pieces]:
        yield StreamDeltaEvent(delta=TextDelta(text=piece, part_index=0))
    if fail.hold is not None:  # the answer stalls until the test lets it fail
        fail.hold.wait(60)
    raise fail.error


class RecordingEngine:
    """A DSPy engine (``complete(Request) -> Response``) that records and answers."""

    def __init__(self, profile: str, recorder: Recorder) -> None:
        self.profile = profile
        self.model = f"test/{profile}"
        self.recorder = recorder

    def complete(self, request: Any) -> Response:
        system = _text(request.system)
        messages = [(m.role, m.text or "") for m in request.messages]
        users = [text for role, text in messages if role == "user"]
        user = users[-1] if users else ""
        found = _MARK.search(user)
        config = request.config
        call = Call(
            profile=self.profile,
            model=self.model,
            marker=found.group(1) if found else None,
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            top_p=config.top_p,
            fields=tuple(output_fields(system)),
            user=user,
            transcript="\n".join(f"{role}: {text}" for role, text in messages),
        )
        self.recorder.enter(call)
        try:
            values = self.recorder.responder(call.marker)(call)
        finally:
            self.recorder.leave()
        text = chat_sections((k, str(v)) for k, v in values.items())
        return text_response(self.model, text, PROMPT_TOKENS, COMPLETION_TOKENS)

    def stream(self, request: Any) -> Any:
        """The answer word by word; a responder may raise ``FailAfter(n)`` to fail the
        stream after ``n`` pieces (a connection lost mid-answer)."""
        try:
            return iter(list(response_events(self.complete(request))))
        except FailAfter as fail:
            return _failing(fail)

    def close(self) -> None:
        return None


@dataclass
class DspexWorker:
    """Handles to the running worker: its URL, store, producer app and the LM recorder."""

    url: str
    prefix: str
    settings: Settings
    app: Celery
    producer: Celery
    runtime: Runtime
    store: SessionStore
    recorder: Recorder

    def session(self, *, ttl_s: float | None = None) -> str:
        """A fresh session id, created in the store."""
        sid = f"tt-{uuid.uuid4().hex[:12]}"
        self.store.create_session(sid, ttl_s=ttl_s)
        return sid

    def send(self, task: str, *args: Any, **kwargs: Any) -> Any:
        """Send ``task`` by name from the producer app (no client-side validation)."""
        return self.producer.send_task(task, args=list(args), kwargs=kwargs)

    def run(self, task: str, *args: Any, timeout: float = 20, **kwargs: Any) -> dict[str, Any]:
        """Send by name and wait for the result JSON."""
        result: dict[str, Any] = self.send(task, *args, **kwargs).get(timeout=timeout)
        return result

    def failure(self, task: str, *args: Any, timeout: float = 20, **kwargs: Any) -> DspexError:
        """Send by name; the task must fail with a DspexError, which is returned."""
        handle = self.send(task, *args, **kwargs)
        with pytest.raises(DspexError) as info:
            handle.get(timeout=timeout)
        return info.value

    def session_keys_exist(self, sid: str) -> bool:
        """Whether any key or index entry of ``sid`` is still in Redis (no lazy expiry)."""
        r = self.store.redis
        return bool(
            r.exists(*self.store.keys.session_keys(sid))
            or r.zscore(self.store.keys.sessions, sid) is not None
        )


def recording_lms(recorder: Recorder) -> LMRegistry:
    """The profiles of :data:`PROFILE_PARAMS`, each a :class:`RecordingEngine` on
    ``recorder``."""
    lms = LMRegistry({})
    for name, params in PROFILE_PARAMS.items():
        engine = RecordingEngine(name, recorder)
        lms.install(name, dspy.LM(engine.model, engine=engine, cache=False, **params))
    return lms


@pytest.fixture(scope="module")
def dspex(redis_url: str) -> Iterator[DspexWorker]:
    """A real threads-pool worker (concurrency 8) on its own db with recording LM profiles.

    Profiles: ``default`` (test/default, temperature 0.0, max_tokens 1000) and ``alt``
    (test/alt, temperature 0.5, max_tokens 500). Inputs over 4 KB and results over
    16 KB are refused.
    """
    url = db_url(redis_url, "worker")
    prefix = f"w{uuid.uuid4().hex[:8]}"
    environ = {
        "DSPEX_MAX_INPUTS_BYTES": str(MAX_INPUTS_BYTES),
        "DSPEX_MAX_RESULT_BYTES": str(MAX_RESULT_BYTES),
    }
    settings = Settings.from_env(environ=environ, redis_url=url, key_prefix=prefix)
    recorder = Recorder()
    lms = recording_lms(recorder)
    store = SessionStore.from_settings(settings)
    # This db belongs to this fixture alone: start from an empty broker and store.
    store.redis.flushdb()
    app, runtime = worker_app(settings, lms=lms)
    producer = make_celery(settings)
    try:
        with in_process_worker(app, concurrency=8, shutdown_timeout=15):
            yield DspexWorker(url, prefix, settings, app, producer, runtime, store, recorder)
    finally:
        # Results caught in exception/traceback cycles are finalized here, while Redis is
        # up: an AsyncResult's __del__ unsubscribes, and at interpreter exit (server gone)
        # that would retry its connection for ~20 s.
        gc.collect()
        close_app(producer)
        close_app(app)
        runtime.store.close()
        store.redis.flushdb()
        store.close()


# --- in-process workers -------------------------------------------------------------------


@contextlib.contextmanager
def in_process_worker(app: Celery, **options: Any) -> Iterator[Any]:
    """Run a real Celery worker for ``app`` in this process (threads pool, concurrency 4,
    no ping check, WARNING logs); ``options`` override or extend ``start_worker``'s."""
    kwargs: dict[str, Any] = {
        "pool": "threads",
        "concurrency": 4,
        "perform_ping_check": False,
        "loglevel": "WARNING",
        **options,
    }
    with start_worker(app, **kwargs) as worker:
        yield worker


def worker_app(settings: Settings, **runtime: Any) -> tuple[Celery, Runtime]:
    """A worker app with the dspex tasks registered on ``Runtime(settings, **runtime)``.

    Close both when done: ``close_app(app)`` and ``runtime.store.close()``.
    """
    app = make_celery(settings)
    rt = Runtime(settings, **runtime)
    register_tasks(app, lambda: rt)
    return app, rt
