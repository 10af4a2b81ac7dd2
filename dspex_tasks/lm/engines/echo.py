"""``dspex/echo``: a deterministic offline LM engine, clearly labelled as such.

It reads the output fields (name and type) from DSPy's ChatAdapter system message and
answers every field with a value of the right type derived from the request, so
Predict, ChainOfThought and stored programs always parse. It needs no network, no key
and no model file: it is the dev stack's fallback when no real LM is configured, and a
load harness for measuring the service without an LM's latency.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

from dspy.lm15 import Message, Response, TextPart, Usage

from dspex_tasks.lm.engines.chat_format import chat_sections, output_fields

__all__ = ["EchoEngine"]

_LITERAL = re.compile(r"^Literal\[(.*)\]$")


def _literal_choices(type_text: str) -> list[str]:
    match = _LITERAL.match(type_text.strip())
    if not match:
        return []
    return [c.strip().strip("'\"") for c in match.group(1).split(",") if c.strip()]


def _value(name: str, type_text: str, seed: int, words: list[str]) -> str:
    choices = _literal_choices(type_text)
    if choices:
        return "finish" if "finish" in choices else choices[seed % len(choices)]
    if type_text == "int":
        return str(seed % 100)
    if type_text == "float":
        return f"{(seed % 1000) / 10:.1f}"
    if type_text == "bool":
        return "True" if seed % 2 == 0 else "False"
    if type_text.startswith("list"):
        return '["' + '", "'.join(words[:3] or ["echo"]) + '"]'
    if type_text.startswith("dict"):
        return "{}"
    return f"echo {name}: " + " ".join(words[:12])


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
        return Response(
            id=None,
            model=self.model,
            message=Message.assistant([TextPart(text)]),
            finish_reason="stop",
            usage=Usage(
                input_tokens=prompt_tokens,
                output_tokens=output_tokens,
                total_tokens=prompt_tokens + output_tokens,
            ),
        )

    def stream(self, request: Any) -> Any:
        raise NotImplementedError("dspex/echo does not stream")

    def close(self) -> None:
        return None
