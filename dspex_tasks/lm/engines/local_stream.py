"""The local model's JSON answer, as it is generated, rendered into ChatAdapter text.

``dspex/local`` generates a JSON object (grammar-constrained) and answers with it
rendered as ChatAdapter sections (:func:`~dspex_tasks.lm.engines.local_schema.render`).
To stream, :class:`ChatRenderStream` scans the JSON token by token and gives out the
part of the rendered answer that can no longer change: the sections of the fields whose
value is complete, then the header of the field being generated and, for a ``str``
field, its text so far (decoded, cleaned as ``render`` cleans it, holding back trailing
whitespace, a ``[`` that may become ``[[``, and an incomplete escape).

Whatever the JSON turns out to be (cut off at ``max_tokens``, salvaged, a field
defaulted), everything given out is a prefix of the final rendered text, and
:meth:`ChatRenderStream.finish` gives the rest: the deltas concatenate to exactly what
the unstreamed engine answers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from dspex_tasks.lm.engines.local_schema import (
    _answered,
    _chat_value,
    _coerce,
    _conforms,
    _default,
    _Field,
)

__all__ = ["ChatRenderStream"]

_SPACE = " \t\n\r"


def _header(name: str) -> str:
    return f"[[ ## {name} ## ]]\n"


def _partial_string(body: str) -> str:
    """The decoded text of an unterminated JSON string body (an incomplete escape at
    the end, or a high surrogate waiting for its pair, held back)."""
    for cut in range(len(body), max(-1, len(body) - 12), -1):
        try:
            text: str = json.loads('"' + body[:cut] + '"', strict=False)
        except ValueError:
            continue
        if text and "\ud800" <= text[-1] <= "\udbff":
            text = text[:-1]
        return text
    return ""


def _clean_prefix(text: str) -> str:
    """What of ``local_schema._clean_text(v)`` is known for any ``v`` starting with
    ``text``: a trailing ``[`` may pair with the next one, trailing space may be
    stripped."""
    return text.rstrip("[").replace("[[", "[ [").strip()


class ChatRenderStream:
    """Feed the raw JSON text in pieces; get the new rendered text each time."""

    def __init__(self, fields: Sequence[_Field]) -> None:
        self.fields = list(fields)
        self.sent = ""
        self._raw = ""
        self._pos = 0
        # The scanner (outside the top-level object's values it only tracks nesting).
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._expect = "object"  # object, key, key_str, colon, value, in_value, end
        self._key_start = 0
        self._key = ""
        #: (key, value start, value end or None while it is generated), in order.
        self._spans: list[tuple[str, int, int | None]] = []
        self._done = ""  # the sections of the fields complete so far
        self._next = 0  # the next field to render
        self._frozen = False  # the JSON left the expected order: stream no more

    def feed(self, piece: str) -> str:
        self._raw += piece
        self._scan()
        if self._frozen:
            return ""
        text = self._render()
        if not text.startswith(self.sent):  # pragma: no cover - cannot happen (see above)
            self._frozen = True
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def finish(self, final: str) -> str:
        """The rest of ``final`` (the whole rendered answer) after what was given out.

        Raises:
            RuntimeError: ``final`` does not start with what was given out.
        """
        if not final.startswith(self.sent):
            raise RuntimeError("dspex/local: the streamed answer is not a prefix of the answer")
        delta, self.sent = final[len(self.sent) :], final
        return delta

    # --- scanning ----------------------------------------------------------------------

    def _scan(self) -> None:
        raw = self._raw
        for i in range(self._pos, len(raw)):
            c = raw[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
                    if self._expect == "key_str":
                        try:
                            self._key = json.loads(raw[self._key_start : i + 1], strict=False)
                        except ValueError:
                            self._frozen = True
                        self._expect = "colon"
                continue
            if self._depth == 1 and self._expect == "value" and c not in _SPACE:
                self._spans.append((self._key, i, None))
                self._expect = "in_value"
            if c == '"':
                self._in_string = True
                if self._depth == 1 and self._expect == "key":
                    self._key_start = i
                    self._expect = "key_str"
            elif c in "{[":
                self._depth += 1
                if self._depth == 1:
                    self._expect = "key"
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._end_value(i)
                    self._expect = "end"
            elif self._depth == 1 and c == ":" and self._expect == "colon":
                self._expect = "value"
            elif self._depth == 1 and c == ",":
                self._end_value(i)
                self._expect = "key"
        self._pos = len(raw)

    def _end_value(self, end: int) -> None:
        if self._expect == "in_value":
            key, start, _ = self._spans[-1]
            self._spans[-1] = (key, start, end)

    # --- rendering ---------------------------------------------------------------------

    def _render(self) -> str:
        while self._next < len(self._spans):
            f = self.fields[self._next] if self._next < len(self.fields) else None
            key, start, end = self._spans[self._next]
            if f is None or key != f.name:
                self._frozen = True
                return self.sent
            if end is None:
                break
            try:
                value = _coerce(f.type, json.loads(self._raw[start:end], strict=False))
            except ValueError:
                self._frozen = True
                return self.sent
            if not _conforms(f.type, value):
                value = _default(f.type)
            self._done += _header(f.name) + _chat_value(f, value) + "\n\n"
            self._next += 1
        text = self._done
        if self._next < len(self._spans):
            f = self.fields[self._next]
            start = self._spans[self._next][1]
            text += _header(f.name)
            if _answered(f.type).kind == "str" and self._raw[start] == '"':
                text += _clean_prefix(_partial_string(self._raw[start + 1 :]))
        return text
