"""Metrics for compile jobs: Python functions registered on the worker by name.

Like tools (``tools.py``), producers name a metric and never send code: the built-in
``exact_match``, ``contains`` and ``f1``, or one a worker module registers with
``@metric`` (``DSPEX_METRIC_MODULES``, imported once at start-up).

A metric is called as DSPy calls one, ``metric(example, prediction, trace=None)``, and
answers a score in [0, 1] (a bool counts as 0 or 1). The built-ins compare every label
of the example (its fields that are not inputs) with the prediction's field of the same
name, and average over the labels.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

from dspex_tasks.compile_request import BUILTIN_METRICS, METRIC_NAME_RE
from dspex_tasks.errors import InvalidInputs
from dspex_tasks.registry import Registry

__all__ = [
    "get_metric",
    "load_metric_modules",
    "metric",
    "registered_metrics",
    "unregister_metric",
]

F = TypeVar("F", bound=Callable[..., Any])
_METRICS = Registry("metric", "DSPEX_METRIC_MODULES", METRIC_NAME_RE)
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


@overload
def metric(func: F) -> F: ...
@overload
def metric(*, name: str | None = None) -> Callable[[F], F]: ...
def metric(func: F | None = None, *, name: str | None = None) -> F | Callable[[F], F]:
    """Register ``func`` as a metric (``@metric`` or ``@metric(name="bleu")``)."""
    return _METRICS.decorator(func, name)


def unregister_metric(name: str) -> None:
    if name in BUILTIN_METRICS:
        raise ValueError(f"{name!r} is a built-in metric")
    _METRICS.unregister(name)


def registered_metrics() -> list[str]:
    return _METRICS.names()


def get_metric(name: str) -> Callable[..., Any]:
    """The metric registered as ``name``. Raises ``InvalidInputs`` if none is."""
    found, _ = _METRICS.lookup([name])
    if not found:
        raise InvalidInputs(
            f"metric {name!r} is not registered on this worker "
            f"(metrics: {', '.join(_METRICS.names())})",
            {"option": "metric"},
        )
    return found[0]


def load_metric_modules(modules: Iterable[str]) -> None:
    """Import the configured metric modules (each registers its metrics with ``@metric``)."""
    _METRICS.load_modules(modules)


# --- the built-ins ----------------------------------------------------------------------


def _normalize(value: Any) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalization)."""
    text = _PUNCT.sub(" ", str(value).casefold())
    return " ".join(w for w in text.split() if w not in {"a", "an", "the"})


def _labels(example: Any) -> list[tuple[str, Any]]:
    labels = example.labels() if hasattr(example, "labels") else example
    return [(k, v) for k, v in labels.items() if not str(k).startswith("dspy_")]


def _per_label(score: Callable[[str, str], float]) -> Callable[..., float]:
    def averaged(example: Any, prediction: Any, trace: Any = None) -> float:
        pairs = _labels(example)
        if not pairs:
            return 0.0
        total = 0.0
        for name, expected in pairs:
            got = getattr(prediction, name, None)
            total += 0.0 if got is None else score(_normalize(expected), _normalize(got))
        return total / len(pairs)

    return averaged


def _f1(expected: str, got: str) -> float:
    want, have = expected.split(), got.split()
    common = sum((Counter(want) & Counter(have)).values())
    if not want or not have or common == 0:
        return float(want == have)
    precision, recall = common / len(have), common / len(want)
    return 2 * precision * recall / (precision + recall)


metric(name="exact_match")(_per_label(lambda expected, got: float(expected == got)))
metric(name="contains")(_per_label(lambda expected, got: float(bool(expected) and expected in got)))
metric(name="f1")(_per_label(_f1))
