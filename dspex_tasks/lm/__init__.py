"""The LMs a worker calls: profiles -> DSPy LM objects, the params a session may set, engines.

Producers import this package too (the store validates a session's LM settings), so
importing it stays cheap (no dspy, no llama_cpp) and changes nothing: the profile
registry needs dspy and is loaded on first use of its names, and the environment a
worker needs is set by its entry point (:func:`keep_litellm_offline`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dspex_tasks.lm.offline import OFFLINE_ENV, keep_litellm_offline
from dspex_tasks.lm.params import SAFE_LM_PARAMS, validate_lm_params, validate_lm_settings

if TYPE_CHECKING:
    from dspex_tasks.lm.profiles import (
        BUILTIN_ENGINES,
        ECHO_MODEL,
        LOCAL_MODEL,
        LMRegistry,
        bound_params,
        memoize_model_metadata,
        snapshot_proxy_environment,
    )

__all__ = [
    "BUILTIN_ENGINES",
    "ECHO_MODEL",
    "LOCAL_MODEL",
    "OFFLINE_ENV",
    "SAFE_LM_PARAMS",
    "LMRegistry",
    "bound_params",
    "keep_litellm_offline",
    "memoize_model_metadata",
    "snapshot_proxy_environment",
    "validate_lm_params",
    "validate_lm_settings",
]

_PROFILE_NAMES = frozenset(
    {
        "BUILTIN_ENGINES",
        "ECHO_MODEL",
        "LOCAL_MODEL",
        "LMRegistry",
        "bound_params",
        "memoize_model_metadata",
        "snapshot_proxy_environment",
    }
)


def __getattr__(name: str) -> Any:
    if name in _PROFILE_NAMES:
        return getattr(importlib.import_module("dspex_tasks.lm.profiles"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
