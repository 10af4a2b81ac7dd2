"""Importing ``dspex_tasks.lm`` has no side effect on the process environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from dspex_tasks.lm import OFFLINE_ENV, keep_litellm_offline

# Every module of the package, the heavy ones included: each must import without
# touching os.environ (the environment is set by the process's entry point).
_IMPORT_ALL = """
import json, os, sys
before = dict(os.environ)
import dspex_tasks.lm
import dspex_tasks.lm.engines.chat_format
import dspex_tasks.lm.engines.echo
import dspex_tasks.lm.engines.local
import dspex_tasks.lm.engines.local_schema
import dspex_tasks.lm.params
import dspex_tasks.lm.profiles
after = dict(os.environ)
changed = sorted(k for k in {*before, *after} if before.get(k) != after.get(k))
sys.stdout.write(json.dumps(changed))
"""


def test_importing_the_lm_package_leaves_os_environ_unchanged() -> None:
    # Without the offline variables (conftest sets them here), so that setting them on
    # import would show.
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV}
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_keep_litellm_offline_sets_only_what_is_unset() -> None:
    env = {"LITELLM_OFFLINE_MODE": "false"}
    keep_litellm_offline(env)
    assert env == {**OFFLINE_ENV, "LITELLM_OFFLINE_MODE": "false"}
