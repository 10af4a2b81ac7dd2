"""The pure core of compile jobs: request checks (compile_request.py) and the built-in
metrics and their registry (metrics.py), as tables."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from dspex_tasks.compile_request import (
    OPTIMIZERS,
    check_examples,
    check_request,
    example_fields,
)
from dspex_tasks.errors import InvalidInputs
from dspex_tasks.metrics import get_metric, metric, registered_metrics, unregister_metric
from dspex_tasks.specs import normalize_spec

SIGNATURE = normalize_spec({"module": "predict", "signature": "question -> answer"})["signature"]


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_every_optimizer_gets_its_defaults(optimizer: str) -> None:
    checked = check_request({"optimizer": optimizer})
    assert checked["optimizer"] == optimizer and checked["metric"] == "exact_match"
    assert set(checked) == {"optimizer", "metric", *OPTIMIZERS[optimizer]}
    assert checked["seed"] == 0 and checked["num_threads"] == 1


def test_defaults_are_bootstrap_fewshot_and_exact_match() -> None:
    assert check_request(None)["optimizer"] == "bootstrap_fewshot"
    assert check_request({})["max_bootstrapped_demos"] == 4


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ([], "options"),
        ({"optimizer": 3}, "optimizer"),
        ({"optimizer": "copro"}, "optimizer"),
        ({"metric": ""}, "metric"),
        ({"metric": "os.system('x')"}, "metric"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"num_threads": 0}, "num_threads"),
        ({"max_rounds": True}, "max_rounds"),
        ({"metric_threshold": 1.5}, "metric_threshold"),
        ({"optimizer": "labeled_fewshot", "k": 0}, "k"),
        ({"optimizer": "mipro_v2", "minibatch": "yes"}, "minibatch"),
        ({"optimizer": "mipro_v2", "num_candidate_programs": 3}, "num_candidate_programs"),
        ({"auto": "heavy"}, "auto"),
        ({"valset": []}, "valset"),
    ],
)
def test_bad_options_name_the_option(options: Any, option: str) -> None:
    with pytest.raises(InvalidInputs) as info:
        check_request(options)
    assert info.value.code == "invalid_inputs"
    assert info.value.details["option"] == option


def test_a_valset_is_examples_or_a_dataset_name() -> None:
    assert check_request({"valset": "dev"})["valset"] == "dev"
    assert check_request({"valset": [{"q": 1}]})["valset"] == [{"q": 1}]


@pytest.mark.parametrize("examples", [None, [], {}, [1], [{}], [{1: "x"}], "text"])
def test_examples_must_be_a_list_of_objects(examples: Any) -> None:
    with pytest.raises(InvalidInputs):
        check_examples(examples)


@pytest.mark.parametrize(
    ("example", "ok"),
    [
        ({"question": "q", "answer": "a"}, True),
        ({"question": "q", "answer": "a", "extra": 1}, True),
        ({"question": "q"}, False),
        ({"answer": "a"}, False),
    ],
)
def test_examples_carry_the_inputs_and_a_label(example: dict[str, Any], ok: bool) -> None:
    if ok:
        example_fields([example], SIGNATURE, "trainset")
    else:
        with pytest.raises(InvalidInputs):
            example_fields([example], SIGNATURE, "trainset")


class _Example(dict[str, Any]):
    def labels(self) -> dict[str, Any]:
        return {k: v for k, v in self.items() if k != "question"}


@pytest.mark.parametrize(
    ("name", "expected", "got", "score"),
    [
        ("exact_match", "Paris", "paris.", 1.0),
        ("exact_match", "Paris", "Paris, France", 0.0),
        ("exact_match", "the Eiffel Tower", "Eiffel tower", 1.0),
        ("contains", "Paris", "It is Paris, France", 1.0),
        ("contains", "Lyon", "Paris", 0.0),
        ("f1", "new york city", "new york", 0.8),
        ("f1", "a b", "c d", 0.0),
        ("f1", "", "", 1.0),
    ],
)
def test_builtin_metrics(name: str, expected: str, got: str, score: float) -> None:
    example = _Example(question="q", answer=expected)
    value = get_metric(name)(example, SimpleNamespace(answer=got))
    assert value == pytest.approx(score)


def test_a_missing_field_scores_zero_and_labels_average() -> None:
    example = _Example(question="q", answer="a", city="x")
    assert get_metric("exact_match")(example, SimpleNamespace(answer="a")) == 0.5


def test_worker_metrics_register_by_name() -> None:
    @metric(name="always_one")
    def always_one(example: Any, prediction: Any, trace: Any = None) -> float:
        return 1.0

    try:
        assert "always_one" in registered_metrics()
        assert get_metric("always_one") is always_one
    finally:
        unregister_metric("always_one")
    with pytest.raises(InvalidInputs):
        get_metric("always_one")
    with pytest.raises(ValueError):
        unregister_metric("f1")
    with pytest.raises(ValueError):
        metric(name="bad name")(always_one)
