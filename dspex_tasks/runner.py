"""One task's work, end to end (worker side): session -> LM -> module -> JSON result.

The Celery tasks stay thin and call :meth:`Runtime.run`. A Runtime is built once per
worker process (it holds the store's connection pool, the LM objects and the module
cache) and is safe to share between the pool's threads.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import dspy
import orjson

from dspex_tasks.errors import DspexError, DuplicateDelivery, PayloadTooLarge
from dspex_tasks.lm import LMRegistry, bound_params
from dspex_tasks.lmparams import SAFE_LM_PARAMS
from dspex_tasks.programs import (
    ModuleCache,
    build_module,
    outputs_to_json,
    run_module,
)
from dspex_tasks.settings import Settings
from dspex_tasks.specs import check_inputs, check_options, normalize_spec
from dspex_tasks.store import SessionStore, TaskContext
from dspex_tasks.tools import load_tool_modules

__all__ = ["Runtime", "configure_dspy_once"]

log = logging.getLogger(__name__)
_configured = threading.Lock()
_done = False


def configure_dspy_once() -> None:
    """Process-wide DSPy settings, applied once (never per task).

    History off (a long-running worker would keep up to 10,000 full prompts per LM), and
    no disk cache (it grows on disk and is pickle-based); a bounded in-memory cache stays.
    """
    global _done
    with _configured:
        if _done:
            return
        dspy.configure(disable_history=True)
        dspy.configure_cache(
            enable_disk_cache=False, enable_memory_cache=True, memory_max_entries=10_000
        )
        _done = True


def _size_check(what: str, raw: bytes, limit: int) -> None:
    if len(raw) > limit:
        raise PayloadTooLarge(
            f"{what} is {len(raw)} bytes, over the limit of {limit}",
            {"size_bytes": len(raw), "limit_bytes": limit},
        )


class Runtime:
    """Everything a worker process needs to run tasks."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: SessionStore | None = None,
        lms: LMRegistry | None = None,
    ) -> None:
        configure_dspy_once()
        self.settings = settings
        self.store = store or SessionStore.from_settings(settings)
        self.lms = lms or LMRegistry(settings.lm_profiles)
        self.modules = ModuleCache()
        load_tool_modules(settings.tool_modules)

    def spec_for(self, module: str, signature: Any) -> dict[str, Any]:
        return normalize_spec({"module": module, "signature": signature})

    def run(
        self,
        task_id: str | None,
        session_id: str,
        spec: Mapping[str, Any] | None,
        inputs: Any,
        options: Any = None,
        *,
        program_id: str | None = None,
        attempt: int = 0,
    ) -> dict[str, Any]:
        """Run one program for a session; returns the task's JSON result.

        Exactly one of ``spec`` (Predict / ChainOfThought) or ``program_id`` is given.

        Raises:
            DuplicateDelivery: another delivery of ``task_id`` is running (state
                ``running``); the caller drops this one.
        """
        started = time.perf_counter()
        _size_check("inputs", orjson.dumps(inputs), self.settings.max_inputs_bytes)
        if spec is not None:  # check what needs no Redis before touching it
            check_inputs(spec["signature"], inputs)
            check_options(options, spec["signature"])
        try:
            ctx = self.store.begin_task(
                session_id,
                task_id=task_id,
                attempt=attempt,
                lease_s=self.settings.task_time_limit_s + 30,
                program_id=program_id,
                variables=list(SAFE_LM_PARAMS),
            )
        except DuplicateDelivery as e:
            if e.details.get("state") != "done":
                raise
            log.info("task %s was delivered again after it finished; answering its result", task_id)
            first: dict[str, Any] = orjson.loads(e.details["result"])
            return first
        try:
            return self._run_claimed(task_id, ctx, spec, inputs, options, started)
        except BaseException:
            if task_id is not None:
                with contextlib.suppress(DspexError):
                    self.store.release_task(session_id, task_id)
            raise

    def _run_claimed(
        self,
        task_id: str | None,
        ctx: TaskContext,
        spec: Mapping[str, Any] | None,
        inputs: Any,
        options: Any,
        started: float,
    ) -> dict[str, Any]:
        spec = spec if spec is not None else ctx.program
        assert spec is not None
        inputs = check_inputs(spec["signature"], inputs)
        outputs_map = check_options(options, spec["signature"])
        lm = self.lms.resolve(ctx.session.lm, bound_params(ctx.variables))
        module = self.modules.get(spec, build_module)
        prediction, usage = run_module(module, lm, inputs)
        outputs = outputs_to_json(prediction, spec)
        sid = ctx.session.id
        result = {
            "session_id": sid,
            "outputs": outputs,
            "lm": {"model": getattr(lm, "model", "unknown"), "usage": usage},
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        _size_check("result", orjson.dumps(result), self.settings.max_result_bytes)
        if outputs_map:
            values = {var: outputs[field] for field, var in outputs_map.items()}
            try:
                self.store.update_variables(
                    sid, values, atomic=True, task_id=task_id, task_result=result
                )
            except DuplicateDelivery as e:
                # Another delivery of this task wrote first: answer with its result.
                first: dict[str, Any] = orjson.loads(e.details["result"])
                return first
        return result

    def expire_sessions(self) -> dict[str, Any]:
        started = time.perf_counter()
        expired = self.store.expire_sessions()
        return {"expired": expired, "duration_ms": round((time.perf_counter() - started) * 1000, 3)}
