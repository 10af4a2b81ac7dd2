"""The demo producer (``dspex-tasks dev --demo``, ``make demo``): one tour of the service.

Sessions, typed variables (and a rejected write), Predict and ChainOfThought, a stored
program run twice with changing session state, ``store_outputs`` chaining one task into
the next, sliding-TTL expiry, stats, and where to look in Flower. It works with whatever
default LM the worker has and labels who answered: the offline echo LM answers with
placeholders, a real model with text.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from dspex_tasks.app import TASK_NAMES
from dspex_tasks.client import Client, SessionHandle, TaskHandle
from dspex_tasks.errors import DspexError, LMFailure, SessionExpired, SessionNotFound

__all__ = ["main"]

TASK_TIMEOUT_S = 120.0
_ECHO = "dspex/echo"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _step(n: int, title: str) -> None:
    _say(f"\n== {n}. {title}")


def _lm_label(result: dict[str, Any]) -> str:
    model = str(result.get("lm", {}).get("model", "unknown"))
    if model == _ECHO:
        return f"{model} (offline placeholder LM: set DSPEX_LM for a real model)"
    return model


def _answer(what: str, handle: TaskHandle) -> dict[str, Any] | None:
    """Wait for one task and print its outputs; an LM failure is shown, not fatal."""
    try:
        result = handle.get_result(timeout=TASK_TIMEOUT_S)
    except LMFailure as e:
        _say(f"   {what}: the LM could not answer ({e.code}: {e.message})")
        return None
    for name, value in result["outputs"].items():
        _say(f"   {name}: {value}")
    _say(f"   answered by {_lm_label(result)} in {result['duration_ms']:.0f} ms, task {handle.id}")
    return result


def _variables(s: SessionHandle) -> None:
    for name, var in s.variables().items():
        _say(f"   {name:<12} {var.type:<10} v{var.version}  {var.value!r}")


def _tour(s: SessionHandle) -> None:
    _step(2, "typed variables")
    s.register_variable(
        "temperature",
        "float",
        0.7,
        constraints={"min": 0.0, "max": 2.0},
        description="LM sampling temperature (bound: tasks of this session use it)",
    )
    s.register_variable(
        "style", "choice", "concise", constraints={"choices": ["concise", "detailed", "playful"]}
    )
    s.register_variable(
        "embedding", "embedding", [0.1, 0.2, 0.3, 0.4], constraints={"dimensions": 4}
    )
    s.register_variable("last_answer", "string", "")
    _variables(s)

    _step(3, "a rejected write leaves the value unchanged")
    try:
        s.set("temperature", 5.0)
    except DspexError as e:
        _say(f"   set temperature=5.0 -> {e.code}: {e.message}")
    _say(f"   temperature is still {s['temperature']!r}")
    var = s.set("temperature", 0.2)
    _say(f"   set temperature=0.2 -> ok, version {var.version}")

    _step(4, "Predict")
    _answer("predict", s.predict("question -> answer", question="What is the capital of France?"))

    _step(5, "ChainOfThought")
    _answer("cot", s.chain_of_thought("question -> answer", question="Why is the sky blue?"))

    _step(6, "a stored program, run with the session's state")
    s.create_program("summarize", "predict", "text, style -> summary")
    text = "Celery runs tasks on workers; Redis keeps the queue and the session state."
    _say(f"   stored program 'summarize' ({', '.join(s.list_programs())})")
    _answer("run", s.run_program("summarize", text=text, style=s["style"]))
    s.update_variables({"style": "playful", "temperature": 0.9})
    _say(f"   updated state: style={s['style']!r}, temperature={s['temperature']!r}")
    _answer("re-run", s.run_program("summarize", text=text, style=s["style"]))

    _step(7, "store_outputs: one task's output becomes the next task's input")
    handle = s.chain_of_thought(
        "question -> answer",
        question="Name one use of a task queue.",
        options={"store_outputs": {"answer": "last_answer"}},
    )
    if _answer("cot", handle) is not None:
        var = s.variable("last_answer")
        _say(f"   variable last_answer is now v{var.version}: {var.value!r}")
        _answer("next", s.predict("context -> headline", context=s["last_answer"]))


def _expiry(client: Client) -> None:
    _step(8, "sliding TTL: a session expires")
    short = client.create_session(f"demo-short-{uuid.uuid4().hex[:8]}", ttl_s=2)
    short.register_variable("note", "string", "gone soon")
    _say(f"   created {short.id} with ttl_s=2; sleeping 2.5 s ...")
    time.sleep(2.5)
    try:
        short.info()
        _say("   unexpected: the session is still there")
    except SessionExpired as e:
        _say(f"   {short.id}: {e.code} (read after its deadline: expired lazily)")
    except SessionNotFound as e:
        _say(f"   {short.id}: {e.code} (the expiry sweep removed it first)")


def main(client: Client) -> int:
    """Run the demo against a live stack (a worker must be online); 0 on success."""
    try:
        _step(1, "a session")
        s = client.create_session(f"demo-{uuid.uuid4().hex[:8]}", ttl_s=600)
        info = s.info()
        _say(f"   {s.id}: ttl {info.ttl_s:g} s, expires at {info.expires_at:%H:%M:%S} UTC")
        _tour(s)
        _expiry(client)

        _step(9, "stats")
        for key, value in client.stats().items():
            _say(f"   {key:<16} {value}")

        settings = client.settings
        _step(10, "where to look")
        _say(f"   Flower tasks:   http://{settings.flower_address}:{settings.flower_port}/tasks")
        _say(f"   task names:     {', '.join(TASK_NAMES)}")
        _say(f"   the session:    dspex-tasks session show {s.id}   (kept for 10 minutes)")
    except (DspexError, TimeoutError) as e:
        code = e.code if isinstance(e, DspexError) else "timeout"
        _say(f"\ndemo failed: {code}: {e}")
        return 1
    _say("\ndemo finished")
    return 0
