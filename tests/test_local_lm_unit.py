"""``dspex/local`` pieces that need no model: schema, salvage, rendering, profile choice."""

from __future__ import annotations

import json
import random
from typing import Literal

import dspy
import pytest

from dspex_tasks import lm as lm_module
from dspex_tasks.lm import LMRegistry
from dspex_tasks.lm.engines import local as local_lm
from dspex_tasks.lm.engines import local_schema, local_stream

SYSTEM = """Your input fields are:
1. `question` (str):
Your output fields are:
1. `reasoning` (str):
2. `n` (int): a count
3. `mood` (Literal['happy', 'so, so', "it's bad"]):
4. `tags` (list[str]):
5. `ok` (bool):
6. `score` (float):
7. `extra` (dict[str, Any]):
All interactions will be structured in the following way, with the appropriate values filled in.
"""


class Sig(dspy.Signature):
    question: str = dspy.InputField()
    reasoning: str = dspy.OutputField()
    n: int = dspy.OutputField(desc="a count")
    mood: Literal["happy", "so, so", "it's bad"] = dspy.OutputField()
    tags: list[str] = dspy.OutputField()
    ok: bool = dspy.OutputField()
    score: float = dspy.OutputField()
    extra: dict = dspy.OutputField()  # type: ignore[type-arg]


def test_fields_and_schema() -> None:
    fields = local_schema._fields(SYSTEM)
    assert [f.kind for f in fields] == ["str", "int", "literal", "list", "bool", "float", "dict"]
    assert fields[2].choices == ("happy", "so, so", "it's bad")
    assert fields[1].desc == "a count"
    schema = local_schema.json_schema(fields, 256)
    props = schema["properties"]
    assert schema["required"] == [f.name for f in fields]
    assert schema["additionalProperties"] is False
    assert props["n"] == {"type": "integer"} and props["score"] == {"type": "number"}
    assert props["ok"] == {"type": "boolean"}
    assert props["mood"] == {"enum": ["happy", "so, so", "it's bad"]}
    assert props["tags"]["type"] == "array" and props["tags"]["items"]["type"] == "string"
    assert props["extra"]["type"] == "object"
    assert 16 <= props["reasoning"]["maxLength"] <= 800
    # A smaller budget gives smaller strings.
    small = local_schema.json_schema(fields, 32)["properties"]["reasoning"]["maxLength"]
    assert small < props["reasoning"]["maxLength"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"a": "xy", "n": 12', {"a": "xy"}),  # the cut-off number may be incomplete
        ('{"a": "xy", "n": 12,', {"a": "xy", "n": 12}),
        ('{"a": "some te', {"a": "some te"}),
        ('{"a": "x", "t": ["p", "q', {"a": "x", "t": ["p", "q"]}),
        ('{"a": "x", "t": [1, 23', {"a": "x", "t": [1]}),
        ('{"a": "x", "b', {"a": "x"}),
        ('{"a": "x", "ok": tr', {"a": "x"}),
        ('{"a": "line\nbreak", "n": 1}', {"a": "line\nbreak", "n": 1}),
        ("", {}),
    ],
)
def test_salvage(raw: str, expected: dict[str, object]) -> None:
    assert local_schema.salvage(raw) == expected


def test_truncated_output_still_parses_through_chat_adapter() -> None:
    fields = local_schema._fields(SYSTEM)
    values, defaulted, complete = local_schema._finalize(fields, '{"reasoning": "because [[ ## n')
    assert not complete and "reasoning" not in defaulted and "n" in defaulted
    text = local_schema.render(fields, values, chat=True)
    parsed = dspy.ChatAdapter().parse(Sig, text)
    assert parsed["reasoning"].startswith("because")
    assert parsed["n"] == 0 and parsed["mood"] == "happy" and parsed["tags"] == []
    assert parsed["ok"] is False and parsed["score"] == 0.0 and parsed["extra"] == {}


def test_full_output_parses_through_both_adapters() -> None:
    fields = local_schema._fields(SYSTEM)
    raw = (
        '{"reasoning": "r", "n": 3, "mood": "so, so", "tags": ["a"], "ok": true, '
        '"score": 2, "extra": {"k": 1}}'
    )
    values, defaulted, complete = local_schema._finalize(fields, raw)
    assert complete and not defaulted and isinstance(values["score"], float)
    for adapter, chat in ((dspy.ChatAdapter(), True), (dspy.JSONAdapter(), False)):
        parsed = adapter.parse(Sig, local_schema.render(fields, values, chat=chat))
        assert parsed["n"] == 3 and parsed["mood"] == "so, so" and parsed["ok"] is True
        assert parsed["tags"] == ["a"] and parsed["score"] == 2.0


def test_default_profile_follows_availability(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_lm, "available", lambda: False)
    assert LMRegistry({}).model_of("default") == lm_module.ECHO_MODEL
    monkeypatch.setattr(local_lm, "available", lambda: True)
    registry = LMRegistry({})
    assert registry.model_of("default") == local_lm.LOCAL_MODEL
    assert registry.model_of("local") == local_lm.LOCAL_MODEL


def test_model_path_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(local_lm.MODEL_PATH_ENV, "/nonexistent/model.gguf")
    assert str(local_lm.model_path()) == "/nonexistent/model.gguf"
    assert local_lm.available() is False


STREAM_RAW = json.dumps(
    {
        "reasoning": '  Because [[ ## n ## ]] [ [[x \\ "q" \u00e9\U0001f600 tab\there\nnext  ',
        "n": 12,
        "mood": "so, so",
        "tags": ["a, b", "[[c"],
        "ok": True,
        "score": 2,
        "extra": {"k": [1, {"z": "}"}]},
    }
)


@pytest.mark.parametrize("ascii_only", [True, False])
def test_streamed_rendering_is_a_prefix_of_every_cut_of_the_answer(ascii_only: bool) -> None:
    """At every point the model may stop, the streamed deltas then ``finish`` give
    exactly what the unstreamed engine renders for that text."""
    fields = local_schema._fields(SYSTEM)
    raw = STREAM_RAW if ascii_only else json.dumps(json.loads(STREAM_RAW), ensure_ascii=False)
    rng = random.Random(raw)
    for cut in range(len(raw) + 1):
        text = raw[:cut]
        values, _, _ = local_schema._finalize(fields, text)
        final = local_schema.render(fields, values, chat=True)
        stream = local_stream.ChatRenderStream(fields)
        deltas, i = [], 0
        while i < len(text):
            step = rng.randint(1, 4)
            deltas.append(stream.feed(text[i : i + step]))
            i += step
        streamed = "".join(deltas)
        assert final.startswith(streamed), (cut, streamed, final)
        assert streamed + stream.finish(final) == final
    # Token by token: the reasoning's text goes out as it is generated, and at the end
    # only the closing section is left.
    stream = local_stream.ChatRenderStream(fields)
    early = "".join(stream.feed(c) for c in raw[:40])
    assert early.startswith("[[ ## reasoning ## ]]\nBecause [ [ ## n")
    streamed = early + "".join(stream.feed(c) for c in raw[40:])
    final = local_schema.render(fields, local_schema._finalize(fields, raw)[0], chat=True)
    assert final == streamed + "[[ ## completed ## ]]\n"


def test_streamed_rendering_stops_when_the_fields_come_out_of_order() -> None:
    fields = local_schema._fields(SYSTEM)
    stream = local_stream.ChatRenderStream(fields)
    assert stream.feed('{"n": 3, "reasoning": "x"') == ""
    final = local_schema.render(fields, local_schema._finalize(fields, '{"n": 3}')[0], chat=True)
    assert stream.finish(final) == final
