"""The producer API. Imports Celery and redis-py only, never DSPy.

State operations (sessions, variables, programs) go straight to the SessionStore: no
queue round trip. LM work is enqueued by task name and answered through a
:class:`TaskHandle`. Everything a producer can get wrong (unknown session, a bad
variable value, a malformed signature, inputs that do not fit it) is raised here,
before anything is enqueued.

    client = Client.from_env()
    s = client.create_session("user-42", ttl_s=3600)
    s.register_variable("temperature", "float", 0.7, constraints={"min": 0, "max": 2})
    h = s.chain_of_thought("question -> answer", question="Why is the sky blue?")
    h.get(timeout=60)     # {"reasoning": ..., "answer": ...}
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

from celery import Celery

from dspex_tasks import handoff
from dspex_tasks.app import COMPILE_TASK, COT_TASK, PREDICT_TASK, RUN_PROGRAM_TASK, make_celery
from dspex_tasks.compile_client import compile_args
from dspex_tasks.errors import DspexError, InvalidInputs, PayloadTooLarge, RunNotFound
from dspex_tasks.handles import BatchHandle, TaskHandle, cancel_run, close_app
from dspex_tasks.program_handles import ProgramsHandle
from dspex_tasks.settings import Settings
from dspex_tasks.specs import check_inputs, check_options, inputs_json, normalize_spec
from dspex_tasks.store import (
    Event,
    Run,
    Session,
    SessionStore,
    StreamEvent,
    Variable,
    VariableVersion,
)
from dspex_tasks.store.scripts import Status

__all__ = [
    "BatchHandle",
    "Client",
    "SessionHandle",
    "StreamEvent",
    "TaskHandle",
    "close_app",
]

_MISSING: Any = object()
_TASK_BY_KIND = {"predict": PREDICT_TASK, "chain_of_thought": COT_TASK}


class SessionHandle(ProgramsHandle):
    """One session's state and tasks. Mapping-style access reads and writes values."""

    def __init__(self, client: Client, session_id: str) -> None:
        self._client = client
        self._store = client.store
        self.id = session_id

    def __repr__(self) -> str:
        return f"SessionHandle(id={self.id!r})"

    # --- session ---------------------------------------------------------------------

    def info(self) -> Session:
        return self._store.get_session(self.id)

    def touch(self) -> Session:
        return self._store.touch(self.id)

    def delete(self) -> bool:
        return self._store.delete_session(self.id)

    def configure_lm(self, profile: str = "default", **params: Any) -> Session:
        """Choose the worker LM profile and safe params (temperature, max_tokens, ...)."""
        return self._store.set_session_lm(self.id, profile=profile, **params)

    def usage(self) -> dict[str, int]:
        """The LM usage of the session's runs: prompt_tokens, completion_tokens, calls,
        cached_calls."""
        return self._store.usage(self.id)

    def set_budget(self, max_tokens_total: int | None) -> Session:
        """A token budget for the session's runs (None: none); see ``store.set_budget``."""
        return self._store.set_budget(self.id, max_tokens_total)

    # --- variables -------------------------------------------------------------------

    def register_variable(
        self,
        name: str,
        type: str,
        value: Any,
        *,
        constraints: Mapping[str, Any] | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        history: int | None = None,
    ) -> Variable:
        return self._store.register_variable(
            self.id,
            name,
            type,
            value,
            constraints=constraints,
            description=description,
            metadata=metadata,
            history=history,
        )

    def variable(self, name: str) -> Variable:
        return self._store.get_variable(self.id, name)

    def history(self, name: str, *, limit: int | None = None) -> list[VariableVersion]:
        """The kept versions of a variable, newest first."""
        return self._store.variable_history(self.id, name, limit=limit)

    def rollback(self, name: str, version: int, *, expected_version: int | None = None) -> Variable:
        """Write the value ``name`` had at ``version`` as a new version."""
        return self._store.rollback_variable(
            self.id, name, version, expected_version=expected_version
        )

    # --- events, snapshot, restore -------------------------------------------------

    def events(
        self, *, after: str = "0", types: Collection[str] | None = None, limit: int = 100
    ) -> list[Event]:
        """The session's events after the id ``after``, oldest first."""
        return self._store.events(self.id, after=after, types=types, limit=limit)

    def watch(
        self,
        *,
        names: Collection[str] | None = None,
        types: Collection[str] | None = None,
        after: str = "$",
        block_s: float | None = None,
    ) -> Iterator[Event]:
        """Events as they happen; resume with ``after=<last id seen>``."""
        return self._store.watch(self.id, names=names, types=types, after=after, block_s=block_s)

    def awatch(
        self,
        *,
        names: Collection[str] | None = None,
        types: Collection[str] | None = None,
        after: str = "$",
        block_s: float | None = None,
    ) -> AsyncIterator[Event]:
        """The asyncio twin of :meth:`watch`."""
        return self._store.awatch(self.id, names=names, types=types, after=after, block_s=block_s)

    def snapshot(self) -> dict[str, Any]:
        """Variables, programs and LM settings as one JSON document (for :meth:`restore`)."""
        return self._store.snapshot(self.id)

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        """Back to a snapshot's state, all or nothing; versions keep growing."""
        self._store.restore(self.id, snapshot)

    def get(self, name: str, default: Any = _MISSING) -> Any:
        """A variable's value (``default`` if given and the variable does not exist)."""
        return self._store.get_value(self.id, name, default)

    def set(
        self,
        name: str,
        value: Any,
        *,
        expected_version: int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Variable:
        """Validate and write; with ``expected_version`` a compare-and-set."""
        return self._store.update_variable(
            self.id, name, value, expected_version=expected_version, metadata=metadata
        )

    def update_variables(
        self, values: Mapping[str, Any], *, atomic: bool = True
    ) -> dict[str, Variable | DspexError]:
        return self._store.update_variables(self.id, values, atomic=atomic)

    def variables(self, pattern: str = "*") -> dict[str, Variable]:
        """Variables by name, in creation order."""
        return {v.name: v for v in self._store.list_variables(self.id, pattern)}

    def delete_variable(self, name: str) -> None:
        self._store.delete_variable(self.id, name)

    def __getitem__(self, name: str) -> Any:
        return self._store.get_value(self.id, name)

    def __setitem__(self, name: str, value: Any) -> None:
        self._store.update_variable(self.id, name, value)

    def __delitem__(self, name: str) -> None:
        self._store.delete_variable(self.id, name)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return bool(self._store.get_variables(self.id, [name])[0])

    def __iter__(self) -> Iterator[str]:
        return iter(self.variables())

    def __len__(self) -> int:
        return len(self.variables())

    # --- runs ------------------------------------------------------------------------

    def configure(self, *, multitask: str | None = None) -> Session:
        """Session-wide settings: the default ``multitask`` strategy of its runs."""
        return self._store.configure_session(self.id, multitask=multitask)

    def runs(self, *, status: str | None = None, limit: int = 100) -> list[Run]:
        """The session's runs, newest first."""
        return self._store.list_runs(self.id, status=status, limit=limit)

    # --- tasks -----------------------------------------------------------------------

    def predict(
        self, signature: Any, /, *, options: Mapping[str, Any] | None = None, **inputs: Any
    ) -> TaskHandle:
        """Enqueue ``dspex.predict``. Raises on bad input before enqueueing."""
        return self._client.submit("predict", self.id, signature, inputs, options)

    def chain_of_thought(
        self, signature: Any, /, *, options: Mapping[str, Any] | None = None, **inputs: Any
    ) -> TaskHandle:
        """Enqueue ``dspex.chain_of_thought``."""
        return self._client.submit("chain_of_thought", self.id, signature, inputs, options)

    def run_program(
        self, program_id: str, /, *, options: Mapping[str, Any] | None = None, **inputs: Any
    ) -> TaskHandle:
        """Enqueue ``dspex.run_program`` for a stored program."""
        return self._client.submit("run_program", self.id, program_id, inputs, options)


class Client:
    """Producer entry point: the store for state, the Celery app for LM work."""

    def __init__(
        self,
        redis_url: str | None = None,
        broker_url: str | None = None,
        *,
        result_backend: str | None = None,
        settings: Settings | None = None,
    ) -> None:
        overrides: dict[str, Any] = {
            k: v
            for k, v in {
                "redis_url": redis_url,
                "broker_url": broker_url,
                "result_backend": result_backend,
            }.items()
            if v
        }
        if settings is None:
            settings = Settings.from_env(**overrides)
        elif overrides:
            raise ValueError("pass either settings or URLs, not both")
        self.settings = settings
        self.store = SessionStore.from_settings(settings)
        self.app: Celery = make_celery(settings)

    @classmethod
    def from_env(cls) -> Client:
        """Configured from ``DSPEX_REDIS_URL``, ``DSPEX_BROKER_URL`` and friends."""
        return cls(settings=Settings.from_env())

    def close(self) -> None:
        """Release the store's pool, the result backend's subscriber and the broker pool."""
        self.store.close()
        close_app(self.app)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- sessions --------------------------------------------------------------------

    def create_session(
        self,
        session_id: str | None = None,
        *,
        ttl_s: float | None = None,
        metadata: Mapping[str, Any] | None = None,
        exist_ok: bool = False,
    ) -> SessionHandle:
        """Create a session (a random id when none is given)."""
        sid = session_id or f"s-{uuid.uuid4().hex}"
        self.store.create_session(sid, ttl_s=ttl_s, metadata=metadata, exist_ok=exist_ok)
        return SessionHandle(self, sid)

    def session(self, session_id: str) -> SessionHandle:
        """A handle on an existing session. Raises ``SessionNotFound``."""
        self.store.get_session(session_id)
        return SessionHandle(self, session_id)

    def delete_session(self, session_id: str) -> bool:
        return self.store.delete_session(session_id)

    def list_sessions(self) -> list[str]:
        return self.store.list_sessions()

    def stats(self) -> dict[str, Any]:
        return self.store.stats()

    # --- tasks -----------------------------------------------------------------------

    def _prepare(
        self,
        kind: str,
        session_id: str,
        target: Any,
        inputs: Any,
        options: Any,
        *,
        check_session: bool = False,
    ) -> tuple[str, list[Any]]:
        """Validate one task request like the worker will; returns (task name, args).
        ``check_session``: read the session here too (a batch checks every request
        before it sends any; a single run's admission checks its session itself)."""
        size = len(inputs_json(inputs))
        if size > self.settings.max_inputs_bytes:
            raise PayloadTooLarge(
                f"inputs are {size} bytes, over the limit of {self.settings.max_inputs_bytes}",
                {"size_bytes": size, "limit_bytes": self.settings.max_inputs_bytes},
            )
        if kind == "run_program":
            spec = self.store.get_program(session_id, target)  # also checks the session
        elif kind in _TASK_BY_KIND:
            spec = normalize_spec({"module": kind, "signature": target})
            if check_session:
                self.store.get_session(session_id)
        else:
            raise InvalidInputs(f"unknown task kind {kind!r}")
        check_inputs(spec["signature"], inputs)
        check_options(options, spec["signature"])
        args = [session_id, target, dict(inputs)]
        if options:
            args.append(dict(options))
        return _TASK_BY_KIND.get(kind, RUN_PROGRAM_TASK), args

    def submit(
        self,
        kind: str,
        session_id: str,
        target: Any,
        inputs: Mapping[str, Any],
        options: Mapping[str, Any] | None = None,
    ) -> TaskHandle:
        """Enqueue one task: ``kind`` is predict, chain_of_thought or run_program;
        ``target`` the signature (or the program id for run_program)."""
        name, args = self._prepare(kind, session_id, target, inputs, options)
        return self.enqueue(name, session_id, args, multitask=(options or {}).get("multitask"))

    def submit_compile(
        self, session_id: str, program_id: str, trainset: Any, options: Mapping[str, Any]
    ) -> TaskHandle:
        """Enqueue ``dspex.compile`` after checking it like the worker will: the options,
        the metric name, the examples against the program's signature, the size."""
        args = compile_args(
            self.store,
            session_id,
            program_id,
            trainset,
            options,
        )
        return self.enqueue(COMPILE_TASK, session_id, args, multitask=options.get("multitask"))

    def enqueue(
        self, name: str, session_id: str, args: list[Any], *, multitask: str | None = None
    ) -> TaskHandle:
        """Enqueue the task ``name`` as a run of the session, its ``args`` already
        checked: recorded in the task ledger, admitted by the session's multitask
        strategy, then published (or parked for its turn). The path every run takes,
        whatever its task (``dspex.compile`` too, sent by name).

        Raises:
            SessionBusy: the ``reject`` strategy refused it (nothing was sent).
        """
        task_id = str(uuid.uuid4())
        self._record([(task_id, name, args)])
        try:
            decision = self.store.queue_run(
                session_id,
                task_id,
                name,
                {"task": name, "args": args, "kwargs": {}},
                multitask=multitask,
            )
        except DspexError:
            self._forget([task_id])  # refused (session_busy): never sent
            raise
        handoff.follow(self.app, self.store, decision)
        handle = TaskHandle(self.app.AsyncResult(task_id), store=self.store, session_id=session_id)
        if decision.verdict == Status.PARKED:
            return handle  # published by the run ahead of it when that one ends
        try:
            self.app.send_task(name, args=args, task_id=task_id)
        except Exception:
            self._forget([task_id])  # not sent (or its reply lost): do not resend it
            raise
        return handle

    def cancel(
        self, run_id: str, action: str = "interrupt", *, session_id: str | None = None
    ) -> str:
        """Cancel a run by id (see :meth:`TaskHandle.cancel`). The session is found from
        the task ledger when not given.

        Raises:
            RunNotFound: no unfinished run with that id is known (give ``session_id``).
        """
        if session_id is None:
            message = self.store.sent_task(run_id)
            if message is None or not message.get("args"):
                raise RunNotFound(
                    f"no unfinished run {run_id!r} is recorded: pass its session_id",
                    {"run_id": run_id},
                )
            session_id = str(message["args"][0])
        return cancel_run(self.app, self.store, session_id, run_id, action)

    def _forget(self, task_ids: list[str]) -> None:
        if self.settings.task_ledger:
            with contextlib.suppress(DspexError):
                self.store.forget_sent(*task_ids)

    def _record(self, tasks: list[tuple[str, str, list[Any]]]) -> None:
        """Put tasks in the ledger before sending them, so a message the broker loses is
        sent again (``store/ledger.py``)."""
        if self.settings.task_ledger:
            self.store.record_sent(
                [(tid, name, args, {}) for tid, name, args in tasks],
                self.settings.resend_after_s,
            )

    def submit_batch(self, requests: Iterable[Mapping[str, Any]]) -> BatchHandle:
        """Enqueue many tasks at once (a Celery group); every request is validated first.

        Each request: ``{"task": "predict" | "chain_of_thought" | "run_program",
        "session_id", "signature" | "program_id", "inputs", "options"?}``.
        """
        prepared = []
        for n, req in enumerate(requests):
            kind = req.get("task", "predict")
            target = req.get("program_id") if kind == "run_program" else req.get("signature")
            try:
                prepared.append(
                    self._prepare(
                        kind,
                        req.get("session_id", ""),
                        target,
                        req.get("inputs"),
                        req.get("options"),
                        check_session=True,
                    )
                )
            except DspexError as e:
                e.details.setdefault("request_index", n)
                raise
        if not prepared:
            raise InvalidInputs("submit_batch needs at least one request")
        # One producer connection for the whole batch; sending one by one was measured
        # faster than group().apply_async() on this broker.
        ids = [str(uuid.uuid4()) for _ in prepared]
        self._record([(tid, name, args) for tid, (name, args) in zip(ids, prepared, strict=True)])
        sent: set[str] = set()
        try:
            with self.app.producer_or_acquire() as producer:
                for tid, (name, args) in zip(ids, prepared, strict=True):
                    options = args[3] if len(args) > 3 else {}
                    decision = self.store.queue_run(
                        args[0],
                        tid,
                        name,
                        {"task": name, "args": args, "kwargs": {}},
                        multitask=options.get("multitask"),
                    )
                    handoff.follow(self.app, self.store, decision)
                    sent.add(tid)  # admitted: published now or by the run ahead of it
                    if decision.verdict != Status.PARKED:
                        self.app.send_task(name, args=args, producer=producer, task_id=tid)
        except Exception:
            # The rest were never admitted nor sent: do not resend them.
            self._forget([tid for tid in ids if tid not in sent])
            raise
        results = [self.app.AsyncResult(tid) for tid in ids]
        return BatchHandle(self.app.GroupResult(str(uuid.uuid4()), results))

    def result(self, task_id: str, session_id: str | None = None) -> TaskHandle:
        """A handle on a task enqueued earlier (by id; with its session, it can
        :meth:`~TaskHandle.stream`)."""
        return TaskHandle(self.app.AsyncResult(task_id), store=self.store, session_id=session_id)

    def workers(self, timeout_s: float = 1.0) -> Sequence[str]:
        """Names of the workers that answered a ping."""
        replies = self.app.control.ping(timeout=timeout_s) or []
        return sorted(name for reply in replies for name in reply)
