"""A complete answer as a stream of small text deltas (for in-process engines).

DSPy engines stream ``start``, ``delta``..., ``end`` events; an engine that has its whole
answer at once (``dspex/echo``, test doubles) streams it in word-sized pieces, so a
streamed run downstream sees what it sees with a provider.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from dspy.lm15 import Response, StreamDeltaEvent, StreamEndEvent, StreamStartEvent, TextDelta

__all__ = ["pieces", "response_events"]

_PIECE = re.compile(r"\s*\S+|\s+")


def pieces(text: str) -> list[str]:
    """``text`` cut before each word (the whitespace goes with the word after it)."""
    return _PIECE.findall(text)


def response_events(response: Response) -> Iterator[Any]:
    """``response`` as stream events: its text in word-sized deltas, then its end."""
    yield StreamStartEvent(id=response.id, model=response.model)
    text = "".join(getattr(p, "text", "") or "" for p in response.message.parts)
    for piece in pieces(text):
        yield StreamDeltaEvent(delta=TextDelta(text=piece, part_index=0))
    yield StreamEndEvent(
        finish_reason=response.finish_reason,
        usage=response.usage,
        provider_data=response.provider_data,
    )
