"""Table-driven unit tests of the variable type system (``dspex_tasks.types``) and the
error tree (``dspex_tasks.errors``). Pure Python: no Redis, no Celery."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest

from dspex_tasks import errors, types
from dspex_tasks.errors import (
    DspexError,
    SessionExpired,
    SessionNotFound,
    UnknownType,
    ValidationFailed,
    error_from_code,
)
from dspex_tasks.types import (
    check_constraints,
    decode_value,
    encode_value,
    get_type,
    list_types,
    register_type,
    validate_value,
)

BUILTIN_TYPES = ["float", "integer", "string", "boolean", "choice", "module", "embedding", "tensor"]

NAN = math.nan
INF = math.inf


def _same(a: Any, b: Any) -> bool:
    """Equality that also treats NaN as equal to NaN and checks the exact type."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _nested(depth: int) -> list[Any]:
    data: list[Any] = [1.0]
    for _ in range(depth - 1):
        data = [data]
    return data


def assert_rejected(exc: ValidationFailed, variable: str, type_name: str, rule: str) -> None:
    assert type(exc) is ValidationFailed
    assert exc.code == "validation_failed"
    assert exc.details["rule"] == rule
    assert exc.details["variable"] == variable
    assert exc.details["type"] == type_name
    assert "value" in exc.details
    message = str(exc)
    assert message == exc.message
    assert variable in message
    assert f"rule: {rule}" in message


# --- accepted values --------------------------------------------------------------------

ACCEPT_CASES: list[tuple[str, Any, dict[str, Any] | None, Any]] = [
    # float: int -> float, special values (also as strings), range edges.
    ("float", 1.5, None, 1.5),
    ("float", 0, None, 0.0),
    ("float", -7, None, -7.0),
    ("float", 10**20, None, 1e20),
    ("float", 0.0, {"min": 0, "max": 1}, 0.0),
    ("float", 1.0, {"min": 0, "max": 1}, 1.0),
    ("float", 0, {"min": 0}, 0.0),
    ("float", 1, {"max": 1}, 1.0),
    ("float", 0.5, {"min": 0.5, "max": 0.5}, 0.5),
    ("float", -1e308, {"max": 0}, -1e308),
    ("float", NAN, None, NAN),
    ("float", INF, None, INF),
    ("float", -INF, None, -INF),
    ("float", "NaN", None, NAN),
    ("float", "Infinity", None, INF),
    ("float", "-Infinity", None, -INF),
    ("float", NAN, {"min": 0, "max": 1}, NAN),
    ("float", INF, {"min": 0, "max": 1}, INF),
    ("float", -INF, {"min": 0, "max": 1}, -INF),
    ("float", "Infinity", {"max": -5}, INF),
    ("float", "-Infinity", {"min": 5}, -INF),
    ("float", "NaN", {"min": 5, "max": 6}, NAN),
    # integer: whole floats coerce, range edges.
    ("integer", 3, None, 3),
    ("integer", 0, None, 0),
    ("integer", -42, None, -42),
    ("integer", 3.0, None, 3),
    ("integer", -0.0, None, 0),
    ("integer", 1e15, None, 10**15),
    ("integer", 10**30, None, 10**30),
    ("integer", 1, {"min": 1, "max": 10}, 1),
    ("integer", 10, {"min": 1, "max": 10}, 10),
    ("integer", 10.0, {"min": 1, "max": 10}, 10),
    ("integer", 5, {"min": 5, "max": 5}, 5),
    ("integer", 2, {"min": 1.5}, 2),
    ("integer", -3, {"max": -3}, -3),
    # string: lengths exactly at limits, unanchored pattern, enum.
    ("string", "hello", None, "hello"),
    ("string", "", None, ""),
    ("string", "", {"min_length": 0}, ""),
    ("string", "", {"max_length": 0}, ""),
    ("string", "abc", {"min_length": 3}, "abc"),
    ("string", "abc", {"max_length": 3}, "abc"),
    ("string", "abc", {"min_length": 3, "max_length": 3}, "abc"),
    ("string", "ünï", {"max_length": 3}, "ünï"),
    ("string", "abc123", {"pattern": r"\d+"}, "abc123"),
    ("string", "xx-yy", {"pattern": "-"}, "xx-yy"),
    ("string", "abc", {"pattern": "^abc$"}, "abc"),
    ("string", "anything", {"pattern": ""}, "anything"),
    ("string", "red", {"enum": ["red", "green"]}, "red"),
    ("string", "green", {"enum": ["red", "green"]}, "green"),
    ("string", "blue", {"enum": []}, "blue"),
    (
        "string",
        "ab1",
        {"min_length": 2, "max_length": 5, "pattern": "[0-9]", "enum": ["ab1"]},
        "ab1",
    ),
    # boolean.
    ("boolean", True, None, True),
    ("boolean", False, None, False),
    ("boolean", "true", None, True),
    ("boolean", "false", None, False),
    ("boolean", 1, None, True),
    ("boolean", 0, None, False),
    # choice: choices, empty list = any.
    ("choice", "a", None, "a"),
    ("choice", "", None, ""),
    ("choice", "a", {"choices": ["a", "b"]}, "a"),
    ("choice", "b", {"choices": ["a", "b"]}, "b"),
    ("choice", "zzz", {"choices": []}, "zzz"),
    # module.
    ("module", "Predict", None, "Predict"),
    ("module", "dspy.ChainOfThought", None, "dspy.ChainOfThought"),
    ("module", "Predict", {"allowed_modules": ["Predict", "ChainOfThought"]}, "Predict"),
    (
        "module",
        "ChainOfThought",
        {"allowed_modules": ["Predict", "ChainOfThought"]},
        "ChainOfThought",
    ),
    ("module", "Anything", {"allowed_modules": []}, "Anything"),
    # embedding: numbers -> floats, dimensions.
    ("embedding", [1, 2, 3], None, [1.0, 2.0, 3.0]),
    ("embedding", [0.5, -1.25], None, [0.5, -1.25]),
    ("embedding", [1, 2.5], None, [1.0, 2.5]),
    ("embedding", [], None, []),
    ("embedding", [], {"dimensions": 0}, []),
    ("embedding", [1, 2, 3], {"dimensions": 3}, [1.0, 2.0, 3.0]),
    ("embedding", [1e308, -1e308], None, [1e308, -1e308]),
    # tensor: prod(shape) == leaf count, nested data, empty shape = scalar.
    ("tensor", {"shape": [3], "data": [1, 2, 3]}, None, {"shape": [3], "data": [1, 2, 3]}),
    (
        "tensor",
        {"shape": [2, 2], "data": [[1, 2], [3, 4]]},
        None,
        {"shape": [2, 2], "data": [[1, 2], [3, 4]]},
    ),
    (
        "tensor",
        {"shape": [2, 3], "data": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]},
        None,
        {"shape": [2, 3], "data": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]},
    ),
    (
        "tensor",
        {"shape": [2, 1, 2], "data": [[[1, 2]], [[3, 4]]]},
        None,
        {"shape": [2, 1, 2], "data": [[[1, 2]], [[3, 4]]]},
    ),
    (
        "tensor",
        {"shape": [4], "data": [[1, 2], [3, 4]]},
        None,
        {"shape": [4], "data": [[1, 2], [3, 4]]},
    ),
    ("tensor", {"shape": [], "data": [7]}, None, {"shape": [], "data": [7]}),
    ("tensor", {"shape": [0], "data": []}, None, {"shape": [0], "data": []}),
    ("tensor", {"shape": [2, 0], "data": [[], []]}, None, {"shape": [2, 0], "data": [[], []]}),
    ("tensor", {"shape": [1], "data": [10**400]}, None, {"shape": [1], "data": [10**400]}),
    ("tensor", {"data": [1, 2], "shape": [2]}, {"shape": [2]}, {"shape": [2], "data": [1, 2]}),
    (
        "tensor",
        {"shape": [1] * 32, "data": _nested(32)},
        None,
        {"shape": [1] * 32, "data": _nested(32)},
    ),
]


@pytest.mark.parametrize(("type_name", "value", "constraints", "expected"), ACCEPT_CASES)
def test_accepts(
    type_name: str, value: Any, constraints: dict[str, Any] | None, expected: Any
) -> None:
    # Constraints in the table must themselves be valid (as they are at registration).
    check_constraints("v", type_name, constraints)
    result = validate_value("v", type_name, value, constraints)
    if isinstance(expected, list):
        assert result == expected
        assert all(type(a) is type(b) for a, b in zip(result, expected, strict=True))
    elif isinstance(expected, dict):
        assert result == expected
    else:
        assert _same(result, expected), (result, expected)


@pytest.mark.parametrize("name", BUILTIN_TYPES)
def test_builtin_types_are_registered(name: str) -> None:
    assert get_type(name).builtin is True
    assert get_type(name).name == name


def test_float_result_type_is_float_for_int_input() -> None:
    assert type(validate_value("v", "float", 3)) is float
    assert all(type(x) is float for x in validate_value("v", "embedding", [1, 2]))


def test_tensor_result_is_a_fresh_shape_list() -> None:
    value = {"shape": [2], "data": [1, 2]}
    result = validate_value("v", "tensor", value)
    assert result["shape"] is not value["shape"]


# --- rejected values --------------------------------------------------------------------

REJECT_CASES: list[Any] = [  # (type, value, constraints, rule, message fragment)
    # (type, value, constraints, rule, message fragment)
    # float
    ("float", "1.5", None, "type", "must be a number"),
    ("float", "nan", None, "type", "must be a number"),
    ("float", "inf", None, "type", "must be a number"),
    ("float", "infinity", None, "type", "must be a number"),
    ("float", None, None, "type", "must be a number"),
    ("float", True, None, "type", "must be a number"),
    ("float", False, None, "type", "must be a number"),
    ("float", [1.0], None, "type", "must be a number"),
    ("float", {"x": 1}, None, "type", "must be a number"),
    pytest.param("float", 10**400, None, "type", "float range", id="float-huge_int-type"),
    ("float", -0.001, {"min": 0}, "min", "below minimum"),
    ("float", 1.0000001, {"max": 1}, "max", "above maximum"),
    ("float", -1, {"min": 0, "max": 1}, "min", "below minimum"),
    ("float", 2, {"min": 0, "max": 1}, "max", "above maximum"),
    ("float", 1e308, {"max": 1e307}, "max", "above maximum"),
    # integer
    ("integer", 3.5, None, "whole_number", "whole number"),
    ("integer", 0.1, None, "whole_number", "whole number"),
    ("integer", -2.5, None, "whole_number", "whole number"),
    ("integer", NAN, None, "whole_number", "whole number"),
    ("integer", INF, None, "whole_number", "whole number"),
    ("integer", -INF, None, "whole_number", "whole number"),
    ("integer", "42", None, "type", "must be an integer"),
    ("integer", "NaN", None, "type", "must be an integer"),
    ("integer", True, None, "type", "must be an integer"),
    ("integer", False, None, "type", "must be an integer"),
    ("integer", None, None, "type", "must be an integer"),
    ("integer", [1], None, "type", "must be an integer"),
    ("integer", 0, {"min": 1}, "min", "below minimum"),
    ("integer", 11, {"max": 10}, "max", "above maximum"),
    ("integer", 11.0, {"max": 10}, "max", "above maximum"),
    ("integer", 1, {"min": 1.5}, "min", "below minimum"),
    ("integer", 6, {"min": 5, "max": 5}, "max", "above maximum"),
    # string
    ("string", None, None, "type", "cannot be nil"),
    ("string", 5, None, "type", "must be a string"),
    ("string", b"bytes", None, "type", "must be a string"),
    ("string", True, None, "type", "must be a string"),
    ("string", ["a"], None, "type", "must be a string"),
    ("string", "ab", {"min_length": 3}, "min_length", "at least 3"),
    ("string", "", {"min_length": 1}, "min_length", "at least 1"),
    ("string", "abcd", {"max_length": 3}, "max_length", "at most 3"),
    ("string", "a", {"max_length": 0}, "max_length", "at most 0"),
    ("string", "abc", {"pattern": r"\d"}, "pattern", "must match pattern"),
    ("string", "xabc", {"pattern": "^abc"}, "pattern", "must match pattern"),
    ("string", "ABC", {"pattern": "abc"}, "pattern", "must match pattern"),
    ("string", "blue", {"enum": ["red", "green"]}, "enum", "must be one of: red, green"),
    ("string", "Red", {"enum": ["red"]}, "enum", "must be one of"),
    ("string", "", {"enum": ["red"]}, "enum", "must be one of"),
    # boolean
    ("boolean", "yes", None, "type", "must be a boolean"),
    ("boolean", "True", None, "type", "must be a boolean"),
    ("boolean", "FALSE", None, "type", "must be a boolean"),
    ("boolean", "1", None, "type", "must be a boolean"),
    ("boolean", "", None, "type", "must be a boolean"),
    ("boolean", None, None, "type", "must be a boolean"),
    ("boolean", 2, None, "type", "must be a boolean"),
    ("boolean", -1, None, "type", "must be a boolean"),
    ("boolean", 1.0, None, "type", "must be a boolean"),
    ("boolean", 0.0, None, "type", "must be a boolean"),
    ("boolean", [], None, "type", "must be a boolean"),
    # choice
    ("choice", 1, None, "type", "must be a string"),
    ("choice", None, None, "type", "must be a string"),
    ("choice", ["a"], None, "type", "must be a string"),
    ("choice", "c", {"choices": ["a", "b"]}, "choices", "must be one of: a, b"),
    ("choice", "", {"choices": ["a"]}, "choices", "must be one of"),
    ("choice", "A", {"choices": ["a"]}, "choices", "must be one of"),
    # module
    ("module", "", None, "type", "must be a module name"),
    ("module", None, None, "type", "must be a module name"),
    ("module", 3, None, "type", "must be a module name"),
    ("module", ["Predict"], None, "type", "must be a module name"),
    ("module", "", {"allowed_modules": ["Predict"]}, "type", "must be a module name"),
    ("module", "React", {"allowed_modules": ["Predict"]}, "allowed_modules", "allowed modules"),
    ("module", "predict", {"allowed_modules": ["Predict"]}, "allowed_modules", "allowed modules"),
    # embedding
    ("embedding", "1,2,3", None, "type", "must be a numeric list"),
    ("embedding", (1.0, 2.0), None, "type", "must be a numeric list"),
    ("embedding", None, None, "type", "must be a numeric list"),
    ("embedding", 1.0, None, "type", "must be a numeric list"),
    ("embedding", {"a": 1}, None, "type", "must be a numeric list"),
    ("embedding", [1, "2"], None, "type", "must be a list of numbers"),
    ("embedding", [1.0, None], None, "type", "must be a list of numbers"),
    ("embedding", [True, 1.0], None, "type", "must be a list of numbers"),
    ("embedding", [[1.0]], None, "type", "must be a list of numbers"),
    ("embedding", ["NaN"], None, "type", "must be a list of numbers"),
    ("embedding", [1.0, NAN], None, "type", "finite"),
    ("embedding", [INF], None, "type", "finite"),
    ("embedding", [-INF, 0.0], None, "type", "finite"),
    ("embedding", [10**400], None, "type", "finite"),
    ("embedding", [1, 2], {"dimensions": 3}, "dimensions", "exactly 3 dimensions, got 2"),
    ("embedding", [1, 2, 3, 4], {"dimensions": 3}, "dimensions", "exactly 3 dimensions, got 4"),
    ("embedding", [], {"dimensions": 1}, "dimensions", "exactly 1 dimensions, got 0"),
    # tensor: malformed
    ("tensor", None, None, "type", "shape and data"),
    ("tensor", [1, 2], None, "type", "shape and data"),
    ("tensor", {}, None, "type", "shape and data"),
    ("tensor", {"shape": [2]}, None, "type", "shape and data"),
    ("tensor", {"data": [1, 2]}, None, "type", "shape and data"),
    ("tensor", {"shape": [2], "data": [1, 2], "dtype": "f32"}, None, "type", "shape and data"),
    ("tensor", {"shape": (2,), "data": [1, 2]}, None, "type", "shape and data"),
    ("tensor", {"shape": [2.0], "data": [1, 2]}, None, "type", "shape and data"),
    ("tensor", {"shape": [-1], "data": []}, None, "type", "shape and data"),
    ("tensor", {"shape": [True], "data": [1]}, None, "type", "shape and data"),
    ("tensor", {"shape": 2, "data": [1, 2]}, None, "type", "shape and data"),
    ("tensor", {"shape": [], "data": 7}, None, "type", "shape and data"),
    ("tensor", {"shape": [1], "data": (1,)}, None, "type", "shape and data"),
    # tensor: bad leaves
    ("tensor", {"shape": [2], "data": [1, "2"]}, None, "type", "finite numbers"),
    ("tensor", {"shape": [1], "data": [True]}, None, "type", "finite numbers"),
    ("tensor", {"shape": [1], "data": [None]}, None, "type", "finite numbers"),
    ("tensor", {"shape": [1], "data": [NAN]}, None, "type", "finite numbers"),
    ("tensor", {"shape": [2], "data": [[1.0], [INF]]}, None, "type", "finite numbers"),
    ("tensor", {"shape": [1], "data": [{"x": 1}]}, None, "type", "finite numbers"),
    ("tensor", {"shape": [1] * 40, "data": _nested(40)}, None, "type", "nested too deeply"),
    # tensor: size mismatch
    ("tensor", {"shape": [3], "data": [1, 2]}, None, "shape", "doesn't match shape"),
    ("tensor", {"shape": [2, 2], "data": [[1, 2], [3]]}, None, "shape", "doesn't match shape"),
    ("tensor", {"shape": [2], "data": [[1, 2], [3, 4]]}, None, "shape", "doesn't match shape"),
    ("tensor", {"shape": [], "data": []}, None, "shape", "doesn't match shape"),
    ("tensor", {"shape": [], "data": [1, 2]}, None, "shape", "doesn't match shape"),
    ("tensor", {"shape": [0], "data": [1]}, None, "shape", "doesn't match shape"),
    # tensor: constraint `shape`
    ("tensor", {"shape": [4], "data": [1, 2, 3, 4]}, {"shape": [2, 2]}, "shape", "shape must be"),
    ("tensor", {"shape": [2, 2], "data": [1, 2, 3, 4]}, {"shape": [4]}, "shape", "shape must be"),
    ("tensor", {"shape": [], "data": [1]}, {"shape": [1]}, "shape", "shape must be"),
]


@pytest.mark.parametrize(("type_name", "value", "constraints", "rule", "fragment"), REJECT_CASES)
def test_rejects(
    type_name: str,
    value: Any,
    constraints: dict[str, Any] | None,
    rule: str,
    fragment: str | None,
) -> None:
    check_constraints("my_var", type_name, constraints)
    with pytest.raises(ValidationFailed) as info:
        validate_value("my_var", type_name, value, constraints)
    assert_rejected(info.value, "my_var", type_name, rule)
    if fragment is not None:
        assert fragment in str(info.value)
    assert info.value.__cause__ is None  # raised "from None": no internal RuleError leaks


def test_rejection_value_is_truncated_in_details() -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_value("big", "string", "x" * 500, {"max_length": 3})
    shown = info.value.details["value"]
    assert len(shown) == 80
    assert shown.endswith("...")
    assert len(str(info.value)) < 300


def test_rejected_errors_are_json_safe() -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_value("v", "float", object())
    assert json.loads(json.dumps(info.value.to_dict()))["code"] == "validation_failed"


# --- check_constraints ------------------------------------------------------------------

VALID_CONSTRAINTS: list[tuple[str, Any]] = [
    ("float", None),
    ("float", {}),
    ("float", {"min": 0}),
    ("float", {"min": -1.5, "max": 2}),
    ("float", {"min": 1, "max": 1}),
    ("integer", {"min": 0, "max": 10}),
    ("integer", {"max": 3.5}),
    ("string", {"min_length": 0, "max_length": 0}),
    ("string", {"min_length": 2, "max_length": 2}),
    ("string", {"pattern": r"^[a-z]+\d*$"}),
    ("string", {"enum": []}),
    ("string", {"enum": ["a", "b"]}),
    ("boolean", {}),
    ("choice", {"choices": []}),
    ("choice", {"choices": ["x"]}),
    ("module", {"allowed_modules": ["Predict"]}),
    ("embedding", {"dimensions": 0}),
    ("embedding", {"dimensions": 768}),
    ("tensor", {"shape": []}),
    ("tensor", {"shape": [2, 3]}),
]


@pytest.mark.parametrize(("type_name", "constraints"), VALID_CONSTRAINTS)
def test_check_constraints_accepts(type_name: str, constraints: Any) -> None:
    result = check_constraints("v", type_name, constraints)
    assert result == (constraints or {})
    assert type(result) is dict
    if constraints is not None:
        assert result is not constraints  # a plain copy


INVALID_CONSTRAINTS: list[tuple[str, Any, str]] = [
    # (type, constraints, message fragment)
    ("float", [("min", 1)], "must be an object"),
    ("float", "min=1", "must be an object"),
    ("float", {"minimum": 0}, "unknown constraint 'minimum'"),
    ("float", {"min_length": 0}, "unknown constraint"),
    ("integer", {"pattern": "x"}, "unknown constraint"),
    ("string", {"min": 0}, "unknown constraint"),
    ("string", {"choices": ["a"]}, "unknown constraint"),
    ("boolean", {"min": 0}, "allowed: none"),
    ("choice", {"enum": ["a"]}, "unknown constraint"),
    ("module", {"choices": ["a"]}, "unknown constraint"),
    ("embedding", {"dims": 3}, "unknown constraint"),
    ("tensor", {"dimensions": 3}, "unknown constraint"),
    # invalid regexes
    ("string", {"pattern": "("}, "invalid value for 'pattern'"),
    ("string", {"pattern": "[a-"}, "invalid value for 'pattern'"),
    ("string", {"pattern": "*abc"}, "invalid value for 'pattern'"),
    ("string", {"pattern": "a{99999999999}"}, "invalid value for 'pattern'"),
    ("string", {"pattern": "(" * 2000 + ")" * 2000}, "invalid value for 'pattern'"),
    ("string", {"pattern": 5}, "invalid value for 'pattern'"),
    # wrong-typed values
    ("float", {"min": "0"}, "invalid value for 'min'"),
    ("float", {"max": True}, "invalid value for 'max'"),
    ("float", {"min": None}, "invalid value for 'min'"),
    ("integer", {"max": [10]}, "invalid value for 'max'"),
    ("string", {"min_length": -1}, "invalid value for 'min_length'"),
    ("string", {"max_length": 2.0}, "invalid value for 'max_length'"),
    ("string", {"max_length": True}, "invalid value for 'max_length'"),
    ("string", {"enum": "red"}, "invalid value for 'enum'"),
    ("string", {"enum": ["red", 1]}, "invalid value for 'enum'"),
    ("choice", {"choices": "ab"}, "invalid value for 'choices'"),
    ("choice", {"choices": [None]}, "invalid value for 'choices'"),
    ("module", {"allowed_modules": "Predict"}, "invalid value for 'allowed_modules'"),
    ("embedding", {"dimensions": -1}, "invalid value for 'dimensions'"),
    ("embedding", {"dimensions": 3.0}, "invalid value for 'dimensions'"),
    ("embedding", {"dimensions": "3"}, "invalid value for 'dimensions'"),
    ("tensor", {"shape": [2, -1]}, "invalid value for 'shape'"),
    ("tensor", {"shape": (2, 3)}, "invalid value for 'shape'"),
    ("tensor", {"shape": [2.0]}, "invalid value for 'shape'"),
    ("tensor", {"shape": 4}, "invalid value for 'shape'"),
    # min above max
    ("float", {"min": 1, "max": 0}, "minimum is above maximum"),
    ("float", {"min": 0.5, "max": 0.25}, "minimum is above maximum"),
    ("integer", {"min": 10, "max": 9}, "minimum is above maximum"),
    ("string", {"min_length": 5, "max_length": 4}, "minimum is above maximum"),
]


@pytest.mark.parametrize(("type_name", "constraints", "fragment"), INVALID_CONSTRAINTS)
def test_check_constraints_rejects(type_name: str, constraints: Any, fragment: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        check_constraints("cfg_var", type_name, constraints)
    assert_rejected(info.value, "cfg_var", type_name, "constraints")
    assert fragment in str(info.value)


@pytest.mark.parametrize("fn", ["check_constraints", "validate_value"])
def test_unknown_type_in_check_and_validate(fn: str) -> None:
    with pytest.raises(UnknownType) as info:
        if fn == "check_constraints":
            check_constraints("v", "nope", {})
        else:
            validate_value("v", "nope", 1)
    assert info.value.code == "unknown_type"


# --- registry ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nope", "", "Float", "FLOAT", " float", None, 3, ["float"]])
def test_get_type_unknown(name: Any) -> None:
    with pytest.raises(UnknownType) as info:
        get_type(name)
    exc = info.value
    assert exc.code == "unknown_type"
    assert isinstance(exc, errors.VariableError)
    assert exc.details == {"type": repr(name)}
    assert repr(name) in exc.message
    for builtin in BUILTIN_TYPES:
        assert builtin in exc.message  # lists the known types


def test_list_types_builtins_first() -> None:
    assert list_types()[: len(BUILTIN_TYPES)] == BUILTIN_TYPES


@pytest.fixture
def custom_types() -> Iterator[list[str]]:
    """Names registered by the test; removed from the module-global registry afterwards."""
    before = dict(types._REGISTRY)
    names: list[str] = []
    try:
        yield names
    finally:
        for name in names:
            types._REGISTRY.pop(name, None)
        # Whatever happened, the registry is exactly as before (built-ins untouched).
        types._REGISTRY.clear()
        types._REGISTRY.update(before)


def _validate_percent(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("must be a number")
    if not 0 <= value <= 100:
        raise ValueError(f"must be within 0..100, got {value}")
    return float(value)


def _percent_constraints(value: float, constraints: Any) -> None:
    step = constraints.get("step")
    if step is not None and value % step != 0:
        raise ValueError(f"must be a multiple of {step}")


@pytest.fixture
def percent(custom_types: list[str]) -> str:
    custom_types.append("percent")
    register_type(
        "percent",
        _validate_percent,
        _percent_constraints,
        constraint_keys={"step": lambda v: isinstance(v, (int, float)) and v > 0},
    )
    return "percent"


PERCENT_ACCEPT = [
    (0, None, 0.0),
    (100, None, 100.0),
    (55.5, None, 55.5),
    (50, {"step": 5}, 50.0),
    (0, {"step": 25}, 0.0),
    (100, {"step": 25}, 100.0),
]


@pytest.mark.parametrize(("value", "constraints", "expected"), PERCENT_ACCEPT)
def test_custom_type_accepts(percent: str, value: Any, constraints: Any, expected: float) -> None:
    check_constraints("pct", percent, constraints)
    assert _same(validate_value("pct", percent, value, constraints), expected)


PERCENT_REJECT = [
    (-0.1, None, "within 0..100"),
    (100.5, None, "within 0..100"),
    ("50", None, "must be a number"),
    (True, None, "must be a number"),
    (None, None, "must be a number"),
    (52, {"step": 5}, "multiple of 5"),
]


@pytest.mark.parametrize(("value", "constraints", "fragment"), PERCENT_REJECT)
def test_custom_type_rejects(percent: str, value: Any, constraints: Any, fragment: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_value("pct", percent, value, constraints)
    assert_rejected(info.value, "pct", percent, "custom")
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("constraints", "fragment"),
    [
        ({"stepp": 5}, "unknown constraint 'stepp'"),
        ({"step": 0}, "invalid value for 'step'"),
        ({"step": "5"}, "invalid value for 'step'"),
    ],
)
def test_custom_type_constraint_keys(percent: str, constraints: Any, fragment: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        check_constraints("pct", percent, constraints)
    assert_rejected(info.value, "pct", percent, "constraints")
    assert fragment in str(info.value)


def test_custom_type_is_listed_and_not_builtin(percent: str) -> None:
    assert percent in list_types()
    assert list_types()[: len(BUILTIN_TYPES)] == BUILTIN_TYPES
    var_type = get_type(percent)
    assert var_type.name == percent
    assert var_type.builtin is False


def test_custom_type_without_constraint_keys_accepts_any_key(custom_types: list[str]) -> None:
    custom_types.append("anything")
    register_type("anything", lambda v: v)
    constraints = {"whatever": object(), "min": 5, "max": 1}
    # No key checks; min > max is still caught for numbers.
    with pytest.raises(ValidationFailed):
        check_constraints("v", "anything", constraints)
    assert check_constraints("v", "anything", {"whatever": 1}) == {"whatever": 1}
    # Without a constraint validator, constraints are ignored at validation time.
    assert validate_value("v", "anything", [1, "x"], {"whatever": 1}) == [1, "x"]


def test_custom_type_can_be_replaced(custom_types: list[str]) -> None:
    custom_types.append("twice")
    register_type("twice", lambda v: v * 2)
    assert validate_value("v", "twice", 2) == 4
    register_type("twice", lambda v: v * 3)
    assert validate_value("v", "twice", 2) == 6


def test_custom_type_empty_exception_message(custom_types: list[str]) -> None:
    def bad(value: Any) -> Any:
        raise ValueError

    custom_types.append("always_bad")
    register_type("always_bad", bad)
    with pytest.raises(ValidationFailed) as info:
        validate_value("v", "always_bad", 1)
    assert_rejected(info.value, "v", "always_bad", "custom")
    assert "ValueError" in str(info.value)


@pytest.mark.parametrize("name", BUILTIN_TYPES)
def test_register_type_cannot_replace_builtin(name: str, custom_types: list[str]) -> None:
    original = get_type(name)
    with pytest.raises(ValueError, match="built-in"):
        register_type(name, lambda v: v)
    assert get_type(name) is original


@pytest.mark.parametrize(
    "name",
    ["", "Percent", "1percent", "_percent", "per-cent", "per cent", "percént", "a" * 65, None, 5],
)
def test_register_type_rejects_bad_names(name: Any, custom_types: list[str]) -> None:
    before = list_types()
    with pytest.raises(ValueError, match="invalid type name"):
        register_type(name, lambda v: v)
    assert list_types() == before


@pytest.mark.parametrize("name", ["a", "percent", "my_type_2", "a" * 64])
def test_register_type_accepts_good_names(name: str, custom_types: list[str]) -> None:
    custom_types.append(name)
    register_type(name, lambda v: v)
    assert get_type(name).name == name


# --- encoding ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [(NAN, "NaN"), (INF, "Infinity"), (-INF, "-Infinity"), (1.5, 1.5), (0.0, 0.0), (-2.0, -2.0)],
)
def test_float_encode_decode_round_trip(value: float, encoded: Any) -> None:
    wire = json.dumps(encode_value("float", value), allow_nan=False)  # strict JSON
    assert _same(json.loads(wire), encoded)
    assert _same(decode_value("float", json.loads(wire)), value)


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity"])
def test_special_float_strings_validate_then_round_trip(text: str) -> None:
    normalized = validate_value("v", "float", text)
    encoded = encode_value("float", normalized)
    assert encoded == text
    assert _same(decode_value("float", json.loads(json.dumps(encoded))), normalized)


@pytest.mark.parametrize(
    ("type_name", "value"),
    [
        ("string", "NaN"),
        ("string", "Infinity"),
        ("choice", "-Infinity"),
        ("integer", 3),
        ("boolean", True),
        ("embedding", [1.0, 2.0]),
        ("tensor", {"shape": [1], "data": [1]}),
        ("float", "hello"),  # not a special name: left alone
    ],
)
def test_encode_decode_leave_other_values_alone(type_name: str, value: Any) -> None:
    assert encode_value(type_name, value) == value
    assert decode_value(type_name, value) == value


# --- errors -----------------------------------------------------------------------------

CODED_ERRORS: list[type[DspexError]] = [
    obj
    for name in errors.__all__
    if isinstance(obj := getattr(errors, name), type)
    and issubclass(obj, DspexError)
    and "code" in vars(obj)
]
ALL_ERRORS: list[type[DspexError]] = [
    obj
    for name in errors.__all__
    if isinstance(obj := getattr(errors, name), type) and issubclass(obj, DspexError)
]


def test_error_codes_are_unique() -> None:
    codes = [cls.code for cls in CODED_ERRORS]
    assert len(codes) == len(set(codes))
    assert len(CODED_ERRORS) >= 20


@pytest.mark.parametrize("cls", CODED_ERRORS, ids=lambda c: c.__name__)
def test_error_from_code_maps_back_to_class(cls: type[DspexError]) -> None:
    exc = error_from_code(cls.code, "boom", {"k": 1})
    assert type(exc) is cls
    assert exc.code == cls.code
    assert exc.message == "boom"
    assert exc.details == {"k": 1}


@pytest.mark.parametrize("code", ["no_such_code", "", "ValidationFailed"])
def test_error_from_code_unknown_falls_back_to_base(code: str) -> None:
    exc = error_from_code(code, "boom")
    assert type(exc) is DspexError
    assert exc.code == "dspex_error"
    assert exc.details == {}


def test_session_expired_is_session_not_found() -> None:
    exc = error_from_code("session_expired", "gone")
    assert type(exc) is SessionExpired
    assert isinstance(exc, SessionNotFound)
    assert exc.code == "session_expired"
    with pytest.raises(SessionNotFound):
        raise exc


def test_retryable_errors() -> None:
    assert set(errors.RETRYABLE_ERRORS) == {errors.StoreUnavailable, errors.LMRateLimited}


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("details", [None, {"variable": "x", "n": 3}])
def test_error_rebuilds_from_args(cls: type[DspexError], details: dict[str, Any] | None) -> None:
    exc = cls("something broke", details)
    # Celery's JSON result stores exc_message = args; the producer calls cls(*args).
    args = json.loads(json.dumps(exc.args))
    # The code travels in the JSON: a producer without this package reads it there.
    assert args == ["something broke", {"code": cls.code, "details": details or {}}]
    rebuilt = cls(*args)
    assert rebuilt.args == exc.args
    assert type(rebuilt) is cls
    assert rebuilt.code == exc.code
    assert rebuilt.message == exc.message == "something broke"
    assert rebuilt.details == exc.details == (details or {})
    assert rebuilt.to_dict() == exc.to_dict()
    assert str(rebuilt) == "something broke"
    assert cls.__name__ in repr(rebuilt)


def test_details_shaped_like_the_wire_form_are_only_unwrapped_when_exact() -> None:
    # Plain details with a "code" key stay details; only the exact wire form unwraps.
    exc = errors.InvalidInputs("x", {"code": 3, "details": {}})
    assert exc.details == {"code": 3, "details": {}}
    exc = errors.InvalidInputs("x", {"code": "a", "details": {}, "more": 1})
    assert exc.details == {"code": "a", "details": {}, "more": 1}
    assert errors.InvalidInputs("x", {"code": "a", "details": {"k": 1}}).details == {"k": 1}


def test_validation_failed_rebuilds_from_args() -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_value("temp", "float", 5, {"max": 1})
    exc = info.value
    rebuilt = type(exc)(*json.loads(json.dumps(exc.args)))
    assert rebuilt.code == "validation_failed"
    assert rebuilt.message == exc.message
    assert rebuilt.details == exc.details
    assert rebuilt.details["rule"] == "max"
