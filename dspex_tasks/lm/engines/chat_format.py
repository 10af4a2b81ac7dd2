"""DSPy ChatAdapter's answer format, read and written without dspy.

Our engines (and the tests' fake LM) answer as a model prompted by the ChatAdapter
would: they read the output fields from its system prompt and reply in
``[[ ## field ## ]]`` sections, so DSPy's own parser accepts the answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["chat_sections", "output_fields"]

_FIELD_LINE = re.compile(r"^\d+\. `(\w+)` \((.*?)\):", re.MULTILINE)


def output_fields(system: str) -> list[tuple[str, str]]:
    """``[(name, type_text)]`` of the output fields listed in a ChatAdapter system prompt."""
    start = system.find("Your output fields are:")
    if start < 0:
        return []
    end = system.find("All interactions will be structured", start)
    section = system[start : end if end > 0 else None]
    return _FIELD_LINE.findall(section)


def chat_sections(pairs: Iterable[tuple[str, str]]) -> str:
    """An answer in ChatAdapter's format: ``[[ ## name ## ]]`` sections, then completed."""
    return "".join(f"[[ ## {name} ## ]]\n{value}\n\n" for name, value in pairs) + (
        "[[ ## completed ## ]]\n"
    )
