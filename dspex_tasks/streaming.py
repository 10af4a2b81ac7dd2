"""Streamed runs (worker side): DSPy's streaming -> batched events in the run's stream.

A run with ``options={"stream": True}`` is run with DSPy's own streaming: the LM is asked
to stream (``dspy.settings.send_stream``), and every chunk of the final predictor's LM
call reaches :class:`_ChunkSink`, which splits it per output field with
:class:`FieldSplitter` and queues ``token`` events. ``status`` events come from a DSPy
callback (module start; ReAct's thought, tool call and observation per step). Events are
written by :class:`RunStreamWriter` from its own thread in batches (at most one Redis
round trip per ``flush_interval_s``, 25 ms), never on the thread reading the LM.

Exactness. For every ``str`` output field the ``token`` deltas concatenate to exactly
the final value in ``done``:

* :class:`FieldSplitter` mirrors ``ChatAdapter.parse`` (line-based headers, the first
  section of a field wins, ``splitlines`` line breaks joined with ``\\n``, the value
  stripped), holding back only what may still turn out to be a header or trailing
  whitespace;
* only the first LM call of the streamed predictor is split (a retry before any chunk
  makes no second one), and the JSON adapter fallback is off for a streamed run (the
  fallback would ask the LM again, in another format, after tokens went out): an answer
  the chat format cannot parse fails the run with ``lm_error``;
* when the run ends, whatever of a field's value was not streamed yet (a cached answer,
  held-back text) is sent as a last delta before the ``output`` events. A value that
  does not extend what was streamed cannot happen with the rules above; if it ever did,
  it is logged and the ``output`` event carries the value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

import anyio
import anyio.to_thread
import dspy
import orjson
from dspy.adapters.chat_adapter import ChatAdapter
from dspy.utils.callback import BaseCallback

from dspex_tasks.errors import RETRYABLE_ERRORS, DspexError
from dspex_tasks.store import SessionStore

__all__ = [
    "FieldSplitter",
    "RunStreamWriter",
    "error_code",
    "run_streamed",
    "stream_failed",
    "streamed_fields",
]

log = logging.getLogger(__name__)

_HEADER = re.compile(r"\[\[ ## (\w+) ## \]\]")
_WORD = re.compile(r"\w+")
_HEADER_OPEN = "[[ ## "
_HEADER_CLOSE = " ## ]]"
#: ``str.splitlines`` boundaries; ``\r`` alone waits for a possible ``\n``.
_LINE_BREAK = re.compile("\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_DETAIL_CHARS = 500


def _maybe_header(text: str) -> bool:
    """Whether a line (left-stripped, incomplete) may still become a field header."""
    if len(text) <= len(_HEADER_OPEN):
        return _HEADER_OPEN.startswith(text)
    if not text.startswith(_HEADER_OPEN):
        return False
    rest = text[len(_HEADER_OPEN) :]
    word = _WORD.match(rest)
    if word is None:
        return False
    return _HEADER_CLOSE.startswith(rest[word.end() :])


class FieldSplitter:
    """Splits an LM's ChatAdapter-format text, fed in pieces, into per-field deltas.

    ``emit(field, delta)`` is called for the fields in ``fields`` only, with text whose
    concatenation is exactly what ``ChatAdapter.parse`` gives that field's section
    (before type parsing) once the whole text has been fed and :meth:`close` called.
    """

    def __init__(self, fields: frozenset[str], emit: Callable[[str, str], None]) -> None:
        self.fields = fields
        self.emit = emit
        self._buf = ""  # the current line (not ended yet)
        self._done = 0  # chars of the current line already handled
        self._kind: str | None = None  # None: undecided; "content" or "header"
        self._section: str | None = None
        self._seen: set[str] = set()
        self._started = False
        self._held = ""

    def feed(self, text: str) -> None:
        self._buf += text
        while True:
            found = _LINE_BREAK.search(self._buf, self._done)
            if found is None or (found.group() == "\r" and found.end() == len(self._buf)):
                self._partial()
                return
            line, self._buf = self._buf[: found.start()], self._buf[found.end() :]
            self._end_line(line)

    def close(self) -> None:
        """The text is complete: the last line ends without a line break."""
        if self._buf or self._kind is not None:
            line, self._buf = self._buf, ""
            self._end_line(line)

    # --- lines -----------------------------------------------------------------------

    def _classify(self, line: str, complete: bool) -> None:
        stripped = line.lstrip()
        header = _HEADER.match(stripped)
        if header is not None:
            self._kind = "header"
            self._open_section(header.group(1))
            # What follows the header on its line: the value's first line, stripped.
            self._done = len(line) - len(stripped) + header.end()
        elif complete or not _maybe_header(stripped):
            self._kind = "content"

    def _partial(self) -> None:
        line = self._buf
        if self._kind is None:
            self._classify(line, complete=False)
        if self._kind is not None and self._done < len(line):
            self._text(line[self._done :])
            self._done = len(line)

    def _end_line(self, line: str) -> None:
        if self._kind is None:
            self._classify(line, complete=True)
        if self._done < len(line):
            self._text(line[self._done :])
        if self._kind == "header":
            self._held = ""  # the header line's rest is stripped on its own
            if self._started:
                self._held = "\n"
        elif self._started:
            self._held += "\n"
        self._kind, self._done = None, 0

    def _open_section(self, name: str) -> None:
        first = name not in self._seen
        self._seen.add(name)
        self._section = name if first and name in self.fields else None
        self._started = False
        self._held = ""

    def _text(self, text: str) -> None:
        if self._section is None:
            return
        if not self._started:
            text = text.lstrip()
            if not text:
                return
            self._started = True
        body = text.rstrip()
        if not body:
            self._held += text
            return
        out, self._held = self._held + body, text[len(body) :]
        self.emit(self._section, out)


# --------------------------------------------------------------------------- writer


def _json(data: Any) -> bytes:
    return orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)


class RunStreamWriter:
    """Queues a run's events and writes them to its stream in batches, from one thread.

    A batch goes out at most every ``flush_interval_s``; the first event after a quiet
    spell, and the run's first token, go out at once. Consecutive ``token`` events of
    one field are merged. Redis trouble while the run goes on is logged and the batch
    kept for the next flush.
    """

    def __init__(
        self,
        store: SessionStore,
        session_id: str,
        run_id: str,
        *,
        running_keep_s: float,
        keep_s: float,
        flush_interval_s: float = 0.025,
    ) -> None:
        self.store = store
        self.session_id = session_id
        self.run_id = run_id
        self.running_keep_s = running_keep_s
        self.keep_s = keep_s
        self.flush_interval_s = flush_interval_s
        self._pending: list[tuple[str, Any]] = []
        self._cond = threading.Condition(threading.Lock())
        self._last_flush = 0.0
        self._urgent = False
        self._closed = False
        self._thread: threading.Thread | None = None
        #: Text streamed so far per field (for the end-of-run reconciliation).
        self.streamed: dict[str, list[str]] = {}
        #: The result's str fields (set once the run's spec is known).
        self.str_fields: frozenset[str] = frozenset()
        self.events_written = 0

    # --- queueing (any thread) -----------------------------------------------------

    def token(self, field: str, delta: str) -> None:
        with self._cond:
            if self._closed:  # an abandoned run (timed out) still talking: dropped
                return
            if not self.streamed:  # the run's first token goes out at once
                self._urgent = True
            self.streamed.setdefault(field, []).append(delta)
            last = self._pending[-1] if self._pending else None
            if last is not None and last[0] == "token" and last[1]["field"] == field:
                last[1]["delta"] += delta
            else:
                self._pending.append(("token", {"field": field, "delta": delta}))
            self._wake()

    def status(self, step: str, detail: str = "") -> None:
        self.add("status", {"step": step, "detail": detail[:_DETAIL_CHARS]})

    def add(self, kind: str, data: Any) -> None:
        with self._cond:
            if self._closed:
                return
            self._pending.append((kind, data))
            self._wake()

    def _wake(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name=f"dspex-stream-{self.run_id[:8]}", daemon=True
            )
            self._thread.start()
        if len(self._pending) == 1 or self._urgent:  # what the writer waits for
            self._cond.notify()

    # --- writing -------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                # Events queued meanwhile join this batch: a wait is cut short by
                # close() and the run's first token only, never by another event.
                due = self._last_flush + self.flush_interval_s
                while not self._closed and not self._urgent:
                    left = due - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._closed:
                    return
                batch, self._pending, self._urgent = self._pending, [], False
            self._write(batch, self.running_keep_s)

    def _write(self, batch: list[tuple[str, Any]], keep_s: float) -> None:
        if not batch:
            return
        self._last_flush = time.monotonic()
        events = [(kind, _json(data)) for kind, data in batch]
        try:
            self.store.append_run_stream(self.session_id, self.run_id, events, keep_s=keep_s)
            self.events_written += len(events)
        except DspexError as e:
            log.warning("run %s: cannot write its stream (%s)", self.run_id, e)
            with self._cond:
                self._pending[:0] = batch

    def close(self, final: list[tuple[str, Any]]) -> None:
        """Write what is queued and ``final`` (the last events), in order; the stream
        then lives ``keep_s``. Raises DspexError if Redis refuses the last write."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            batch, self._pending = [*self._pending, *final], []
        events = [(kind, _json(data)) for kind, data in batch]
        if events:
            self.store.append_run_stream(self.session_id, self.run_id, events, keep_s=self.keep_s)
            self.events_written += len(events)

    # --- the end of a run ------------------------------------------------------------

    def finish_fields(self, outputs: Mapping[str, Any]) -> None:
        """Send what was not streamed yet of each str field, then one ``output`` event
        per field (in the result's order)."""
        for field, value in outputs.items():
            if field not in self.str_fields or not isinstance(value, str):
                continue
            sent = "".join(self.streamed.get(field, ()))
            if value.startswith(sent):
                if len(value) > len(sent):
                    self.token(field, value[len(sent) :])
            else:
                log.warning(
                    "run %s: the streamed text of %r is not a prefix of its value",
                    self.run_id,
                    field,
                )
        for field, value in outputs.items():
            self.add("output", {"field": field, "value": value})


def error_code(error: BaseException) -> str:
    """The stable code of any error a run can end with: a DspexError's (a cancelled
    run's ``run_cancelled`` too), ``task_timeout`` for Celery's soft limit, else
    ``unknown``."""
    code = getattr(error, "code", None)
    if isinstance(code, str) and code:
        return code
    if type(error).__name__ == "SoftTimeLimitExceeded":
        return "task_timeout"
    return "unknown"


def stream_failed(error: BaseException, *, retry: bool) -> list[tuple[str, Any]]:
    """The last events of a run that raised ``error``: ``error`` ``{"code",
    "message"}``, or a ``status`` ``retry`` when the task will run again (a retryable
    error and ``retry``) and the stream stays open for that attempt."""
    code = error_code(error)
    message = str(error.args[0]) if error.args else type(error).__name__
    if retry and isinstance(error, RETRYABLE_ERRORS):
        return [("status", {"step": "retry", "detail": f"{code}: {message}"[:_DETAIL_CHARS]})]
    return [("error", {"code": code, "message": message[:_DETAIL_CHARS]})]


# --------------------------------------------------------------------------- DSPy side


def streamed_fields(spec: Mapping[str, Any]) -> frozenset[str]:
    """The result's str fields (reasoning or rationale included): the ones with tokens."""
    names = {f["name"] for f in spec["signature"]["outputs"] if f.get("type") == "str"}
    if spec["module"] in {"chain_of_thought", "react"}:
        names.add("reasoning")
    elif spec["module"] == "multi_chain_comparison":
        names.add("rationale")
    return frozenset(names)


def final_predictor(module: Any) -> Any:
    """The predictor whose outputs are the run's result (the one that streams)."""
    if isinstance(module, dspy.Predict):
        return module
    if isinstance(module, dspy.ReAct):
        return module.extract.predict
    compare = getattr(module, "compare", None)
    if compare is not None:
        return compare.predict
    return module.predict


class _Target:
    """What ``Predict._should_stream`` looks for in ``settings.stream_listeners``."""

    def __init__(self, predict: Any) -> None:
        self.predict = predict


class _ChunkSink:
    """``settings.send_stream``: receives the LM chunks on the run's event loop."""

    def __init__(self, predict_id: int, splitter: FieldSplitter) -> None:
        self.predict_id = predict_id
        self.splitter = splitter
        self._call: Any = None
        self._other_call = False

    async def send(self, chunk: Any) -> None:
        if getattr(chunk, "predict_id", None) != self.predict_id or self._other_call:
            return
        call_id = getattr(chunk, "id", None)
        if self._call is None:
            self._call = call_id
        elif call_id is not None and call_id != self._call:
            self._other_call = True  # a second call (n > 1): only the first one streams
            return
        try:
            text = chunk.choices[0].delta.content
        except (AttributeError, IndexError, KeyError, TypeError):
            return
        if text:
            self.splitter.feed(text)


class _StatusCallback(BaseCallback):  # type: ignore[misc]
    """``status`` events: a module starting; ReAct's thought, tool call, observation."""

    def __init__(self, writer: RunStreamWriter, root: Any) -> None:
        self.writer = writer
        self.root = root
        self.react = root.react if isinstance(root, dspy.ReAct) else None
        self._calls: dict[str, Any] = {}

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self._calls[call_id] = instance
        if instance is self.root:
            self.writer.status("start", type(instance).__name__)
        elif self.react is not None and instance is self.root.extract:
            self.writer.status("answer", "")

    def on_module_end(
        self, call_id: str, outputs: Any | None, exception: BaseException | None = None
    ) -> None:
        instance = self._calls.pop(call_id, None)
        if instance is not None and instance is self.react and outputs is not None:
            thought = getattr(outputs, "next_thought", None)
            if thought is not None:
                self.writer.status("thought", str(thought))

    def on_tool_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        name = getattr(instance, "name", "tool")
        if name == "finish":
            return
        args = inputs.get("kwargs", inputs)
        try:
            shown = orjson.dumps(args, default=str).decode()
        except TypeError:
            shown = str(args)
        self.writer.status("tool_call", f"{name}({shown})")

    def on_tool_end(
        self, call_id: str, outputs: Any | None, exception: BaseException | None = None
    ) -> None:
        if outputs == "Completed.":
            return
        if exception is not None:
            self.writer.status("observation", f"{type(exception).__name__}: {exception}")
        else:
            self.writer.status("observation", str(outputs))


class _InlineLoop:
    """The "event loop" of a streamed run's thread, as ``anyio.from_thread.run`` sees it.

    DSPy's sync LM path hands each chunk to ``send_stream`` with
    ``anyio.from_thread.run(stream.send, chunk)``, i.e. through an event loop in another
    thread: two thread switches and a loop iteration per chunk, most of a streamed run's
    CPU. :meth:`_ChunkSink.send` never suspends, so here it runs on the calling thread,
    at the cost of a function call. Any other coroutine (LiteLLM's streaming path runs
    its whole call this way) gets a private event loop on this thread.
    """

    @classmethod
    def run_async_from_thread(cls, func: Any, args: tuple[Any, ...], token: object) -> Any:
        if isinstance(getattr(func, "__self__", None), _ChunkSink):
            coro = func(*args)
            try:
                coro.send(None)
            except StopIteration as done:
                return done.value
            coro.close()  # pragma: no cover - _ChunkSink.send has no await point
            raise RuntimeError("_ChunkSink.send suspended")
        with asyncio.Runner() as runner:
            return runner.run(func(*args))

    @classmethod
    def run_sync_from_thread(cls, func: Any, args: tuple[Any, ...], token: object) -> Any:
        return func(*args)


def _claim_thread() -> contextlib.AbstractContextManager[Any] | None:
    """This thread as an AnyIO worker thread of :class:`_InlineLoop` (None if this
    AnyIO has no ``claim_worker_thread``: the run then goes through a real loop)."""
    try:
        from anyio._core._eventloop import claim_worker_thread
    except ImportError:  # pragma: no cover - another AnyIO
        return None
    return cast(
        "contextlib.AbstractContextManager[Any]", claim_worker_thread(cast(Any, _InlineLoop), None)
    )


def run_streamed(
    run: Callable[[Mapping[str, Any]], tuple[Any, dict[str, Any]]],
    module: Any,
    writer: RunStreamWriter,
) -> tuple[Any, dict[str, Any]]:
    """``run(extra_context)`` (``programs.run_module``) with streaming on.

    The chunks of DSPy's sync LM call reach ``send_stream`` through
    ``anyio.from_thread.run``: the call runs on this thread claimed for
    :class:`_InlineLoop` (no hop per chunk), or, failing that, in an AnyIO worker
    thread under a loop of its own.
    """
    predictor = final_predictor(module)
    splitter = FieldSplitter(writer.str_fields, writer.token)
    sink = _ChunkSink(id(predictor), splitter)
    context = {
        "send_stream": sink,
        "stream_listeners": [_Target(predictor)],
        "callbacks": [*dspy.settings.callbacks, _StatusCallback(writer, module)],
        "adapter": ChatAdapter(use_json_adapter_fallback=False),
    }

    async def main() -> tuple[Any, dict[str, Any]]:
        return await anyio.to_thread.run_sync(run, context)

    try:
        claimed = _claim_thread()
        if claimed is None:  # pragma: no cover - another AnyIO
            return anyio.run(main)
        with claimed:
            return run(context)
    finally:
        with contextlib.suppress(Exception):
            splitter.close()
