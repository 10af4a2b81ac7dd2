"""Pacing shared by the readers that tail a Redis Stream (the session event log, run
streams), sync and asyncio alike: they differ only in how they call Redis.

A reader blocks on ``XREAD`` in chunks of at most ``BLOCK_CHUNK_S`` (well inside the
client's socket timeout), checks between quiet chunks that its session still exists,
and gives up after ``block_s`` without an entry (``None``: never).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from dspex_tasks.errors import SessionNotFound

__all__ = ["BLOCK_CHUNK_S", "Pacer", "entries_of", "session_gone"]

BLOCK_CHUNK_S = 1.0


class Pacer:
    """How long the next blocking read may wait, and when a quiet reader gives up."""

    def __init__(self, block_s: float | None) -> None:
        self.block_s = block_s
        self._quiet_since = time.monotonic()

    def block_ms(self) -> int:
        wait_s = BLOCK_CHUNK_S
        if self.block_s is not None:
            left = self._quiet_since + self.block_s - time.monotonic()
            wait_s = min(wait_s, max(0.0, left))
        return max(1, int(wait_s * 1000))

    def heard(self) -> None:
        self._quiet_since = time.monotonic()

    def gave_up(self) -> bool:
        return self.block_s is not None and time.monotonic() - self._quiet_since >= self.block_s


def entries_of(reply: Any) -> Sequence[Any]:
    """The entries of a one-stream ``XREAD`` reply (none when it timed out)."""
    return reply[0][1] if reply else ()


def session_gone(sid: str) -> SessionNotFound:
    return SessionNotFound(f"session {sid!r} not found", {"session_id": sid})
