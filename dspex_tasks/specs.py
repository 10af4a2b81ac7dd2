"""Program specs and signatures: pure validation into one normalized JSON shape.

A spec is JSON, never code::

    {"module": "predict" | "chain_of_thought" | "react" | "multi_chain_comparison",
     "signature": "question, context -> answer: int"
                  | {"instructions": str, "inputs": [field], "outputs": [field]},
     "config": {...}, "state": <DSPy dump_state() JSON or null>}

A field is a name (``"answer"``, ``"kind: Literal['fact', 'opinion']"``) or ``{"name",
"type", "desc", "choices"}``. Types use DSPy's own syntax (``str int float bool dict``,
``list[T]``, ``dict[str, T]``, ``Optional[T]``, ``Literal[...]``), parsed over an
allow-list by :mod:`dspex_tasks.field_types` and never evaluated. The normalized form
keeps the fields and their order; a type is stored as its canonical text, and a
top-level ``Literal`` as ``{"type": "literal", "choices": [...]}``. Producers and
workers both validate with these functions; the worker builds DSPy signatures only from
the normalized form.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from dspex_tasks.errors import InvalidInputs, InvalidProgram
from dspex_tasks.field_types import (
    MAX_CHOICE_CHARS,
    MAX_CHOICES,
    TypeSyntaxError,
    parse_type,
    value_fits,
)

__all__ = [
    "FIELD_TYPES",
    "MODULES",
    "check_inputs",
    "check_options",
    "inputs_json",
    "normalize_signature",
    "normalize_spec",
    "strip_lm_state",
]

MODULES = frozenset({"predict", "chain_of_thought", "react", "multi_chain_comparison"})
#: The scalar field types (containers of them nest: see ``field_types``).
FIELD_TYPES = frozenset({"str", "int", "float", "bool", "dict", "literal"})
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_RESERVED = frozenset({"reasoning", "rationale", "trajectory", "next_thought", "next_tool_name"})
_MAX_FIELDS = 32
_MAX_TEXT = 20_000
_CONFIG_KEYS: Mapping[str, Mapping[str, type]] = {
    "predict": {},
    "chain_of_thought": {},
    "react": {"tools": list, "max_iters": int},
    "multi_chain_comparison": {"M": int},
}


def _fail(message: str, **details: Any) -> InvalidProgram:
    return InvalidProgram(message, details)


def _field_type(name: str, type_text: Any, choices: Any) -> dict[str, Any]:
    """``{"type": canonical text}``, or ``{"type": "literal", "choices": [...]}``."""
    if choices is not None:
        if (
            not isinstance(choices, list)
            or not 0 < len(choices) <= MAX_CHOICES
            or not all(isinstance(c, str) and 0 < len(c) <= MAX_CHOICE_CHARS for c in choices)
        ):
            raise _fail(f"field {name!r}: choices must be a non-empty list of strings", field=name)
        return {"type": "literal", "choices": list(choices)}
    if type_text == "literal":
        raise _fail(f"field {name!r}: type 'literal' needs choices", field=name)
    if not isinstance(type_text, str):
        raise _fail(f"field {name!r}: type must be a string, got {type_text!r}", field=name)
    try:
        parsed = parse_type(type_text)
    except TypeSyntaxError as e:
        raise _fail(
            f"field {name!r}: unsupported type {type_text[:80]!r}: {e} (supported: str int "
            "float bool dict, list[T], dict[str, T], Optional[T], Literal['a', ...])",
            field=name,
            type=type_text[:200],
        ) from None
    if parsed.kind == "literal":
        return {"type": "literal", "choices": list(parsed.choices)}
    return {"type": parsed.render()}


def _field(raw: Any, role: str) -> dict[str, Any]:
    if isinstance(raw, str):
        head, _, type_text = raw.partition(":")
        raw = {"name": head.strip(), "type": type_text.strip() or "str"}
    if not isinstance(raw, Mapping):
        raise _fail(f"{role} field must be a name or an object, got {raw!r}")
    unknown = set(raw) - {"name", "type", "desc", "choices"}
    if unknown:
        raise _fail(f"{role} field has unknown keys: {sorted(unknown)}")
    name: Any = raw.get("name")
    if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
        raise _fail(f"invalid {role} field name {name!r}: use an identifier", field=repr(name))
    if name in _RESERVED:
        raise _fail(f"{role} field name {name!r} is reserved by DSPy modules", field=name)
    typed = _field_type(name, raw.get("type") or "str", raw.get("choices"))
    desc = raw.get("desc")
    if desc is not None and (not isinstance(desc, str) or len(desc) > _MAX_TEXT):
        raise _fail(f"field {name!r}: desc must be a string of at most {_MAX_TEXT} chars")
    out: dict[str, Any] = {"name": name, "type": typed["type"]}
    if desc:
        out["desc"] = desc
    if "choices" in typed:
        out["choices"] = typed["choices"]
    return out


def _split_top(text: str, sep: str) -> list[str]:
    """``text`` split on ``sep`` outside brackets and quoted strings (Literal values)."""
    parts, depth, quote, start, i = [], 0, "", 0, 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    parts.append(text[start:])
    return parts


def _split_fields(text: str) -> list[str]:
    return [p.strip() for p in _split_top(text, ",") if p.strip()]


def normalize_signature(signature: Any) -> dict[str, Any]:
    """Validate a string or structured signature; return the structured form.

    Raises:
        InvalidProgram: the signature cannot be built (the message says why).
    """
    if isinstance(signature, str):
        sides = _split_top(signature, "->") if len(signature) <= _MAX_TEXT else []
        if len(sides) != 2:
            raise _fail(
                f"invalid signature {signature[:80]!r}: expected 'inputs -> outputs'",
                signature=signature[:200],
            )
        left, right = sides
        signature = {
            "instructions": "",
            "inputs": _split_fields(left),
            "outputs": _split_fields(right),
        }
    if not isinstance(signature, Mapping):
        raise _fail("signature must be a string 'inputs -> outputs' or an object")
    unknown = set(signature) - {"instructions", "inputs", "outputs"}
    if unknown:
        raise _fail(f"signature has unknown keys: {sorted(unknown)}")
    instructions = signature.get("instructions") or ""
    if not isinstance(instructions, str) or len(instructions) > _MAX_TEXT:
        raise _fail(f"signature instructions must be a string of at most {_MAX_TEXT} chars")
    fields = {}
    for role in ("inputs", "outputs"):
        raw = signature.get(role)
        if not isinstance(raw, list) or not raw or len(raw) > _MAX_FIELDS:
            raise _fail(f"signature needs 1-{_MAX_FIELDS} {role}")
        fields[role] = [_field(f, role[:-1]) for f in raw]
    names = [f["name"] for f in fields["inputs"] + fields["outputs"]]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise _fail(f"signature repeats field names: {duplicates}")
    return {"instructions": instructions, "inputs": fields["inputs"], "outputs": fields["outputs"]}


def normalize_spec(spec: Any) -> dict[str, Any]:
    """Validate a program spec; return it normalized (signature in structured form)."""
    if not isinstance(spec, Mapping):
        raise _fail("program spec must be a JSON object")
    unknown = set(spec) - {"module", "signature", "config", "state"}
    if unknown:
        raise _fail(f"program spec has unknown keys: {sorted(unknown)}")
    module = spec.get("module")
    if module not in MODULES:
        raise _fail(
            f"unknown module {module!r} (supported: {', '.join(sorted(MODULES))})",
            module=repr(module),
        )
    config = spec.get("config") or {}
    if not isinstance(config, Mapping):
        raise _fail("program config must be an object")
    allowed = _CONFIG_KEYS[module]
    for key, value in config.items():
        expected = allowed.get(key)
        if expected is None:
            raise _fail(
                f"{module} does not take config {key!r} (takes: {sorted(allowed) or 'none'})"
            )
        if isinstance(value, bool) or not isinstance(value, expected):
            raise _fail(f"{module} config {key!r} must be {expected.__name__}")
    if module == "react":
        tools = config.get("tools")
        if not tools or not all(isinstance(t, str) and _FIELD_NAME.fullmatch(t) for t in tools):
            raise _fail("react needs config.tools: a non-empty list of registered tool names")
        if not 1 <= config.get("max_iters", 5) <= 50:
            raise _fail("react config max_iters must be 1-50")
    if module == "multi_chain_comparison" and not 1 <= config.get("M", 3) <= 10:
        raise _fail("multi_chain_comparison config M must be 1-10")
    state = spec.get("state")
    if state is not None and not isinstance(state, Mapping):
        raise _fail("program state must be DSPy dump_state() JSON (an object) or null")
    return {
        "module": module,
        "signature": normalize_signature(spec.get("signature")),
        "config": dict(config),
        "state": strip_lm_state(state) if state is not None else None,
    }


def strip_lm_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """Blank every predictor's ``lm`` entry: stored state never carries endpoints or keys.

    DSPy's ``dump_state()`` puts a predictor's LM config (model, api_base, ...) under
    ``lm``: at the top level for a ``Predict`` (``predict`` specs), one level down for
    modules made of predictors (``{"predict": {...}}`` for ChainOfThought). A predictor
    that loads one calls that model instead of the worker's profile (with whatever key
    the provider client finds in the worker's environment), so it becomes ``None`` (the
    key stays: ``Predict.load_state`` requires it); the worker's profiles decide the LM.
    """

    def blank(part: Mapping[str, Any]) -> dict[str, Any]:
        return {k: None if k == "lm" else v for k, v in part.items()}

    out = blank(state)
    return {
        name: blank(part) if isinstance(part, Mapping) and name != "lm" else part
        for name, part in out.items()
    }


def _type_ok(field: Mapping[str, Any], value: Any) -> bool:
    if field["type"] == "literal":
        return isinstance(value, str) and value in field["choices"]
    return value_fits(parse_type(field["type"]), value)


def inputs_json(inputs: Any) -> bytes:
    """Task inputs as JSON (what the size limit measures).

    Inputs that JSON cannot carry are ``invalid_inputs``: strings with lone surrogates
    (which Python's json module lets through the broker as ``\\ud800`` escapes), nesting
    deeper than 255 levels, non-string object keys.
    """
    try:
        return orjson.dumps(inputs)
    except orjson.JSONEncodeError as e:
        raise InvalidInputs(f"inputs cannot be encoded as JSON: {e}") from None


def check_inputs(signature: Mapping[str, Any], inputs: Any) -> dict[str, Any]:
    """Inputs must be exactly the signature's input fields, each of its declared type."""
    if not isinstance(inputs, Mapping):
        raise InvalidInputs(f"inputs must be a JSON object, got {type(inputs).__name__}")
    expected = {f["name"]: f for f in signature["inputs"]}
    missing = sorted(set(expected) - set(inputs))
    extra = sorted(set(inputs) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        raise InvalidInputs(
            f"inputs do not match the signature: {'; '.join(parts)} (expects {sorted(expected)})",
            {"missing": missing, "extra": extra},
        )
    for name, field in expected.items():
        if not _type_ok(field, inputs[name]):
            shown = repr(inputs[name])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            wanted = field["type"] if field["type"] != "literal" else f"one of {field['choices']}"
            raise InvalidInputs(
                f"input {name!r} must be {wanted}, got {shown}",
                {"field": name, "expected": wanted},
            )
    return dict(inputs)


OPTION_KEYS = frozenset({"store_outputs", "stream", "multitask"})
#: How a run shares its session with the session's other runs (store/runs.py).
MULTITASK_STRATEGIES = ("parallel", "reject", "enqueue", "interrupt", "rollback")


def check_options(options: Any, signature: Mapping[str, Any]) -> dict[str, str]:
    """Validate task options; returns the ``store_outputs`` map ``{output_field: variable}``.

    ``store_outputs`` is a list of output fields (written to same-named variables) or an
    object ``{output_field: variable_name}``.
    """
    if options is None:
        return {}
    if not isinstance(options, Mapping) or set(options) - OPTION_KEYS:
        raise InvalidInputs(
            f"options must be an object with keys among {sorted(OPTION_KEYS)}, got {options!r}"[
                :300
            ]
        )
    if not isinstance(options.get("stream", False), bool):
        raise InvalidInputs(f"options.stream must be true or false, got {options['stream']!r}")
    strategy = options.get("multitask")
    if strategy is not None and strategy not in MULTITASK_STRATEGIES:
        raise InvalidInputs(
            f"unknown multitask strategy {strategy!r}: use one of "
            + ", ".join(MULTITASK_STRATEGIES),
            {"multitask": repr(strategy)},
        )
    option = options.get("store_outputs")
    if option is None:
        return {}
    if isinstance(option, list) and all(isinstance(o, str) for o in option):
        mapping = {o: o for o in option}
    elif isinstance(option, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in option.items()
    ):
        mapping = dict(option)
    else:
        raise InvalidInputs(
            "options.store_outputs must be a list of output fields or {field: variable}"
        )
    outputs = {f["name"] for f in signature["outputs"]}
    unknown = sorted(set(mapping) - outputs)
    if unknown:
        raise InvalidInputs(
            f"options.store_outputs names fields the program does not output: {unknown}",
            {"fields": unknown},
        )
    return mapping
