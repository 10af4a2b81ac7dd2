"""The pure half of ``dspex/local``: DSPy's adapter prompt <-> the JSON the model writes.

In: the output fields and their types, read from the adapter's system prompt, become
the JSON schema generation is constrained to (lengths sized from the token budget),
and the conversation becomes a "reply with this JSON object" chat. Out: the model's
JSON, possibly cut off, becomes typed values rendered in the adapter's own format. No
llama_cpp and no model file, so all of it is unit-tested without the ``local-lm`` extra.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dspex_tasks.field_types import FieldType, TypeSyntaxError, parse_type, value_fits
from dspex_tasks.lm.engines.chat_format import chat_sections, output_fields

__all__ = ["json_schema", "render", "salvage"]

_CHARS_PER_TOKEN = 3  # conservative for English; more chars per token just leaves slack
_STR_CHARS = (16, 800)  # bounds for a string field's maxLength
_LIST_ITEM_CHARS = 48
_SYSTEM_HEADER = "Your output fields are:"
_OBJECTIVE = "your objective is:"
_TRAILERS = ("Respond with the corresponding output fields", "Respond with a JSON object")
_HEADER = re.compile(r"\[\[ ## (\w+) ## \]\]")
_FIELD_DESC = re.compile(r"^\d+\. `(\w+)` \((.*?)\):(.*)$", re.MULTILINE)


# --------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class _Field:
    name: str
    type: FieldType
    desc: str = ""

    @property
    def kind(self) -> str:  # str int float bool list dict optional literal
        return self.type.kind

    @property
    def choices(self) -> tuple[str, ...]:
        return self.type.choices


def _field(name: str, type_text: str, desc: str) -> _Field:
    try:
        parsed = parse_type(type_text, rendered=True)
    except TypeSyntaxError:
        parsed = FieldType("str")  # anything else is answered as text
    return _Field(name, parsed, desc)


def _fields(system: str) -> list[_Field]:
    start = system.find(_SYSTEM_HEADER)
    section = system[start:] if start >= 0 else ""
    descs = {m.group(1): m.group(3).strip() for m in _FIELD_DESC.finditer(section)}
    return [_field(n, t, descs.get(n, "")) for n, t in output_fields(system)]


def _answered(t: FieldType) -> FieldType:
    """The type the model writes: an Optional is always answered with a value."""
    while t.kind == "optional" and t.item is not None:
        t = t.item
    return t


def _field_budgets(fields: Sequence[_Field], budget: int) -> dict[str, int]:
    """Tokens for each variable-length field (str, list, dict) out of ``budget``."""
    fixed = 2
    variable = []
    for f in fields:
        t = _answered(f.type)
        fixed += len(f.name) // 3 + 4
        if t.kind in {"int", "float"}:
            fixed += 10
        elif t.kind == "bool":
            fixed += 2
        elif t.kind == "literal":
            fixed += max(len(str(c)) for c in t.choices) // 2 + 3
        else:
            variable.append(f.name)
    share = max(4, (budget - fixed) // max(1, len(variable)))
    return {name: share for name in variable}


_ANY_VALUE = {
    "anyOf": [
        {"type": "string", "maxLength": _LIST_ITEM_CHARS},
        {"type": "number"},
        {"type": "boolean"},
    ]
}


def _schema(t: FieldType, tokens: int, *, nested: bool = False) -> dict[str, Any]:
    """The JSON schema of one value of type ``t``, sized to ``tokens``.

    Containers nest: an item or dict value gets a share of its container's tokens, and
    strings inside containers are short. Optionals are answered with a value (DSPy
    accepts one, and ``null`` would read as the text "None" for ``Optional[str]``).
    """
    t = _answered(t)
    if t.kind == "literal":
        return {"enum": list(t.choices)}
    if t.kind == "int":
        return {"type": "integer"}
    if t.kind == "float":
        return {"type": "number"}
    if t.kind == "bool":
        return {"type": "boolean"}
    if t.kind == "list":
        assert t.item is not None
        item_t = _answered(t.item)
        if item_t.kind in {"int", "float", "bool", "literal"}:
            per_item = 6
        elif item_t.kind == "str":
            per_item = (_LIST_ITEM_CHARS + 4) // _CHARS_PER_TOKEN
        else:
            per_item = max(8, tokens // 3)
        max_items = max(1, min(16, tokens // per_item))
        item = _schema(item_t, per_item, nested=True)
        return {"type": "array", "items": item, "maxItems": max_items}
    if t.kind == "dict":
        if t.item is None:
            return {"type": "object", "additionalProperties": _ANY_VALUE}
        value = _schema(t.item, max(8, tokens // 3), nested=True)
        return {"type": "object", "additionalProperties": value}
    if nested:
        return {"type": "string", "maxLength": _LIST_ITEM_CHARS}
    low, high = _STR_CHARS
    return {"type": "string", "maxLength": max(low, min(high, tokens * _CHARS_PER_TOKEN))}


def json_schema(fields: Sequence[_Field], budget: int) -> dict[str, Any]:
    """The JSON schema the output is constrained to (all fields required, in order)."""
    tokens = _field_budgets(fields, budget)
    return {
        "type": "object",
        "properties": {f.name: _schema(f.type, tokens.get(f.name, 0)) for f in fields},
        "required": [f.name for f in fields],
        "additionalProperties": False,
    }


# --------------------------------------------------------------------------- prompt


def _kind_text(t: FieldType) -> str:
    t = _answered(t)
    if t.kind == "literal":
        return "one of " + ", ".join(json.dumps(c) for c in t.choices)
    if t.kind == "list":
        assert t.item is not None
        item = _answered(t.item)
        if item.kind == "str":
            return "a list of short strings"
        if item.kind in {"int", "float"}:
            return {"int": "a list of integers", "float": "a list of numbers"}[item.kind]
        return f"a list, each item {_kind_text(item)}"
    if t.kind == "dict" and t.item is not None:
        return f"an object, each value {_kind_text(t.item)}"
    return {
        "int": "an integer",
        "float": "a number",
        "bool": "true or false",
        "dict": "an object",
    }.get(t.kind, "text")


def _describe(f: _Field) -> str:
    return f'- "{f.name}": {_kind_text(f.type)}' + (f". {f.desc}" if f.desc else "")


def _objective(system: str) -> str:
    at = system.find(_OBJECTIVE)
    if at < 0:
        return ""
    return textwrap.dedent(system[at + len(_OBJECTIVE) :]).strip()


def _user_text(text: str) -> str:
    for trailer in _TRAILERS:
        cut = text.find(trailer)
        if cut >= 0:
            text = text[:cut]
    return _HEADER.sub(lambda m: f"{m.group(1)}:", text).strip()


def _assistant_text(text: str) -> str:
    """A demo answer in ChatAdapter format, as the JSON object the model should produce."""
    parts = _HEADER.split(text)
    if len(parts) < 3:
        return text.strip()
    values = {
        name: value.strip()
        for name, value in zip(parts[1::2], parts[2::2], strict=False)
        if name != "completed"
    }
    return json.dumps(values, ensure_ascii=False)


def _system_text(request: Any) -> str:
    system = request.system
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    return "".join(getattr(p, "text", "") or "" for p in system)


def _chat_messages(request: Any, system: str, fields: Sequence[_Field]) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    if fields:
        keys = "\n".join(_describe(f) for f in fields)
        objective = _objective(system)
        content = (f"{objective}\n\n" if objective else "") + (
            f"Reply with only a JSON object with these keys:\n{keys}"
        )
        messages.append({"role": "system", "content": content})
    elif system:
        messages.append({"role": "system", "content": system})
    for m in request.messages:
        text = m.text or ""
        if m.role == "assistant":
            messages.append(
                {"role": "assistant", "content": _assistant_text(text) if fields else text}
            )
        else:
            messages.append({"role": "user", "content": _user_text(text) if fields else text})
    return messages


# --------------------------------------------------------------------------- output


def _default(t: FieldType) -> Any:
    t = _answered(t)
    if t.kind == "literal":
        return t.choices[0]
    return {"int": 0, "float": 0.0, "bool": False, "list": [], "dict": {}}.get(t.kind, "")


def _coerce(t: FieldType, value: Any) -> Any:
    """``value`` with whole numbers made floats where ``t`` wants floats (nested too)."""
    t = _answered(t)
    if t.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if t.kind == "list" and t.item is not None and isinstance(value, list):
        return [_coerce(t.item, v) for v in value]
    if t.kind == "dict" and t.item is not None and isinstance(value, dict):
        return {k: _coerce(t.item, v) for k, v in value.items()}
    return value


def _conforms(t: FieldType, value: Any) -> bool:
    return value is not None and value_fits(t, value)


def _closers(prefix: str) -> str | None:
    """What closes a JSON prefix (open strings, arrays, objects), or None if malformed."""
    stack: list[str] = []
    in_string = escaped = False
    for ch in prefix:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            stack.append("]" if ch == "[" else "}")
        elif ch in "]}" and (not stack or stack.pop() != ch):
            return None
    if escaped:
        return None
    return ('"' if in_string else "") + "".join(reversed(stack))


def salvage(text: str) -> dict[str, Any]:
    """The longest parseable prefix of a truncated JSON object, closed up (or ``{}``).

    The grammar guarantees ``text`` is a prefix of a valid object, so cutting back to a
    point where the open strings/containers can be closed recovers every complete field.
    A number or boolean cut off at the very end (``"n": 12`` of ``123``) may be
    incomplete, so it is dropped; a shortened string is kept (it is still a string).
    """
    stripped = text.rstrip()
    # Grammar-valid prefixes need only a few cuts (at most a key's length); cap the work.
    for cut in range(len(stripped), max(0, len(stripped) - 512), -1):
        prefix = stripped[:cut].rstrip().rstrip(",:").rstrip()
        closers = _closers(prefix)
        if closers is None:
            continue
        try:
            value = json.loads(prefix + closers, strict=False)
        except ValueError:
            continue
        if not isinstance(value, dict):
            return {}
        if value and cut == len(stripped) and stripped[-1] not in ',}]"':
            # Cut inside a number or true/false: that scalar may be incomplete.
            last = list(value)[-1]
            if isinstance(value[last], list):
                if value[last] and not isinstance(value[last][-1], str):
                    value[last].pop()
            elif not isinstance(value[last], (str, dict)):
                del value[last]
        return value
    return {}


def _clean_text(value: str) -> str:
    # A value line starting with "[[ ##" would be read as a field header by the adapter.
    return value.replace("[[", "[ [").strip()


def _chat_value(f: _Field, value: Any) -> str:
    kind = _answered(f.type).kind
    if kind == "bool":
        return "True" if value else "False"
    if kind == "float":
        return repr(float(value))
    if kind in {"list", "dict"}:
        return json.dumps(value, ensure_ascii=False)
    if kind == "literal":
        return str(value)
    if kind == "int":
        return str(int(value))
    return _clean_text(str(value))


def render(fields: Sequence[_Field], values: Mapping[str, Any], *, chat: bool) -> str:
    """The answer in the adapter's format: ChatAdapter sections, or a JSON object."""
    if not chat:
        return json.dumps({f.name: values[f.name] for f in fields}, ensure_ascii=False)
    return chat_sections((f.name, _chat_value(f, values[f.name])) for f in fields)


def _finalize(fields: Sequence[_Field], raw: str) -> tuple[dict[str, Any], list[str], bool]:
    """Typed values for every field, the names that got a default, and whether JSON parsed."""
    try:
        # strict=False: llama_cpp's grammar lets raw control characters (newlines) into
        # strings, which strict JSON refuses.
        parsed = json.loads(raw, strict=False)
        complete = isinstance(parsed, dict)
    except ValueError:
        parsed, complete = None, False
    if not isinstance(parsed, dict):
        parsed = salvage(raw)
    values: dict[str, Any] = {}
    defaulted: list[str] = []
    for f in fields:
        value = _coerce(f.type, parsed.get(f.name))
        if not _conforms(f.type, value):
            value = _default(f.type)
            defaulted.append(f.name)
        values[f.name] = value
    return values, defaulted, complete
