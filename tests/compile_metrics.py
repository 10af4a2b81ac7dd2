"""A worker metric module for the compile tests (``DSPEX_METRIC_MODULES=compile_metrics``)."""

from __future__ import annotations

from typing import Any

from dspex_tasks.metrics import metric


@metric(name="answer_startswith")
def answer_startswith(example: Any, prediction: Any, trace: Any = None) -> float:
    """1.0 when the predicted answer starts with the expected one."""
    return float(str(getattr(prediction, "answer", "")).startswith(str(example.answer)))
