"""Registers the shared harness in ``tests/support`` (fixtures, the in-process worker,
the reliability report). ``tests/`` is on ``sys.path`` (pytest's rootdir-relative
"prepend" import mode), so ``support`` imports as a top-level package."""

from __future__ import annotations

import os

# Keep litellm (via dspy) off the network under plain `pytest` too; mirrors
# with-redis.sh. Must happen before any test module (or plugin below) imports dspy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")

pytest_plugins = ["support.fixtures", "support.worker", "support.reliability"]
