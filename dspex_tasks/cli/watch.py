"""``dspex-tasks watch SID``: one line per session event as it happens, until Ctrl-C.

Human lines read ``<id>  <time>  <type>  <what changed>``; ``--json`` prints each event as
one JSON object per line (``{"id", "type", "at", "data"}``), ready for ``jq``. ``--after``
resumes from an event id (``0``: from the oldest kept), so a watcher that was stopped
misses nothing.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import Any

import orjson

from dspex_tasks.cli.output import EXIT_OK, Output, UsageError
from dspex_tasks.client import Client
from dspex_tasks.settings import Settings
from dspex_tasks.store import Event

__all__ = ["add_watch_arguments", "format_event", "watch"]


def add_watch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("session_id", metavar="SID")
    p.add_argument("--names", metavar="A,B", help="only these variables' events")
    p.add_argument("--types", metavar="T,U", help="only these event types")
    p.add_argument(
        "--after",
        default="$",
        metavar="ID",
        help="resume after this event id (0: from the oldest kept; default: from now)",
    )
    p.add_argument(
        "--timeout", type=float, metavar="S", help="stop after S seconds without an event"
    )


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise UsageError("expected a comma-separated list")
    return items


def format_event(event: Event) -> str:
    """The human line of one event."""
    data: dict[str, Any] = dict(event.data)
    if event.type.startswith("variable."):
        value = orjson.dumps(data.get("value")).decode()
        what = f"{data['name']}={value} (v{data['version']})"
        if data.get("run_id"):
            what += f" run={data['run_id']}"
    else:
        what = orjson.dumps(data).decode()
    return f"{event.id}  {event.at.isoformat(timespec='milliseconds')}  {event.type}  {what}"


#: Longest a watch waits inside one read: how soon it notices Ctrl-C without an event.
_POLL_S = 0.5


def watch(args: argparse.Namespace, out: Output, extra: list[str]) -> int:
    names, types = _split(args.names), _split(args.types)
    # Ctrl-C sets a flag that the loop checks between reads, so the watch ends where it
    # chooses (connections closed in order), not wherever a KeyboardInterrupt lands.
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        with Client(settings=Settings.from_env()) as client:
            session = client.session(args.session_id)
            cursor = args.after
            if cursor == "$":
                cursor = client.store.last_event_id(args.session_id)
            quiet_since = time.monotonic()
            while not stop.is_set():
                for event in session.watch(names=names, types=types, after=cursor, block_s=_POLL_S):
                    cursor = event.id
                    quiet_since = time.monotonic()
                    line = (
                        orjson.dumps(event.to_dict()).decode()
                        if out.json_mode
                        else format_event(event)
                    )
                    sys.stdout.write(line + "\n")
                    sys.stdout.flush()
                    if stop.is_set():
                        break
                if args.timeout is not None and time.monotonic() - quiet_since >= args.timeout:
                    break
    finally:
        signal.signal(signal.SIGINT, previous)
    return EXIT_OK
