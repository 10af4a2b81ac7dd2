"""``test/slow``: a test-only LM engine that sleeps on request and logs every call.

It answers like ``dspex/echo`` (typed ChatAdapter output for every field), but first
sleeps ``N`` seconds when the last user message carries ``SLEEP[N]``, and when it carries
``GATE[P]`` waits while another process holds an exclusive ``flock`` on the file ``P`` (so
a test can end many calls at one moment: it locks the file before sending them and lets
go once they have all started; a test that dies lets go too). Every call is
appended to the file named by ``DSPEX_TEST_LM_LOG`` (``start <marker> <pid>`` before the
sleep, ``end <marker> <pid>`` after it), so a test can count LM calls across worker
processes, see which process runs a task right now, and kill it mid-call. Lines are
written with one ``O_APPEND`` write each, which is atomic between processes.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from pathlib import Path
from typing import Any

from dspex_tasks.lm.engines.echo import EchoEngine

__all__ = ["LOG_ENV", "MODEL", "SlowEngine", "calls", "parse_log"]

MODEL = "test/slow"
LOG_ENV = "DSPEX_TEST_LM_LOG"
_SLEEP = re.compile(r"SLEEP\[([0-9.]+)\]")
_MARK = re.compile(r"MARK\[([A-Za-z0-9_.:@-]+)\]")
_GATE = re.compile(r"GATE\[([^\]]+)\]")


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class SlowEngine(EchoEngine):
    """EchoEngine that sleeps ``SLEEP[N]`` seconds and logs each call's start and end."""

    model = MODEL

    def complete(self, request: Any) -> Any:
        user = "\n".join((m.text or "") for m in request.messages if m.role == "user")
        sleep = _SLEEP.search(user)
        found = _MARK.search(user)
        marker = found.group(1) if found else "-"
        log = os.environ.get(LOG_ENV)
        if log:
            _append(log, f"start {marker} {os.getpid()}\n")
        if sleep:
            time.sleep(float(sleep.group(1)))
        gate = _GATE.search(user)
        if gate:
            with open(gate.group(1)) as held:
                fcntl.flock(held, fcntl.LOCK_SH)  # blocks until the test lets go
        response = super().complete(request)
        if log:
            _append(log, f"end {marker} {os.getpid()}\n")
        return response


def parse_log(path: Path) -> list[tuple[str, str, int]]:
    """``[(event, marker, pid)]`` from an LM log file (missing file: no calls)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.append((parts[0], parts[1], int(parts[2])))
    return out


def calls(path: Path, marker: str) -> list[int]:
    """Pids of the processes that started an LM call for ``marker``, in order."""
    return [pid for event, m, pid in parse_log(path) if event == "start" and m == marker]
