"""Keeps litellm off the network: the environment an LM-calling process starts with.

Without it, litellm (under dspy) fetches its model price map on the first LM call (or
``import litellm``), waiting up to 5 s per attempt where outbound traffic is dropped;
with it, the bundled copy is used. Set by the process's entry point, never on import.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

__all__ = ["OFFLINE_ENV", "keep_litellm_offline"]

OFFLINE_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_OFFLINE_MODE": "true"}


def keep_litellm_offline(environ: MutableMapping[str, str] | None = None) -> None:
    """Set :data:`OFFLINE_ENV` in ``environ`` (default ``os.environ``) where not set yet.

    Call it before the first LM is built (litellm and DSPy read these lazily). A value
    already set wins, so an operator can still opt into the live price map.
    """
    env = os.environ if environ is None else environ
    for name, value in OFFLINE_ENV.items():
        env.setdefault(name, value)
