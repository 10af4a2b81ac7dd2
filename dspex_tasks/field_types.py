"""Signature field types: DSPy's type syntax, parsed safely into a small closed tree.

Accepted (nested where DSPy allows it)::

    str  int  float  bool  dict                 scalars; bare dict = any JSON object
    list[T]  dict[str, T]  Optional[T]          containers (List / Dict / Union[T, None]
                                                and T | None are read as these too)
    Literal['a', 'b']                           string choices

The text is parsed with :func:`ast.parse` and walked over an allow-list of node shapes
and names: nothing is evaluated and no other name resolves, so ``os.system``,
``__import__('x')`` or ``list[Foo]`` are refused. The engines read the type text DSPy
renders in its prompts (``Union[int, NoneType]``, ``dict[str, Any]``) with the same
parser (see :func:`parse_type`).
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

__all__ = ["FieldType", "TypeSyntaxError", "parse_type", "value_fits"]

SCALARS = frozenset({"str", "int", "float", "bool"})
_MAX_DEPTH = 6
_MAX_TEXT = 16_000
MAX_CHOICES = 64
MAX_CHOICE_CHARS = 200
_ALIASES = {"List": "list", "Dict": "dict"}


class TypeSyntaxError(ValueError):
    """Raised for type text outside the accepted grammar (the message says why)."""


@dataclass(frozen=True)
class FieldType:
    """One node: ``kind`` is a scalar name, ``list``, ``dict``, ``optional`` or ``literal``.

    ``item`` is the list item, the dict value (``None`` for a bare ``dict``: any JSON
    object) or the optional's inner type; ``choices`` are a literal's strings.
    """

    kind: str
    item: FieldType | None = None
    choices: tuple[str, ...] = ()

    def render(self) -> str:
        """The canonical text (what a normalized signature stores)."""
        if self.kind == "list":
            assert self.item is not None
            return f"list[{self.item.render()}]"
        if self.kind == "dict":
            return "dict" if self.item is None else f"dict[str, {self.item.render()}]"
        if self.kind == "optional":
            assert self.item is not None
            return f"Optional[{self.item.render()}]"
        if self.kind == "literal":
            return "Literal[" + ", ".join(repr(c) for c in self.choices) + "]"
        return self.kind


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return _ALIASES.get(node.id, node.id)
    if isinstance(node, ast.Constant) and node.value is None:
        return "None"
    raise TypeSyntaxError(f"unsupported type expression {ast.unparse(node)!r}")


def _is_none(node: ast.expr, rendered: bool) -> bool:
    if isinstance(node, ast.Constant) and node.value is None:
        return True
    return rendered and isinstance(node, ast.Name) and node.id == "NoneType"


def _args(node: ast.Subscript) -> list[ast.expr]:
    return list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]


def _choices(node: ast.Subscript) -> tuple[str, ...]:
    values = []
    for arg in _args(node):
        if not isinstance(arg, ast.Constant) or not isinstance(arg.value, str):
            raise TypeSyntaxError(
                f"Literal values must be string constants, got {ast.unparse(arg)!r}"
            )
        if not 0 < len(arg.value) <= MAX_CHOICE_CHARS:
            raise TypeSyntaxError(f"Literal values must be 1-{MAX_CHOICE_CHARS} characters")
        values.append(arg.value)
    if not 0 < len(values) <= MAX_CHOICES:
        raise TypeSyntaxError(f"Literal needs 1-{MAX_CHOICES} values")
    return tuple(values)


def _walk(node: ast.expr, depth: int, rendered: bool) -> FieldType:
    if depth > _MAX_DEPTH:
        raise TypeSyntaxError(f"types nest at most {_MAX_DEPTH} levels deep")
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):  # T | None
        left, right = node.left, node.right
        if _is_none(right, rendered) and not _is_none(left, rendered):
            return FieldType("optional", _walk(left, depth + 1, rendered))
        if _is_none(left, rendered) and not _is_none(right, rendered):
            return FieldType("optional", _walk(right, depth + 1, rendered))
        raise TypeSyntaxError("a union must be 'T | None' (use Optional[T])")
    if not isinstance(node, ast.Subscript):
        name = _name(node)
        if name in SCALARS:
            return FieldType(name)
        if name == "dict":
            return FieldType("dict")
        raise TypeSyntaxError(f"unknown type name {name!r}")
    head = _name(node.value)
    args = _args(node)
    if head == "Literal":
        return FieldType("literal", choices=_choices(node))
    if head == "list" and len(args) == 1:
        return FieldType("list", _walk(args[0], depth + 1, rendered))
    if head == "dict" and len(args) == 2:
        if _name(args[0]) != "str":
            raise TypeSyntaxError("dict keys must be str (JSON object keys are strings)")
        if rendered and isinstance(args[1], ast.Name) and args[1].id == "Any":
            return FieldType("dict")
        return FieldType("dict", _walk(args[1], depth + 1, rendered))
    if head == "Optional" and len(args) == 1:
        return FieldType("optional", _walk(args[0], depth + 1, rendered))
    if head == "Union" and len(args) == 2:
        inner = [a for a in args if not _is_none(a, rendered)]
        if len(inner) == 1:
            return FieldType("optional", _walk(inner[0], depth + 1, rendered))
        raise TypeSyntaxError("Union must be Union[T, None] (use Optional[T])")
    raise TypeSyntaxError(f"unsupported type {ast.unparse(node)!r}")


@lru_cache(maxsize=1024)
def parse_type(text: str, *, rendered: bool = False) -> FieldType:
    """Parse type text into a :class:`FieldType` (cached: the texts repeat).

    ``rendered=True`` also reads what DSPy writes in its prompts (``NoneType`` in a
    Union, ``dict[str, Any]``); the engines use it. Producers' text never gets it.

    Raises:
        TypeSyntaxError: the text is not an accepted type.
    """
    text = text.strip()
    if not text or len(text) > _MAX_TEXT:
        raise TypeSyntaxError("type text must be 1-16000 characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise TypeSyntaxError(f"cannot parse type {text[:80]!r}") from None
    return _walk(tree.body, 0, rendered)


def value_fits(t: FieldType, value: Any) -> bool:
    """Whether a JSON value has type ``t`` (bools are never numbers; floats are finite)."""
    kind = t.kind
    if kind == "optional":
        assert t.item is not None
        return value is None or value_fits(t.item, value)
    if kind == "literal":
        return isinstance(value, str) and value in t.choices
    if isinstance(value, bool):
        return kind == "bool"
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, (int, float)) and math.isfinite(value)
    if kind == "bool":
        return False
    if kind == "list":
        assert t.item is not None
        item = t.item
        return isinstance(value, list) and all(value_fits(item, v) for v in value)
    if kind == "dict":
        if not isinstance(value, dict):
            return False
        return t.item is None or all(value_fits(t.item, v) for v in value.values())
    return False
