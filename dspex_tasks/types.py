"""The variable type system: pure validation, constraints and JSON encoding.

Eight built-in types follow Snakepit's accept / coerce / reject rules, made whole:

========== =============================================== ==============================
type       accepts (normalized to)                         constraints
========== =============================================== ==============================
float      float; int -> float; NaN/±Infinity (also the    min, max (special values skip
           strings "NaN", "Infinity", "-Infinity")         them)
integer    int; whole float -> int                         min, max
string     str                                             min_length, max_length,
                                                           pattern (unanchored), enum
boolean    bool; "true"/"false"; 1/0                       (none)
choice     str                                             choices (empty: any)
module     non-empty str                                   allowed_modules
embedding  list of finite numbers -> list[float]           dimensions
tensor     {"shape": [ints], "data": nested numbers}       shape
           with prod(shape) == number of leaves
========== =============================================== ==============================

``bool`` is never a number here (Python's ``True == 1`` would otherwise slip through).
Custom types join with :func:`register_type`. Constraints are checked when a variable is
registered, so a bad constraint (an invalid regex, an unknown key) fails early.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dspex_tasks.errors import UnknownType, ValidationFailed

__all__ = [
    "VarType",
    "check_constraints",
    "decode_value",
    "encode_value",
    "get_type",
    "list_types",
    "register_type",
    "validate_value",
]

Validator = Callable[[Any], Any]
ConstraintValidator = Callable[[Any, Mapping[str, Any]], None]


class RuleError(ValueError):
    """A broken rule, before it is tied to a variable name."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule
        self.message = message


@dataclass(frozen=True)
class VarType:
    """A registered type: how to validate a value and its constraints."""

    name: str
    validate: Validator
    validate_constraints: ConstraintValidator
    #: Constraint keys and a check for each key's own value; ``None`` accepts any key.
    constraint_keys: Mapping[str, Callable[[Any], bool]] | None
    builtin: bool = False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_regex(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        re.compile(value)
    except (re.error, OverflowError, RecursionError):  # e.g. "a{99999999999}", deep nesting
        return False
    return True


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(v) and v >= 0 for v in value)


# --- float / integer ------------------------------------------------------------------

_SPECIAL_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _validate_float(value: Any) -> float:
    if isinstance(value, str) and value in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[value]
    if not _is_number(value):
        raise RuleError("type", "must be a number")
    try:
        return float(value)
    except OverflowError:  # an int beyond float range, e.g. 10**400
        raise RuleError("type", "must be a number within float range") from None


def _validate_integer(value: Any) -> int:
    if _is_int(value):
        return int(value)
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise RuleError("whole_number", f"must be a whole number, got {value!r}")
    raise RuleError("type", "must be an integer")


def _range_constraints(value: Any, constraints: Mapping[str, Any]) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        return  # NaN and the infinities skip range checks, as in Snakepit.
    low, high = constraints.get("min"), constraints.get("max")
    if low is not None and value < low:
        raise RuleError("min", f"value {value!r} is below minimum {low!r}")
    if high is not None and value > high:
        raise RuleError("max", f"value {value!r} is above maximum {high!r}")


# --- string / boolean / choice / module -----------------------------------------------


def _validate_string(value: Any) -> str:
    if value is None:
        raise RuleError("type", "cannot be nil")
    if not isinstance(value, str):
        raise RuleError("type", "must be a string")
    return value


def _string_constraints(value: str, constraints: Mapping[str, Any]) -> None:
    length = len(value)
    low, high = constraints.get("min_length"), constraints.get("max_length")
    if low is not None and length < low:
        raise RuleError("min_length", f"must be at least {low} characters, got {length}")
    if high is not None and length > high:
        raise RuleError("max_length", f"must be at most {high} characters, got {length}")
    pattern = constraints.get("pattern")
    if pattern is not None and re.search(pattern, value) is None:
        raise RuleError("pattern", f"must match pattern: {pattern}")
    enum = constraints.get("enum")
    if enum and value not in enum:
        raise RuleError("enum", f"must be one of: {', '.join(enum)}")


_TRUE_FALSE = {True: True, False: False, "true": True, "false": False}


def _validate_boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in _TRUE_FALSE:
        return bool(_TRUE_FALSE[value])
    if _is_int(value) and value in (0, 1):
        return bool(value == 1)
    raise RuleError("type", "must be a boolean (true or false)")


def _validate_choice(value: Any) -> str:
    if not isinstance(value, str):
        raise RuleError("type", "must be a string")
    return value


def _choice_constraints(value: str, constraints: Mapping[str, Any]) -> None:
    choices = constraints.get("choices")
    if choices and value not in choices:
        raise RuleError("choices", f"must be one of: {', '.join(choices)}")


def _validate_module(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise RuleError("type", "must be a module name")
    return value


def _module_constraints(value: str, constraints: Mapping[str, Any]) -> None:
    allowed = constraints.get("allowed_modules")
    if allowed and value not in allowed:
        raise RuleError(
            "allowed_modules", f"must be one of the allowed modules: {', '.join(allowed)}"
        )


# --- embedding / tensor ---------------------------------------------------------------


def _validate_embedding(value: Any) -> list[float]:
    if not isinstance(value, list):
        raise RuleError("type", "must be a numeric list")
    if not all(_is_number(v) for v in value):
        raise RuleError("type", "must be a list of numbers")
    try:
        floats = [float(v) for v in value]
    except OverflowError:  # an int beyond float range is not a finite float
        raise RuleError("type", "must contain finite numbers only") from None
    if not all(math.isfinite(v) for v in floats):
        raise RuleError("type", "must contain finite numbers only")
    return floats


def _embedding_constraints(value: list[float], constraints: Mapping[str, Any]) -> None:
    dims = constraints.get("dimensions")
    if dims is not None and len(value) != dims:
        raise RuleError("dimensions", f"must have exactly {dims} dimensions, got {len(value)}")


def _count_leaves(data: Any, depth: int = 0) -> int:
    if depth > 32:
        raise RuleError("type", "tensor data is nested too deeply")
    if isinstance(data, list):
        return sum(_count_leaves(item, depth + 1) for item in data)
    # ints are always finite; math.isfinite(10**400) would raise OverflowError.
    if _is_int(data) or (isinstance(data, float) and math.isfinite(data)):
        return 1
    raise RuleError("type", "tensor data must hold finite numbers only")


def _validate_tensor(value: Any) -> dict[str, Any]:
    if (
        not isinstance(value, dict)
        or set(value) != {"shape", "data"}
        or not _is_shape(value["shape"])
        or not isinstance(value["data"], list)
    ):
        raise RuleError("type", "must be a tensor with shape and data")
    expected = math.prod(value["shape"])  # an empty shape is a scalar: product 1
    if _count_leaves(value["data"]) != expected:
        raise RuleError("shape", "data size doesn't match shape")
    return {"shape": list(value["shape"]), "data": value["data"]}


def _tensor_constraints(value: dict[str, Any], constraints: Mapping[str, Any]) -> None:
    shape = constraints.get("shape")
    if shape is not None and value["shape"] != shape:
        raise RuleError("shape", f"shape must be {shape}, got {value['shape']}")


def _no_constraints(value: Any, constraints: Mapping[str, Any]) -> None:
    return None


_NUMBER = _is_number
_NONNEG_INT = lambda v: _is_int(v) and v >= 0  # noqa: E731

_REGISTRY: dict[str, VarType] = {
    t.name: t
    for t in (
        VarType(
            "float", _validate_float, _range_constraints, {"min": _NUMBER, "max": _NUMBER}, True
        ),
        VarType(
            "integer", _validate_integer, _range_constraints, {"min": _NUMBER, "max": _NUMBER}, True
        ),
        VarType(
            "string",
            _validate_string,
            _string_constraints,
            {
                "min_length": _NONNEG_INT,
                "max_length": _NONNEG_INT,
                "pattern": _is_regex,
                "enum": _is_str_list,
            },
            True,
        ),
        VarType("boolean", _validate_boolean, _no_constraints, {}, True),
        VarType("choice", _validate_choice, _choice_constraints, {"choices": _is_str_list}, True),
        VarType(
            "module", _validate_module, _module_constraints, {"allowed_modules": _is_str_list}, True
        ),
        VarType(
            "embedding",
            _validate_embedding,
            _embedding_constraints,
            {"dimensions": _NONNEG_INT},
            True,
        ),
        VarType("tensor", _validate_tensor, _tensor_constraints, {"shape": _is_shape}, True),
    )
}


# --- public API -----------------------------------------------------------------------


def register_type(
    name: str,
    validate: Validator,
    validate_constraints: ConstraintValidator | None = None,
    *,
    constraint_keys: Mapping[str, Callable[[Any], bool]] | None = None,
) -> VarType:
    """Register a custom variable type in this process.

    Args:
        name: the type name used in ``register_variable``; built-in names cannot be replaced.
        validate: returns the normalized (JSON-serializable) value or raises ``ValueError``
            / ``TypeError`` with a readable message.
        validate_constraints: ``(value, constraints)``; raises ``ValueError`` when broken.
        constraint_keys: the accepted constraint keys and a check of each key's value;
            ``None`` accepts any key.

    Register the type in every process that writes such variables (producers and workers).
    """
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", name):
        raise ValueError(f"invalid type name {name!r}: use [a-z][a-z0-9_]*")
    existing = _REGISTRY.get(name)
    if existing is not None and existing.builtin:
        raise ValueError(f"cannot replace the built-in type {name!r}")
    var_type = VarType(name, validate, validate_constraints or _no_constraints, constraint_keys)
    _REGISTRY[name] = var_type
    return var_type


def get_type(name: Any) -> VarType:
    """Return the registered type ``name`` or raise ``UnknownType``."""
    var_type = _REGISTRY.get(name) if isinstance(name, str) else None
    if var_type is None:
        raise UnknownType(
            f"unknown variable type {name!r}; known types: {', '.join(sorted(_REGISTRY))}",
            {"type": repr(name)},
        )
    return var_type


def list_types() -> list[str]:
    """Names of every registered type, built-in first."""
    return list(_REGISTRY)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fail(variable: str, type_name: str, rule: str, message: str, value: Any) -> ValidationFailed:
    return ValidationFailed(
        f"variable {variable!r} ({type_name}): {message} [rule: {rule}, value: {_shown(value)}]",
        {"variable": variable, "type": type_name, "rule": rule, "value": _shown(value)},
    )


def check_constraints(variable: str, type_name: str, constraints: Any) -> dict[str, Any]:
    """Validate a constraints mapping for ``type_name``; returns a plain dict copy."""
    var_type = get_type(type_name)
    if constraints is None:
        return {}
    if not isinstance(constraints, Mapping):
        raise _fail(
            variable, type_name, "constraints", "constraints must be an object", constraints
        )
    result = dict(constraints)
    if var_type.constraint_keys is not None:
        for key, value in result.items():
            check = var_type.constraint_keys.get(key)
            if check is None:
                allowed = ", ".join(var_type.constraint_keys) or "none"
                raise _fail(
                    variable,
                    type_name,
                    "constraints",
                    f"unknown constraint {key!r} (allowed: {allowed})",
                    constraints,
                )
            if not check(value):
                raise _fail(variable, type_name, "constraints", f"invalid value for {key!r}", value)
    low, high = (
        result.get("min", result.get("min_length")),
        result.get("max", result.get("max_length")),
    )
    if low is not None and high is not None and _is_number(low) and _is_number(high) and low > high:
        raise _fail(variable, type_name, "constraints", "minimum is above maximum", constraints)
    return result


def validate_value(
    variable: str, type_name: str, value: Any, constraints: Mapping[str, Any] | None = None
) -> Any:
    """Validate and normalize ``value`` for a variable.

    Raises:
        UnknownType: ``type_name`` is not registered.
        ValidationFailed: the value breaks the type or a constraint; the message names
            the variable, the rule and the value.
    """
    var_type = get_type(type_name)
    try:
        normalized = var_type.validate(value)
        var_type.validate_constraints(normalized, constraints or {})
    except RuleError as e:
        raise _fail(variable, type_name, e.rule, e.message, value) from None
    except (ValueError, TypeError) as e:  # custom types report with plain exceptions
        raise _fail(variable, type_name, "custom", str(e) or type(e).__name__, value) from None
    return normalized


def encode_value(type_name: str, value: Any) -> Any:
    """Turn a normalized value into its JSON-safe form (special floats become strings)."""
    if type_name == "float" and isinstance(value, float) and not math.isfinite(value):
        if math.isnan(value):
            return "NaN"
        return "Infinity" if value > 0 else "-Infinity"
    return value


def decode_value(type_name: str, value: Any) -> Any:
    """Inverse of :func:`encode_value`."""
    if type_name == "float" and isinstance(value, str):
        return _SPECIAL_FLOATS.get(value, value)
    return value
