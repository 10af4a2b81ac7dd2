"""DSPy's type syntax in signatures (``field_types.py``, ``specs.py``): pure, table-tested."""

from __future__ import annotations

from typing import Any, Literal, Optional

import dspy
import pytest

from dspex_tasks.errors import InvalidInputs, InvalidProgram
from dspex_tasks.field_types import FieldType, parse_type, value_fits
from dspex_tasks.lm.engines import local_schema
from dspex_tasks.lm.engines.echo import _value
from dspex_tasks.programs import build_signature
from dspex_tasks.specs import check_inputs, normalize_signature


def _out(type_text: str) -> dict[str, Any]:
    sig = normalize_signature(f"question -> answer: {type_text}")
    assert sig["inputs"] == [{"name": "question", "type": "str"}]
    [field] = sig["outputs"]
    assert field["name"] == "answer"
    return {k: v for k, v in field.items() if k != "name"}


@pytest.mark.parametrize(
    ("type_text", "normalized"),
    [
        ("str", {"type": "str"}),
        ("int", {"type": "int"}),
        ("float", {"type": "float"}),
        ("bool", {"type": "bool"}),
        ("dict", {"type": "dict"}),
        ("list[str]", {"type": "list[str]"}),
        ("list[int]", {"type": "list[int]"}),
        ("List[float]", {"type": "list[float]"}),
        ("dict[str, int]", {"type": "dict[str, int]"}),
        ("Dict[str,list[int]]", {"type": "dict[str, list[int]]"}),
        ("Optional[int]", {"type": "Optional[int]"}),
        ("int | None", {"type": "Optional[int]"}),
        ("Union[str, None]", {"type": "Optional[str]"}),
        ("Literal['fact', 'opinion']", {"type": "literal", "choices": ["fact", "opinion"]}),
        ('Literal["a, b", "->", "it\'s"]', {"type": "literal", "choices": ["a, b", "->", "it's"]}),
        ("list[Literal['x', 'y']]", {"type": "list[Literal['x', 'y']]"}),
        ("Optional[Literal['x']]", {"type": "Optional[Literal['x']]"}),
        (
            "dict[str, Optional[list[dict[str, float]]]]",
            {"type": "dict[str, Optional[list[dict[str, float]]]]"},
        ),
        ("list[list[bool]]", {"type": "list[list[bool]]"}),
    ],
)
def test_accepted_types_and_their_normal_form(type_text: str, normalized: dict[str, Any]) -> None:
    assert _out(type_text) == normalized
    # The normal form is a fixed point, in string and dict form alike.
    if normalized["type"] != "literal":
        assert _out(normalized["type"]) == normalized
        again = normalize_signature({"inputs": ["q"], "outputs": [{"name": "a", **normalized}]})
        assert again["outputs"] == [{"name": "a", **normalized}]


def test_fields_and_order_are_kept() -> None:
    sig = normalize_signature(
        "context: list[str], question -> kind: Literal['fact', 'opinion'], n: list[int], note"
    )
    assert [f["name"] for f in sig["inputs"]] == ["context", "question"]
    assert [f["name"] for f in sig["outputs"]] == ["kind", "n", "note"]
    assert sig["outputs"][0] == {"name": "kind", "type": "literal", "choices": ["fact", "opinion"]}
    assert sig["outputs"][2] == {"name": "note", "type": "str"}


@pytest.mark.parametrize(
    "type_text",
    [
        "os.system",
        "__import__('x')",
        "__import__('os').mkdir('x')",
        "list[Foo]",
        "Literal[x]",
        "Literal[1, 2]",
        "Literal[]",
        "print()",
        "str.upper",
        "typing.List[int]",
        "list[int, str]",
        "dict[int, str]",
        "Union[int, str]",
        "int | str",
        "Optional",
        "Literal",
        "None",
        "'str'",
        "lambda: 1",
        "list[" * 10 + "int" + "]" * 10,
        "[int]",
        "complex",
    ],
)
def test_refused_types_name_the_field(type_text: str) -> None:
    for signature in (
        f"question -> answer: {type_text}",
        {"inputs": ["question"], "outputs": [{"name": "answer", "type": type_text}]},
    ):
        with pytest.raises(InvalidProgram) as exc:
            normalize_signature(signature)
        assert exc.value.code == "invalid_program"
        assert "'answer'" in exc.value.message and exc.value.details["field"] == "answer"


@pytest.mark.parametrize(
    ("type_text", "good", "bad"),
    [
        ("list[int]", [1, 2], [1, "2"]),
        ("list[int]", [], [True]),
        ("dict[str, list[float]]", {"a": [1, 2.5]}, {"a": [float("nan")]}),
        ("Optional[int]", None, 1.5),
        ("list[Optional[str]]", ["a", None], [1]),
        ("list[Literal['x', 'y']]", ["x", "y"], ["z"]),
        ("dict", {"k": [1]}, [1]),
    ],
)
def test_inputs_are_checked_against_nested_types(type_text: str, good: Any, bad: Any) -> None:
    sig = normalize_signature(f"x: {type_text} -> y")
    assert check_inputs(sig, {"x": good}) == {"x": good}
    with pytest.raises(InvalidInputs) as exc:
        check_inputs(sig, {"x": bad})
    assert exc.value.details["field"] == "x"


def test_dspy_signature_gets_the_python_types() -> None:
    sig = normalize_signature(
        "q -> kind: Literal['a', 'b'], n: list[int], m: dict[str, Optional[list[float]]]"
    )
    fields = build_signature(sig).output_fields
    assert fields["kind"].annotation == Literal["a", "b"]
    assert fields["n"].annotation == list[int]
    assert fields["m"].annotation == dict[str, Optional[list[float]]]  # noqa: UP045


RENDERED = [  # DSPy's rendering of our types in its prompts -> a typed value must parse
    ("Literal['fact', 'opinion']", Literal["fact", "opinion"]),
    ("list[int]", list[int]),
    ("list[Literal['x', 'y']]", list[Literal["x", "y"]]),
    ("dict[str, list[int]]", dict[str, list[int]]),
    ("Union[int, NoneType]", Optional[int]),  # noqa: UP045
    ("Union[list[dict[str, float]], NoneType]", Optional[list[dict[str, float]]]),  # noqa: UP045
    ("dict[str, Any]", dict[str, Any]),
    ("list[Union[bool, NoneType]]", list[Optional[bool]]),  # noqa: UP045
]


@pytest.mark.parametrize(("type_text", "annotation"), RENDERED)
def test_engines_answer_every_accepted_type(type_text: str, annotation: Any) -> None:
    t = parse_type(type_text, rendered=True)
    # echo: the chat text it writes parses as the annotation
    from dspy.adapters.utils import parse_value

    echoed = parse_value(_value("f", type_text, 7, ["w1", "w2"]), annotation)
    assert echoed is not None and value_fits(t, _jsonable(echoed))
    # local: a value the schema allows (the default) renders and parses back
    field = local_schema._field("f", type_text, "")
    assert field.type == t
    schema = local_schema.json_schema([field], 256)["properties"]["f"]
    assert "anyOf" not in schema or t.kind == "dict"  # Optional is answered with a value
    values, _, _ = local_schema._finalize([field], "{}")
    parsed = parse_value(local_schema.render([field], values, chat=True).split("\n")[1], annotation)
    assert value_fits(t, _jsonable(parsed))


def _jsonable(value: Any) -> Any:
    return value.model_dump() if hasattr(value, "model_dump") else value


def test_local_schema_nests() -> None:
    field = local_schema._field("m", "dict[str, list[Literal['a', 'b']]]", "")
    schema = local_schema.json_schema([field], 256)["properties"]["m"]
    assert schema["type"] == "object"
    inner = schema["additionalProperties"]
    assert inner["type"] == "array" and inner["items"] == {"enum": ["a", "b"]}
    raw = '{"m": {"k": ["a", "b"], "j": ["zz"]}}'  # "zz" breaks the type: default, not crash
    values, defaulted, _ = local_schema._finalize([field], raw)
    assert values == {"m": {}} and defaulted == ["m"]
    chat = local_schema.render([field], {"m": {"k": ["a"]}}, chat=True)

    class Sig(dspy.Signature):
        q: str = dspy.InputField()
        m: dict[str, list[Literal["a", "b"]]] = dspy.OutputField()

    assert dspy.ChatAdapter().parse(Sig, chat)["m"] == {"k": ["a"]}


def test_unknown_rendered_type_is_answered_as_text() -> None:
    assert local_schema._field("f", "SomeModel", "").type == FieldType("str")
