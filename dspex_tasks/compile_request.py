"""What a compile request may say (DESIGN.md §12): optimizers, their options, metric
names and examples. Pure: the Client checks a request with it before enqueueing, the
worker again before it runs one (a foreign producer skips the Client).

    check_request({"optimizer": "bootstrap_fewshot", "metric": "exact_match",
                   "max_bootstrapped_demos": 2})
    -> {"optimizer": "bootstrap_fewshot", "metric": "exact_match", "seed": 0, ...}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from dspex_tasks.errors import InvalidInputs, PayloadTooLarge

__all__ = [
    "BUILTIN_METRICS",
    "METRIC_NAME_RE",
    "OPTIMIZERS",
    "check_encoded_size",
    "check_examples",
    "check_request",
    "check_size",
    "example_fields",
]

#: Metrics every worker has (``metrics.py``); more come from ``DSPEX_METRIC_MODULES``.
BUILTIN_METRICS = ("exact_match", "contains", "f1")
METRIC_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,63}")
#: Options of every optimizer, handled by the runs machinery or the compile job.
_RUN_OPTIONS = frozenset({"optimizer", "metric", "valset", "multitask"})
#: The most examples one trainset or valset may hold.
MAX_EXAMPLES = 10_000


@dataclass(frozen=True)
class _Int:
    default: int | None
    low: int
    high: int

    def check(self, name: str, value: Any) -> int | None:
        if value is None and self.default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(name, value, f"an integer in [{self.low}, {self.high}]")
        if not self.low <= value <= self.high:
            raise _bad(name, value, f"an integer in [{self.low}, {self.high}]")
        return value


@dataclass(frozen=True)
class _Fraction:
    """A score threshold: a number in [0, 1], or None."""

    def check(self, name: str, value: Any) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise _bad(name, value, "a number in [0, 1] or null")
        return float(value)


@dataclass(frozen=True)
class _Bool:
    default: bool

    def check(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise _bad(name, value, "true or false")
        return value


_Option = _Int | _Fraction | _Bool
_COMMON: dict[str, _Option] = {"seed": _Int(0, 0, 2**31 - 1), "num_threads": _Int(1, 1, 16)}
_BOOTSTRAP: dict[str, _Option] = {
    "max_bootstrapped_demos": _Int(4, 0, 32),
    "max_labeled_demos": _Int(16, 0, 64),
    "max_rounds": _Int(1, 1, 10),
    "metric_threshold": _Fraction(),
}

#: Optimizer name -> its options (with their defaults and bounds).
OPTIMIZERS: dict[str, dict[str, _Option]] = {
    "labeled_fewshot": {**_COMMON, "k": _Int(16, 1, 64)},
    "bootstrap_fewshot": {**_COMMON, **_BOOTSTRAP},
    "bootstrap_random_search": {
        **_COMMON,
        **_BOOTSTRAP,
        "num_candidate_programs": _Int(16, 1, 64),
        "stop_at_score": _Fraction(),
    },
    "mipro_v2": {
        **_COMMON,
        "max_bootstrapped_demos": _Int(4, 0, 32),
        "max_labeled_demos": _Int(4, 0, 64),
        "minibatch": _Bool(True),
    },
}


def _bad(name: str, value: Any, wanted: str) -> InvalidInputs:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return InvalidInputs(f"compile option {name!r} must be {wanted}, got {shown}", {"option": name})


def check_request(options: Any) -> dict[str, Any]:
    """The compile options with every default filled in.

    Raises:
        InvalidInputs: an unknown optimizer, option or metric name, or a value out of
            its bounds (``details["option"]`` names it).
    """
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise InvalidInputs("compile options must be a JSON object", {"option": "options"})
    optimizer = options.get("optimizer", "bootstrap_fewshot")
    table = OPTIMIZERS.get(optimizer) if isinstance(optimizer, str) else None
    if table is None:
        raise InvalidInputs(
            f"unknown optimizer {optimizer!r} (optimizers: {', '.join(OPTIMIZERS)})",
            {"option": "optimizer"},
        )
    metric = options.get("metric", "exact_match")
    if not isinstance(metric, str) or not METRIC_NAME_RE.fullmatch(metric):
        raise _bad("metric", metric, "a metric name")
    extra = sorted(set(options) - set(table) - _RUN_OPTIONS - {"stream"})
    if extra:
        raise InvalidInputs(
            f"unknown option(s) for {optimizer}: {', '.join(map(str, extra))} "
            f"(options: {', '.join(sorted(table))})",
            {"option": str(extra[0])},
        )
    checked: dict[str, Any] = {"optimizer": optimizer, "metric": metric}
    for name, rule in table.items():
        value = options.get(name, getattr(rule, "default", None))
        checked[name] = rule.check(name, value)
    if "valset" in options and options["valset"] is not None:
        valset = options["valset"]
        checked["valset"] = valset if isinstance(valset, str) else check_examples(valset, "valset")
    if "multitask" in options:
        checked["multitask"] = options["multitask"]
    return checked


def check_examples(examples: Any, what: str = "trainset") -> list[dict[str, Any]]:
    """``examples`` as a list of JSON objects (1 to ``MAX_EXAMPLES``).

    Raises:
        InvalidInputs: not a non-empty list of non-empty objects with string keys.
    """
    if not isinstance(examples, (list, tuple)) or not examples:
        raise InvalidInputs(f"{what} must be a non-empty list of examples", {"option": what})
    if len(examples) > MAX_EXAMPLES:
        raise InvalidInputs(
            f"{what} has {len(examples)} examples, over the limit of {MAX_EXAMPLES}",
            {"option": what},
        )
    for n, example in enumerate(examples):
        if not isinstance(example, Mapping) or not example:
            raise InvalidInputs(f"{what}[{n}] must be a non-empty JSON object", {"option": what})
        if not all(isinstance(k, str) for k in example):
            raise InvalidInputs(f"{what}[{n}] has a key that is not a string", {"option": what})
    return [dict(e) for e in examples]


def check_encoded_size(size: int, limit: int, what: str) -> None:
    """Raise ``PayloadTooLarge`` if ``what``, ``size`` bytes encoded, is over ``limit``."""
    if size > limit:
        raise PayloadTooLarge(
            f"{what} is {size} bytes encoded, over the limit of {limit}",
            {"size_bytes": size, "limit_bytes": limit},
        )


def check_size(examples: list[dict[str, Any]], limit: int, what: str) -> list[dict[str, Any]]:
    """``examples`` if their JSON is at most ``limit`` bytes. Raises ``PayloadTooLarge``."""
    check_encoded_size(len(orjson.dumps(examples)), limit, what)
    return examples


def example_fields(examples: list[dict[str, Any]], signature: Mapping[str, Any], what: str) -> None:
    """Check that every example carries the signature's inputs and at least one of its
    outputs (the label a metric compares against).

    Raises:
        InvalidInputs: an example lacks an input field or every output field.
    """
    inputs = [f["name"] for f in signature["inputs"]]
    outputs = [f["name"] for f in signature["outputs"]]
    for n, example in enumerate(examples):
        missing = [name for name in inputs if name not in example]
        if missing:
            raise InvalidInputs(
                f"{what}[{n}] lacks input field(s) {', '.join(missing)}", {"option": what}
            )
        if not any(name in example for name in outputs):
            raise InvalidInputs(
                f"{what}[{n}] has no output field ({', '.join(outputs)}) to score against",
                {"option": what},
            )
