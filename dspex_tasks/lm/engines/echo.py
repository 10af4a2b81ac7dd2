"""``dspex/echo``: a deterministic offline LM engine, clearly labelled as such.

It reads the output fields (name and type) from DSPy's ChatAdapter system message and
answers every field with a value of the right type derived from the request, so
Predict, ChainOfThought and stored programs always parse. It needs no network, no key
and no model file: it is the dev stack's fallback when no real LM is configured, and a
load harness for measuring the service without an LM's latency.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from dspy.lm15 import Response

from dspex_tasks.field_types import FieldType, TypeSyntaxError, parse_type
from dspex_tasks.lm.engines.chat_format import chat_sections, output_fields
from dspex_tasks.lm.engines.chunked import response_events, text_response

__all__ = ["EchoEngine"]


def _typed(t: FieldType, seed: int, words: list[str]) -> Any:
    """A JSON value of type ``t`` derived from ``seed`` and the question's words."""
    if t.kind == "optional":
        assert t.item is not None
        return _typed(t.item, seed, words)
    if t.kind == "literal":
        return "finish" if "finish" in t.choices else t.choices[seed % len(t.choices)]
    if t.kind == "int":
        return seed % 100
    if t.kind == "float":
        return (seed % 1000) / 10
    if t.kind == "bool":
        return seed % 2 == 0
    if t.kind == "list":
        assert t.item is not None
        item = t.item
        if _plain(item) == "str":
            return list(words[:3] or ["echo"])
        return [_typed(item, seed + i, words) for i in range(2)]
    if t.kind == "dict":
        return {} if t.item is None else {"key": _typed(t.item, seed, words)}
    return " ".join(words[:3] or ["echo"])


def _plain(t: FieldType) -> str:
    return _plain(t.item) if t.kind == "optional" and t.item is not None else t.kind


def _value(name: str, type_text: str, seed: int, words: list[str]) -> str:
    try:
        t = parse_type(type_text, rendered=True)
    except TypeSyntaxError:
        t = FieldType("str")
    kind = _plain(t)
    if kind == "str":
        return f"echo {name}: " + " ".join(words[:12])
    value = _typed(t, seed, words)
    if kind == "float":
        return f"{value:.1f}"
    if kind in {"int", "literal"}:
        return str(value)
    if kind == "bool":
        return "True" if value else "False"
    return json.dumps(value, ensure_ascii=False)


class EchoEngine:
    """A DSPy engine (``complete(Request) -> Response``) that answers deterministically."""

    model = "dspex/echo"

    def complete(self, request: Any) -> Response:
        system = request.system if isinstance(request.system, str) else ""
        if not isinstance(request.system, (str, type(None))):
            system = "".join(getattr(p, "text", "") for p in request.system)
        user = "\n".join((m.text or "") for m in request.messages if m.role == "user")
        # The question text, without the adapter's field markers and closing instruction.
        content_lines = [
            ln
            for ln in user.split("Respond with the corresponding output fields")[0].splitlines()
            if ln.strip() and not ln.startswith("[[ ##")
        ]
        words = " ".join(content_lines[:4]).split()
        seed = zlib.crc32(user.encode())
        text = chat_sections(
            (name, _value(name, type_text, seed, words))
            for name, type_text in output_fields(system)
        )
        prompt_tokens = (len(system) + len(user)) // 4
        output_tokens = len(text) // 4
        return text_response(self.model, text, prompt_tokens, output_tokens)

    def stream(self, request: Any) -> Any:
        """The same answer, word by word (a streamed run)."""
        return response_events(self.complete(request))

    def close(self) -> None:
        return None
