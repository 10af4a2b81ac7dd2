"""Worker health checks for probes: ``python -m workers.liveness [--ping]``.

Two checks, exit status 0 (healthy) or 1 (not):

- default: the heartbeat file (see :mod:`workers.heartbeat`) is younger than
  ``--max-age-s``. Local and cheap (stdlib only, no broker round trip), so a Redis outage
  alone does not fail it while the worker's event loop keeps ticking. Use it for
  Kubernetes startup, readiness and liveness probes.
- ``--ping``: the worker answers a Celery ``ping`` control message through the broker
  (``celery inspect ping`` for this host's node). End to end, but it fails whenever the
  broker is unreachable: use it for Docker's HEALTHCHECK (reporting only), not for a
  probe that restarts containers.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_MAX_AGE_S", "check_heartbeat", "main", "ping_worker"]

#: Heartbeats come every 2 s; a minute of silence is far outside normal jitter.
DEFAULT_MAX_AGE_S = 60.0

# The same default as workers.heartbeat.DEFAULT_PATH, without importing Celery here:
# the probe runs every few seconds and must start fast.
_DEFAULT_PATH = Path(tempfile.gettempdir()) / "dspex-worker.heartbeat"


def check_heartbeat(
    path: str | Path = _DEFAULT_PATH,
    max_age_s: float = DEFAULT_MAX_AGE_S,
    *,
    now: float | None = None,
) -> tuple[bool, str]:
    """Whether the heartbeat file at ``path`` was touched within ``max_age_s`` seconds.

    Returns:
        ``(healthy, reason)``; the reason is a one-line explanation for probe logs.
    """
    try:
        mtime = Path(path).stat().st_mtime
    except FileNotFoundError:
        return False, f"no heartbeat file at {path}: the worker's consumer has not started"
    except OSError as e:
        return False, f"cannot read heartbeat file {path}: {e}"
    age_s = (time.time() if now is None else now) - mtime
    if age_s > max_age_s:
        return False, f"last heartbeat {age_s:.1f} s ago (limit {max_age_s:g} s): consumer stalled"
    return True, f"last heartbeat {max(age_s, 0.0):.1f} s ago"


def ping_worker(app: Any, node: str, timeout_s: float = 5.0) -> tuple[bool, str]:
    """Whether worker ``node`` (e.g. ``celery@host``) answers a ``ping`` within ``timeout_s``."""
    try:
        replies = app.control.ping(destination=[node], timeout=timeout_s) or []
    except Exception as e:  # any broker failure means "not healthy", with the reason
        return False, f"ping failed: {type(e).__name__}: {e}"
    for reply in replies:
        if isinstance(reply, dict) and node in reply:
            return True, f"{node} answered ping"
    return False, f"{node} did not answer ping within {timeout_s:g} s"


def _ping_from_env(node: str, timeout_s: float) -> tuple[bool, str]:
    from dspex_tasks.app import make_celery
    from dspex_tasks.settings import Settings

    app = make_celery(Settings.from_env())
    try:
        return ping_worker(app, node, timeout_s)
    finally:
        app.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workers.liveness", description="dspex worker health check"
    )
    parser.add_argument("--path", type=Path, default=_DEFAULT_PATH, help="heartbeat file")
    parser.add_argument(
        "--max-age-s",
        type=float,
        default=DEFAULT_MAX_AGE_S,
        help=f"oldest acceptable heartbeat, seconds (default {DEFAULT_MAX_AGE_S:g})",
    )
    parser.add_argument(
        "--ping", action="store_true", help="ping the worker through the broker instead"
    )
    parser.add_argument(
        "--node",
        default=f"celery@{socket.gethostname()}",
        help="worker node name for --ping (default celery@<hostname>, Celery's default)",
    )
    parser.add_argument("--timeout-s", type=float, default=5.0, help="--ping reply timeout")
    args = parser.parse_args(argv)
    if args.ping:
        healthy, reason = _ping_from_env(args.node, args.timeout_s)
    else:
        healthy, reason = check_heartbeat(args.path, args.max_age_s)
    print(
        ("ok: " if healthy else "unhealthy: ") + reason, file=sys.stdout if healthy else sys.stderr
    )
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
