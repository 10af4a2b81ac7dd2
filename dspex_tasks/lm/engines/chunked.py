"""A complete answer as a DSPy response, and as a stream of small text deltas (for
in-process engines).

DSPy engines stream ``start``, ``delta``..., ``end`` events; an engine that has its whole
answer at once (``dspex/echo``, test doubles) streams it in word-sized pieces, so a
streamed run downstream sees what it sees with a provider.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from dspy.lm15 import (
    Message,
    Response,
    StreamDeltaEvent,
    StreamEndEvent,
    StreamStartEvent,
    TextDelta,
    TextPart,
    Usage,
)

__all__ = ["pieces", "response_events", "text_response"]

_PIECE = re.compile(r"\s*\S+|\s+")


def pieces(text: str) -> list[str]:
    """``text`` cut before each word (the whitespace goes with the word after it)."""
    return _PIECE.findall(text)


def text_response(model: str, text: str, input_tokens: int, output_tokens: int) -> Response:
    """A finished answer of ``text`` with its token counts."""
    return Response(
        id=None,
        model=model,
        message=Message.assistant([TextPart(text)]),
        finish_reason="stop",
        usage=Usage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            total_tokens=input_tokens + output_tokens,
        ),
    )


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
