"""Command lines of the service's processes: Celery worker, beat and Flower.

One place builds them, so ``dspex-tasks worker|beat|flower`` (which exec them) and
``dspex-tasks dev`` (which supervises them) start exactly the same processes. Every
command runs Celery as ``<this python> -m celery``, so it uses this environment's
packages whatever ``PATH`` says.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from dspex_tasks.app import LM_QUEUE, MAINTENANCE_QUEUE
from dspex_tasks.errors import ConfigError
from dspex_tasks.lm.offline import keep_litellm_offline
from dspex_tasks.settings import Settings

__all__ = [
    "BEAT_APP",
    "DEFAULT_LOGLEVEL",
    "FLOWER_APP",
    "WORKER_APP",
    "api_argv",
    "beat_argv",
    "child_env",
    "flower_argv",
    "flowerconfig_path",
    "worker_argv",
]

WORKER_APP = "workers.worker"
BEAT_APP = "workers.beat"
#: Flower's app: it knows the task names (for ``/api/task/async-apply``) without DSPy.
FLOWER_APP = "workers.monitor"
#: Per-task INFO log lines cost ~17 % of throughput (environment-facts.md §5c).
DEFAULT_LOGLEVEL = "WARNING"
#: Set in Flower's environment to run it without basic auth (loopback use only).
ALLOW_NO_AUTH_ENV = "DSPEX_FLOWER_ALLOW_NO_AUTH"  # Settings.flower_allow_no_auth


def _celery(app: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", app, *args]


def worker_argv(
    settings: Settings,
    *,
    loglevel: str = DEFAULT_LOGLEVEL,
    pool: str | None = None,
    concurrency: int | None = None,
    queues: Sequence[str] = (LM_QUEUE, MAINTENANCE_QUEUE),
    hostname: str | None = None,
    events: bool = True,
    without_mingle: bool = False,
    without_gossip: bool = False,
    extra: Sequence[str] = (),
) -> list[str]:
    """``celery -A workers.worker worker`` with the service's defaults.

    Pool and concurrency come from settings (threads x 32: LM calls are I/O bound);
    ``-E`` turns task events on for Flower; both queues are consumed.
    """
    argv = _celery(
        WORKER_APP,
        "worker",
        f"--pool={pool or settings.worker_pool}",
        f"--concurrency={concurrency or settings.worker_concurrency}",
        f"--queues={','.join(queues)}",
        f"--loglevel={loglevel}",
    )
    if events:
        argv.append("--task-events")
    if hostname:
        argv.append(f"--hostname={hostname}")
    if without_mingle:
        argv.append("--without-mingle")
    if without_gossip:
        argv.append("--without-gossip")
    return [*argv, *extra]


def beat_argv(
    state_dir: Path, *, loglevel: str = DEFAULT_LOGLEVEL, extra: Sequence[str] = ()
) -> list[str]:
    """``celery -A workers.beat beat`` with its schedule file under ``state_dir``.

    No pidfile: a stale one left by a killed beat would block the next start, and the
    supervisor (dev, systemd, Kubernetes) tracks the process itself.
    """
    return [
        *_celery(
            BEAT_APP,
            "beat",
            f"--schedule={state_dir / 'beat-schedule'}",
            "--pidfile=",
            f"--loglevel={loglevel}",
        ),
        *extra,
    ]


def flowerconfig_path() -> str:
    """Absolute path of ``workers/flowerconfig.py`` (Flower execs it; it is not imported)."""
    spec = importlib.util.find_spec("workers.flowerconfig")
    if spec is None or spec.origin is None:
        raise ConfigError("cannot find workers/flowerconfig.py: is dspex-tasks installed?")
    return spec.origin


def flower_argv(extra: Sequence[str] = ()) -> list[str]:
    """``celery -A workers.monitor flower --conf=workers/flowerconfig.py``.

    Address, port and basic auth come from the config file (``DSPEX_FLOWER_*``).
    """
    return [*_celery(FLOWER_APP, "flower", f"--conf={flowerconfig_path()}"), *extra]


def api_argv(address: str, port: int, *, loglevel: str = DEFAULT_LOGLEVEL) -> list[str]:
    """``dspex-tasks api`` as a child process (this interpreter, this package)."""
    return [
        *(sys.executable, "-m", "dspex_tasks.cli", "api"),
        *("--address", address, "--port", str(port), "--loglevel", loglevel),
    ]


def child_env(base: Mapping[str, str] | None = None, /, **overrides: str) -> dict[str, str]:
    """An environment for a child process: ``base`` (default ``os.environ``), litellm kept
    offline unless the caller chose otherwise, and ``overrides`` on top."""
    env = dict(os.environ if base is None else base)
    keep_litellm_offline(env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(overrides)
    return env
