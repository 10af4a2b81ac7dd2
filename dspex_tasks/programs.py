"""Program specs -> DSPy modules; run one; Prediction -> JSON (worker side only).

Signatures are built from the normalized spec (``specs.py``): field types map through a
closed table (``field_types.py``), never by evaluating producer text. Built modules
are cached per process, keyed by a digest of the whole normalized spec (signature,
config and state), so a changed spec or state is never served stale.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, Optional

import dspy
import orjson

from dspex_tasks.errors import (
    DspexError,
    InvalidProgram,
    LMError,
    LMRateLimited,
    TaskTimeout,
)
from dspex_tasks.field_types import FieldType, TypeSyntaxError, parse_type
from dspex_tasks.lru import LRU
from dspex_tasks.tools import get_tools

__all__ = [
    "DigestedSpec",
    "ModuleCache",
    "build_module",
    "outputs_to_json",
    "redact",
    "run_module",
]


def _py_type(t: FieldType) -> Any:
    """The Python annotation for a parsed field type (a closed mapping, never eval)."""
    if t.kind == "literal":
        return Literal[t.choices]
    if t.kind in {"list", "dict", "optional"}:
        inner = Any if t.item is None else _py_type(t.item)
        if t.kind == "list":
            return list[inner]  # type: ignore[valid-type]
        if t.kind == "dict":
            return dict[str, inner]  # type: ignore[valid-type]
        return Optional[inner]  # noqa: UP045 - DSPy renders and parses typing.Optional
    return {"str": str, "int": int, "float": float, "bool": bool}[t.kind]


def _field_type(field: Mapping[str, Any]) -> Any:
    if field["type"] == "literal":
        return Literal[tuple(field["choices"])]
    try:
        return _py_type(parse_type(field["type"]))
    except TypeSyntaxError as e:  # a stored program written around normalize_spec
        raise InvalidProgram(f"field {field['name']!r}: {e}", {"field": field["name"]}) from None


def build_signature(signature: Mapping[str, Any]) -> type[dspy.Signature]:
    """A DSPy Signature class from a normalized signature."""
    fields: dict[str, tuple[Any, Any]] = {}
    for field in signature["inputs"]:
        desc = {"desc": field["desc"]} if field.get("desc") else {}
        fields[field["name"]] = (_field_type(field), dspy.InputField(**desc))
    for field in signature["outputs"]:
        desc = {"desc": field["desc"]} if field.get("desc") else {}
        fields[field["name"]] = (_field_type(field), dspy.OutputField(**desc))
    try:
        built: type[dspy.Signature] = dspy.Signature(fields, signature.get("instructions") or None)
        return built
    except Exception as e:  # DSPy raises plain ValueError/TypeError for bad signatures
        raise InvalidProgram(f"cannot build signature: {e}") from e


class _MultiChain(dspy.Module):  # type: ignore[misc]
    """M chain-of-thought attempts compared by DSPy's MultiChainComparison."""

    def __init__(self, signature: type[dspy.Signature], m: int) -> None:
        super().__init__()
        self.m = m
        self.attempt = dspy.ChainOfThought(signature)
        self.compare = dspy.MultiChainComparison(signature, M=m)

    def forward(self, **inputs: Any) -> Any:
        completions = [
            self.attempt(**inputs, config={"rollout_id": i, "temperature": 1.0})
            for i in range(self.m)
        ]
        return self.compare(completions=completions, **inputs)


def build_module(spec: Mapping[str, Any]) -> Any:
    """A DSPy module for a normalized spec, with its stored state loaded."""
    signature = build_signature(spec["signature"])
    config = spec.get("config") or {}
    module_name = spec["module"]
    module: Any
    if module_name == "predict":
        module = dspy.Predict(signature)
    elif module_name == "chain_of_thought":
        module = dspy.ChainOfThought(signature)
    elif module_name == "react":
        module = dspy.ReAct(
            signature, tools=get_tools(config["tools"]), max_iters=config.get("max_iters", 5)
        )
    elif module_name == "multi_chain_comparison":
        module = _MultiChain(signature, config.get("M", 3))
    else:  # specs.normalize_spec already refuses these
        raise InvalidProgram(f"unknown module {module_name!r}")
    if spec.get("state"):
        try:
            module.load_state(spec["state"])
        except Exception as e:
            raise InvalidProgram(f"cannot load program state: {type(e).__name__}: {e}") from e
    return module


class DigestedSpec(dict[str, Any]):
    """A normalized spec that carries its :class:`ModuleCache` digest, computed once.

    Specs built from the same signature text are reused across tasks (see
    ``Runtime.spec_for``), so hashing the spec again on every task is wasted work.
    Treat it as read-only: it is shared between the pool's threads.
    """

    __slots__ = ("digest",)

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        self.digest = ModuleCache.digest(self)


class ModuleCache:
    """Built modules by spec digest (LRU). DSPy modules are safe to call from threads."""

    def __init__(self, max_entries: int = 512) -> None:
        self._data: LRU[str, Any] = LRU(max_entries)

    @staticmethod
    def digest(spec: Mapping[str, Any]) -> str:
        return hashlib.sha256(orjson.dumps(spec, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def get(self, spec: Mapping[str, Any], build: Callable[[Mapping[str, Any]], Any]) -> Any:
        key = spec.digest if isinstance(spec, DigestedSpec) else self.digest(spec)
        module = self._data.get(key)
        if module is None:
            module = build(spec)
            self._data.put(key, module)
        return module


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "model_dump"):
        return _jsonable(value.model_dump())
    return str(value)


def outputs_to_json(prediction: Any, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The prediction's output fields (and reasoning, for reasoning modules) as JSON."""
    names = [f["name"] for f in spec["signature"]["outputs"]]
    if spec["module"] in {"chain_of_thought", "react"}:
        names = ["reasoning", *names]
    elif spec["module"] == "multi_chain_comparison":
        names = ["rationale", *names]
    store = prediction.toDict() if hasattr(prediction, "toDict") else dict(prediction)
    return {n: _jsonable(store[n]) for n in names if n in store}


def _is_rate_limit(error: BaseException) -> bool:
    names = {type(e).__name__ for e in (error, error.__cause__) if e is not None}
    return any("RateLimit" in n for n in names) or getattr(error, "status_code", None) == 429


def _is_timeout(error: BaseException) -> bool:
    """A request timeout, however the client wraps it (lm15: ReadTimeout under
    LMTransportError; litellm: Timeout)."""
    seen: BaseException | None = error
    for _ in range(6):
        if seen is None:
            return False
        if isinstance(seen, TimeoutError) or "Timeout" in type(seen).__name__:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def redact(text: str, lm: Any) -> str:
    """``text`` without the LM's API key (dspy keeps it in ``lm.kwargs``)."""
    key = (getattr(lm, "kwargs", None) or {}).get("api_key")
    if isinstance(key, str) and len(key) >= 4:
        text = text.replace(key, "***")
    return text


def run_module(
    module: Any,
    lm: Any,
    inputs: Mapping[str, Any],
    extra_context: Mapping[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Run ``module`` under ``dspy.context(lm=...)``; returns (prediction, usage by model).

    ``extra_context``: more DSPy settings for the run (a streamed run's, see
    ``streaming.py``).

    Raises:
        LMRateLimited: the provider throttled the call (retryable).
        TaskTimeout: the LM request timed out (the profile's ``timeout_s``).
        LMError: the LM call failed or its answer did not parse.
    """
    try:
        with dspy.context(lm=lm, track_usage=True, **(extra_context or {})):
            prediction = module(**inputs)
    except DspexError:  # ours already (bad inputs, the LM limiter's lm_rate_limited, ...)
        raise
    except Exception as e:
        # No exception chaining (``from None``): Celery stores the traceback, causes
        # included, in the result backend and logs it, and a provider's error text can
        # echo the API key (e.g. "Incorrect API key provided: Bearer sk-..."). The
        # message keeps the first line of the cause, with the key redacted.
        if _is_rate_limit(e):
            raise LMRateLimited(f"LM rate limited: {type(e).__name__}") from None
        if _is_timeout(e):
            raise TaskTimeout(
                f"the LM request timed out ({type(e).__name__}): the endpoint did not answer "
                "within the profile's timeout_s"
            ) from None
        # The exception text can echo the prompt; keep it short and never include kwargs.
        text = redact(str(e).splitlines()[0] if str(e) else "", lm)[:300]
        raise LMError(f"LM call failed: {type(e).__name__}: {text}") from None
    usage = prediction.get_lm_usage() if hasattr(prediction, "get_lm_usage") else None
    return prediction, _jsonable(usage or {})
