"""A heartbeat file the worker touches while its consumer loop runs (for liveness probes).

``install(app, path)`` connects to Celery's ``heartbeat_sent`` signal. Celery sends a
``worker-heartbeat`` event every ``--heartbeat-interval`` seconds (2 s by default) from a
timer of the consumer's event loop, and fires ``heartbeat_sent`` right before each one;
this module touches ``path`` then. ``python -m workers.liveness`` fails when the file is
older than its limit, so a Kubernetes liveness probe restarts a worker whose process is
alive but whose consumer loop has stopped: blocked in a broker reconnect that never
returns, wedged on a half-open socket, deadlocked in the main thread.

What it does not prove: that the consumer still has its ``BRPOP`` registered. A consumer
that lost it while the loop keeps ticking (the "worker stops consuming after a Redis
restart" reports) still touches the file. That failure shows up fleet-wide instead, as
``dspex_queue_oldest_age_seconds`` growing in the exporter: alert on that.

Conditions:
- Install before the worker starts (at import of ``workers.worker``): Celery decides
  whether to fire the signal once, when the consumer's heartbeat service is built.
- Heartbeats must be on (the default; ``--without-heartbeat`` turns them off). They are
  sent whether or not task events (``-E``) are on.
- With the ``solo`` pool a running task blocks the loop: the probe's limit must then
  exceed the hard task time limit. The ``threads`` and ``prefork`` pools keep the loop free.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import heartbeat_sent

__all__ = ["DEFAULT_PATH", "install"]

#: Where the worker writes and the probe reads, unless both are told otherwise.
DEFAULT_PATH = Path(tempfile.gettempdir()) / "dspex-worker.heartbeat"

log = logging.getLogger(__name__)


def install(app: Celery, path: str | os.PathLike[str] = DEFAULT_PATH) -> Callable[[], None]:
    """Touch ``path`` on every event heartbeat that ``app``'s worker sends.

    A file left by an earlier process is removed first, so a fresh file always means this
    process's consumer loop is running.

    Returns:
        A function that disconnects the handler again (tests install and remove it).
    """
    target = Path(path)
    target.unlink(missing_ok=True)
    warned = False

    def beat(sender: Any = None, **_: Any) -> None:
        nonlocal warned
        # Signals are process-wide: count only heartbeats of this app's worker.
        eventer = getattr(sender, "eventer", None)
        if eventer is not None and getattr(eventer, "app", app) is not app:
            return
        try:
            target.touch()
        except OSError as e:
            if not warned:
                log.warning("cannot touch heartbeat file %s: %s", target, e)
                warned = True

    uid = f"dspex-heartbeat-{uuid.uuid4().hex}"
    heartbeat_sent.connect(beat, weak=False, dispatch_uid=uid)

    def uninstall() -> None:
        heartbeat_sent.disconnect(dispatch_uid=uid)

    return uninstall
