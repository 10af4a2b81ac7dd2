"""Table tests for dspex_tasks.specs: signatures, program specs, inputs and options."""

from __future__ import annotations

from typing import Any

import pytest

from dspex_tasks.errors import InvalidInputs, InvalidProgram
from dspex_tasks.specs import (
    check_inputs,
    check_options,
    inputs_json,
    normalize_signature,
    normalize_spec,
    strip_lm_state,
)


def _f(name: str, type_: str = "str", **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, **extra}


@pytest.mark.parametrize(
    ("text", "inputs", "outputs"),
    [
        ("question -> answer", [_f("question")], [_f("answer")]),
        ("q->a", [_f("q")], [_f("a")]),
        ("a, b -> c: int", [_f("a"), _f("b")], [_f("c", "int")]),
        ("x: list[str] -> y: float", [_f("x", "list[str]")], [_f("y", "float")]),
        ("  q  ->  ok: bool , n:int ", [_f("q")], [_f("ok", "bool"), _f("n", "int")]),
        ("d: dict -> v: list[float]", [_f("d", "dict")], [_f("v", "list[float]")]),
    ],
)
def test_string_signatures_normalize(
    text: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]
) -> None:
    assert normalize_signature(text) == {"instructions": "", "inputs": inputs, "outputs": outputs}


def test_structured_signature_keeps_desc_choices_and_instructions() -> None:
    sig = {
        "instructions": "Be terse.",
        "inputs": ["q", {"name": "ctx", "desc": "background"}],
        "outputs": [{"name": "label", "choices": ["yes", "no"]}],
    }
    assert normalize_signature(sig) == {
        "instructions": "Be terse.",
        "inputs": [_f("q"), _f("ctx", desc="background")],
        "outputs": [_f("label", "literal", choices=["yes", "no"])],
    }


@pytest.mark.parametrize(
    ("signature", "fragment"),
    [
        ("question answer", "expected 'inputs -> outputs'"),
        ("a -> b -> c", "expected 'inputs -> outputs'"),
        ("-> answer", "signature needs 1-32 inputs"),
        ("question ->", "signature needs 1-32 outputs"),
        ("q -> reasoning", "reserved by DSPy modules"),
        ("q -> trajectory", "reserved by DSPy modules"),
        ("q -> 1answer", "use an identifier"),
        ("q -> a-b", "use an identifier"),
        ("q -> a: list[os.system]", "unsupported type"),
        ("q -> a: literal", "needs choices"),
        ("q -> q", "repeats field names: ['q']"),
        ("x" * 20_001, "expected 'inputs -> outputs'"),
        (42, "must be a string"),
        (None, "must be a string"),
        ({"inputs": ["q"], "outputs": ["a"], "eval": "1"}, "unknown keys: ['eval']"),
        ({"inputs": ["q"], "outputs": []}, "needs 1-32 outputs"),
        ({"inputs": [f"f{i}" for i in range(33)], "outputs": ["a"]}, "needs 1-32 inputs"),
        ({"inputs": [{"name": "q", "kind": "x"}], "outputs": ["a"]}, "unknown keys: ['kind']"),
        ({"inputs": [7], "outputs": ["a"]}, "must be a name or an object"),
        ({"inputs": ["q"], "outputs": [{"name": "a", "choices": []}]}, "non-empty list"),
        ({"inputs": ["q"], "outputs": [{"name": "a", "choices": [1]}]}, "non-empty list"),
        ({"inputs": ["q"], "outputs": [{"name": "a", "desc": 5}]}, "desc must be a string"),
        ({"instructions": 5, "inputs": ["q"], "outputs": ["a"]}, "instructions must be"),
    ],
)
def test_bad_signatures_are_invalid_program(signature: Any, fragment: str) -> None:
    with pytest.raises(InvalidProgram) as info:
        normalize_signature(signature)
    assert info.value.code == "invalid_program"
    assert fragment in info.value.message


@pytest.mark.parametrize(
    ("spec", "config"),
    [
        ({"module": "predict", "signature": "q -> a"}, {}),
        ({"module": "chain_of_thought", "signature": "q -> a", "config": None}, {}),
        (
            {"module": "react", "signature": "q -> a", "config": {"tools": ["t1"]}},
            {"tools": ["t1"]},
        ),
        (
            {"module": "react", "signature": "q -> a", "config": {"tools": ["t"], "max_iters": 50}},
            {"tools": ["t"], "max_iters": 50},
        ),
        ({"module": "multi_chain_comparison", "signature": "q -> a", "config": {"M": 1}}, {"M": 1}),
    ],
)
def test_good_specs_normalize(spec: dict[str, Any], config: dict[str, Any]) -> None:
    out = normalize_spec(spec)
    assert out["module"] == spec["module"]
    assert out["config"] == config
    assert out["signature"] == normalize_signature("q -> a")
    assert out["state"] is None


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("predict", "must be a JSON object"),
        ({"module": "predict", "signature": "q -> a", "code": "x"}, "unknown keys: ['code']"),
        ({"module": "Predict", "signature": "q -> a"}, "unknown module 'Predict'"),
        ({"signature": "q -> a"}, "unknown module None"),
        ({"module": "predict", "signature": "q -> a", "config": ["x"]}, "must be an object"),
        ({"module": "predict", "signature": "q -> a", "config": {"n": 1}}, "does not take"),
        ({"module": "react", "signature": "q -> a"}, "react needs config.tools"),
        ({"module": "react", "signature": "q -> a", "config": {"tools": []}}, "react needs"),
        ({"module": "react", "signature": "q -> a", "config": {"tools": ["a b"]}}, "react needs"),
        (
            {"module": "react", "signature": "q -> a", "config": {"tools": ["t"], "max_iters": 51}},
            "max_iters must be 1-50",
        ),
        (
            {"module": "react", "signature": "q -> a", "config": {"tools": "t"}},
            "'tools' must be list",
        ),
        (
            {"module": "multi_chain_comparison", "signature": "q -> a", "config": {"M": 11}},
            "M must be 1-10",
        ),
        (
            {"module": "multi_chain_comparison", "signature": "q -> a", "config": {"M": True}},
            "'M' must be int",
        ),
        ({"module": "predict", "signature": "q -> a", "state": []}, "program state must be"),
        ({"module": "predict", "signature": "q a"}, "expected 'inputs -> outputs'"),
    ],
)
def test_bad_specs_are_invalid_program(spec: Any, fragment: str) -> None:
    with pytest.raises(InvalidProgram) as info:
        normalize_spec(spec)
    assert info.value.code == "invalid_program"
    assert fragment in info.value.message


@pytest.mark.parametrize(
    ("state", "stripped"),
    [
        ({"lm": {"model": "x"}, "demos": []}, {"lm": None, "demos": []}),
        (
            {"predict": {"lm": {"api_base": "http://evil"}, "demos": [1]}},
            {"predict": {"lm": None, "demos": [1]}},
        ),
        ({"demos": [], "signature": {"x": 1}}, {"demos": [], "signature": {"x": 1}}),
        ({"lm": None}, {"lm": None}),
    ],
)
def test_strip_lm_state_blanks_lm_at_both_levels(
    state: dict[str, Any], stripped: dict[str, Any]
) -> None:
    assert strip_lm_state(state) == stripped
    spec = normalize_spec({"module": "predict", "signature": "q -> a", "state": state})
    assert spec["state"] == stripped


TYPED = normalize_signature(
    {
        "inputs": [
            "s",
            "i: int",
            "f: float",
            "b: bool",
            "ls: list[str]",
            "li: list[int]",
            "lf: list[float]",
            "d: dict",
            {"name": "c", "choices": ["x", "y"]},
        ],
        "outputs": ["a"],
    }
)
GOOD_INPUTS = {
    "s": "t",
    "i": 3,
    "f": 0.5,
    "b": False,
    "ls": ["a"],
    "li": [1],
    "lf": [1, 2.5],
    "d": {},
    "c": "y",
}


def test_check_inputs_accepts_every_declared_type() -> None:
    assert check_inputs(TYPED, GOOD_INPUTS) == GOOD_INPUTS


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("s", 1, "str"),
        ("i", 1.5, "int"),
        ("i", True, "int"),
        ("f", float("nan"), "float"),
        ("f", "1", "float"),
        ("b", 1, "bool"),
        ("ls", "a", "list[str]"),
        ("ls", [1], "list[str]"),
        ("li", [True], "list[int]"),
        ("lf", [1, "2"], "list[float]"),
        ("d", [], "dict"),
        ("c", "z", "one of ['x', 'y']"),
    ],
)
def test_check_inputs_refuses_wrong_types(name: str, value: Any, expected: str) -> None:
    with pytest.raises(InvalidInputs) as info:
        check_inputs(TYPED, {**GOOD_INPUTS, name: value})
    assert info.value.code == "invalid_inputs"
    assert info.value.details == {"field": name, "expected": expected}


@pytest.mark.parametrize(
    ("inputs", "details"),
    [
        ({"q": "x", "extra": 1}, {"missing": [], "extra": ["extra"]}),
        ({}, {"missing": ["q"], "extra": []}),
        ({"other": 1}, {"missing": ["q"], "extra": ["other"]}),
    ],
)
def test_check_inputs_names_missing_and_extra(
    inputs: dict[str, Any], details: dict[str, Any]
) -> None:
    with pytest.raises(InvalidInputs) as info:
        check_inputs(normalize_signature("q -> a"), inputs)
    assert info.value.code == "invalid_inputs"
    assert info.value.details == details


@pytest.mark.parametrize("inputs", [["q"], "q", None, 3])
def test_check_inputs_needs_an_object(inputs: Any) -> None:
    with pytest.raises(InvalidInputs, match="inputs must be a JSON object") as info:
        check_inputs(normalize_signature("q -> a"), inputs)
    assert info.value.code == "invalid_inputs"


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("inputs", "encoded"),
    [({"q": "x"}, b'{"q":"x"}'), ({"q": [1, 2.5, None]}, b'{"q":[1,2.5,null]}')],
)
def test_inputs_json_encodes(inputs: Any, encoded: bytes) -> None:
    assert inputs_json(inputs) == encoded


@pytest.mark.parametrize("inputs", [{"q": "\ud800"}, {"q": _nested(300)}, {1: "x"}])
def test_inputs_json_refuses_what_json_cannot_carry(inputs: Any) -> None:
    with pytest.raises(InvalidInputs, match="cannot be encoded as JSON") as info:
        inputs_json(inputs)
    assert info.value.code == "invalid_inputs"


SIG2 = normalize_signature("q -> answer, count: int")


@pytest.mark.parametrize(
    ("options", "mapping"),
    [
        (None, {}),
        ({}, {}),
        ({"store_outputs": None}, {}),
        ({"store_outputs": ["answer"]}, {"answer": "answer"}),
        ({"store_outputs": ["answer", "count"]}, {"answer": "answer", "count": "count"}),
        ({"store_outputs": {"count": "n"}}, {"count": "n"}),
    ],
)
def test_check_options_maps_outputs_to_variables(options: Any, mapping: dict[str, str]) -> None:
    assert check_options(options, SIG2) == mapping


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ("all", "options must be an object"),
        ({"unknown_option": True}, "options must be an object"),
        ({"store_outputs": "answer"}, "must be a list of output fields"),
        ({"store_outputs": [1]}, "must be a list of output fields"),
        ({"store_outputs": {"answer": 1}}, "must be a list of output fields"),
        ({"store_outputs": ["reasoning"]}, "does not output: ['reasoning']"),
        ({"store_outputs": {"nope": "answer"}}, "does not output: ['nope']"),
    ],
)
def test_bad_options_are_invalid_inputs(options: Any, fragment: str) -> None:
    with pytest.raises(InvalidInputs) as info:
        check_options(options, SIG2)
    assert info.value.code == "invalid_inputs"
    assert fragment in info.value.message
