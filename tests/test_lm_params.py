"""Table tests for the LM settings a session may choose (dspex_tasks.lm.params)."""

from __future__ import annotations

from typing import Any

import pytest

from dspex_tasks.errors import ValidationFailed
from dspex_tasks.lm.params import SAFE_LM_PARAMS, validate_lm_params, validate_lm_settings


def test_the_safe_params_are_exactly_these() -> None:
    assert set(SAFE_LM_PARAMS) == {"temperature", "top_p", "max_tokens", "n", "stop"}


@pytest.mark.parametrize(
    ("params", "normalized"),
    [
        ({}, {}),
        ({"temperature": 0}, {"temperature": 0}),
        ({"temperature": 2.0}, {"temperature": 2.0}),
        ({"top_p": 1}, {"top_p": 1}),
        ({"top_p": 0.0}, {"top_p": 0.0}),
        ({"max_tokens": 1}, {"max_tokens": 1}),
        ({"max_tokens": 128_000}, {"max_tokens": 128_000}),
        ({"max_tokens": 512.0}, {"max_tokens": 512}),
        ({"n": 16}, {"n": 16}),
        ({"stop": "END"}, {"stop": ["END"]}),
        ({"stop": ["a", "b"]}, {"stop": ["a", "b"]}),
        ({"stop": []}, {"stop": []}),
        ({"temperature": None}, {}),
        ({"temperature": 0.7, "max_tokens": 100}, {"temperature": 0.7, "max_tokens": 100}),
    ],
)
def test_good_params_normalize(params: dict[str, Any], normalized: dict[str, Any]) -> None:
    out = validate_lm_params(params)
    assert out == normalized
    assert {k: type(v) for k, v in out.items()} == {k: type(v) for k, v in normalized.items()}


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("temperature", -0.1, "between 0.0 and 2.0"),
        ("temperature", 2.01, "between 0.0 and 2.0"),
        ("temperature", float("nan"), "between"),
        ("temperature", float("inf"), "between"),
        ("temperature", True, "must be a number"),
        ("temperature", "0.5", "must be a number"),
        ("top_p", 1.5, "between 0.0 and 1.0"),
        ("max_tokens", 0, "between 1 and 128000"),
        ("max_tokens", 128_001, "between 1 and 128000"),
        ("max_tokens", 1.5, "must be an integer"),
        ("max_tokens", False, "must be an integer"),
        ("n", 17, "between 1 and 16"),
        ("stop", ["x"] * 9, "up to 8 strings"),
        ("stop", [""], "up to 8 strings"),
        ("stop", ["x" * 65], "up to 8 strings"),
        ("stop", 5, "up to 8 strings"),
    ],
)
def test_bad_values_are_validation_failed(name: str, value: Any, fragment: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_lm_params({name: value}, source="session s1")
    assert info.value.code == "validation_failed"
    assert info.value.details == {"rule": "lm_param", "param": name}
    assert info.value.message.startswith(f"session s1: {name} ")
    assert fragment in info.value.message


@pytest.mark.parametrize("name", ["api_base", "api_key", "model", "base_url", "headers", "seed"])
def test_endpoint_key_and_model_cannot_be_set(name: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_lm_params({name: "http://evil.example"})
    assert info.value.code == "validation_failed"
    assert info.value.details == {"rule": "lm_param", "param": name}
    assert "cannot be set by a session" in info.value.message


@pytest.mark.parametrize(
    ("profile", "ok"),
    [
        ("default", True),
        ("a", True),
        ("fast-model_v2.1", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("", False),
        ("a b", False),
        ("a/b", False),
        (None, False),
        (3, False),
    ],
)
def test_profile_names(profile: Any, ok: bool) -> None:
    if ok:
        assert validate_lm_settings(profile, {"n": 2}) == {"profile": profile, "params": {"n": 2}}
    else:
        with pytest.raises(ValidationFailed) as info:
            validate_lm_settings(profile, {})
        assert info.value.code == "validation_failed"
        assert info.value.details == {"rule": "lm_profile"}
