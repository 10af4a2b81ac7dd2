"""DSPy optimizers as a list of checkpointed steps (worker side; no Redis here).

A compile is cut into steps whose results are JSON: the baseline evaluation, the
optimizer's compile (its program state, ``dump_state``), the compiled program's
evaluation -- or, for ``bootstrap_random_search``, one step per candidate seed, each
DSPy's own ``BootstrapFewShotWithRandomSearch`` restricted to that seed, so the calls and
the choice of the best candidate are DSPy's. After each step ``save`` keeps every result
so far; a later delivery of the same run hands them back as ``checkpoint`` and only the
steps not done yet run (the LM calls of the step cut short are answered by the shared LM
cache). Scores are fractions in [0, 1].
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import dspy

from dspex_tasks.errors import InvalidInputs
from dspex_tasks.programs import build_module

__all__ = ["CompileOutcome", "Progress", "compile_program", "examples"]

log = logging.getLogger(__name__)

#: ``progress(step, total, best_score)`` after each step.
Progress = Callable[[int, int, float | None], None]
Step = tuple[str, Callable[[dict[str, Any]], Any]]


@dataclass(frozen=True)
class CompileOutcome:
    """The compiled program's state (``dump_state`` JSON) and its scores."""

    state: dict[str, Any] | None
    score: float
    baseline_score: float


def examples(raw: list[dict[str, Any]], signature: Mapping[str, Any]) -> list[Any]:
    """``dspy.Example`` objects whose inputs are the signature's input fields."""
    names = [f["name"] for f in signature["inputs"]]
    return [dspy.Example(**e).with_inputs(*names) for e in raw]


def _fraction(percent: Any) -> float:
    return round(float(percent) / 100.0, 6)


class _Compile:
    """One compile's inputs, and the steps of its optimizer."""

    def __init__(
        self,
        spec: Mapping[str, Any],
        trainset: list[Any],
        valset: list[Any],
        options: Mapping[str, Any],
        metric: Callable[..., Any],
    ) -> None:
        self.spec = spec
        self.trainset = trainset
        self.valset = valset
        self.options = options
        self.metric = metric

    def student(self, state: Mapping[str, Any] | None = None) -> Any:
        module = build_module({**self.spec, "state": None})
        if state is not None:
            module.load_state(dict(state))
        elif self.spec.get("state"):
            module.load_state(self.spec["state"])
        return module

    def evaluate(self, program: Any) -> float:
        evaluate = dspy.Evaluate(
            devset=self.valset,
            metric=self.metric,
            num_threads=self.options["num_threads"],
            display_progress=False,
            display_table=False,
        )
        return _fraction(evaluate(program).score)

    # --- optimizers with one compile step ----------------------------------------------

    def _optimized(self) -> Any:
        o, student = self.options, self.student()
        name = o["optimizer"]
        if name == "labeled_fewshot":
            return dspy.LabeledFewShot(k=o["k"]).compile(student, trainset=self.trainset)
        if name == "bootstrap_fewshot":
            optimizer = dspy.BootstrapFewShot(
                metric=self.metric,
                metric_threshold=o["metric_threshold"],
                max_bootstrapped_demos=o["max_bootstrapped_demos"],
                max_labeled_demos=o["max_labeled_demos"],
                max_rounds=o["max_rounds"],
            )
            return optimizer.compile(student, trainset=self.trainset)
        if name == "mipro_v2":
            optimizer = dspy.MIPROv2(
                metric=self.metric,
                auto="light",
                max_bootstrapped_demos=o["max_bootstrapped_demos"],
                max_labeled_demos=o["max_labeled_demos"],
                num_threads=o["num_threads"],
                seed=o["seed"],
                verbose=False,
            )
            return optimizer.compile(
                student,
                trainset=self.trainset,
                valset=self.valset,
                # DSPy refuses minibatches larger than the valset (its size is 35).
                minibatch=o["minibatch"] and len(self.valset) > 35,
                seed=o["seed"],
            )
        raise InvalidInputs(f"unknown optimizer {name!r}", {"option": "optimizer"})

    def single_steps(self) -> list[Step]:
        return [
            ("baseline", lambda done: self.evaluate(self.student())),
            ("compile", lambda done: self._optimized().dump_state()),
            ("evaluate", lambda done: self.evaluate(self.student(done["compile"]))),
        ]

    # --- random search: one step per candidate seed ------------------------------------

    def _candidate(self, seed: int, done: dict[str, Any]) -> dict[str, Any]:
        o = self.options
        search = dspy.BootstrapFewShotWithRandomSearch(
            metric=self.metric,
            max_bootstrapped_demos=o["max_bootstrapped_demos"],
            max_labeled_demos=o["max_labeled_demos"],
            max_rounds=o["max_rounds"],
            num_candidate_programs=o["num_candidate_programs"],
            num_threads=o["num_threads"],
            metric_threshold=o["metric_threshold"],
        )
        program = search.compile(
            self.student(), trainset=self.trainset, valset=self.valset, restrict=[seed]
        )
        score = _fraction(program.candidate_programs[0]["score"])
        best = _best_candidate(done)
        # Only a new best keeps its state: the checkpoint stays one program large.
        keep = best is None or score > best["score"]
        return {"score": score, "state": program.dump_state() if keep else None}

    def search_steps(self) -> list[Step]:
        steps: list[Step] = []
        if self.spec.get("state"):  # the zero-shot candidate is not the program as stored
            steps.append(("baseline", lambda done: self.evaluate(self.student())))
        for seed in range(-3, self.options["num_candidate_programs"]):
            steps.append((f"seed{seed}", functools.partial(self._candidate, seed)))
        return steps


def _best_candidate(done: Mapping[str, Any]) -> dict[str, Any] | None:
    """The first candidate with the highest score (DSPy's choice), or None."""
    best: dict[str, Any] | None = None
    for name, result in done.items():
        if name.startswith("seed") and (best is None or result["score"] > best["score"]):
            best = result
    return best


def _best_score(done: Mapping[str, Any]) -> float | None:
    scores = [v for k, v in done.items() if k in ("baseline", "evaluate")]
    scores += [v["score"] for k, v in done.items() if k.startswith("seed")]
    return max(scores) if scores else None


def compile_program(
    spec: Mapping[str, Any],
    trainset: list[Any],
    valset: list[Any],
    options: Mapping[str, Any],
    metric: Callable[..., Any],
    *,
    checkpoint: Mapping[str, Any] | None,
    save: Callable[[dict[str, Any]], None],
    progress: Progress,
) -> CompileOutcome:
    """Run the optimizer ``options["optimizer"]`` step by step (call it under
    ``dspy.context(lm=...)``).

    ``checkpoint``: the results of the steps a former delivery finished (``save``'s
    argument); those steps do not run again.
    """
    job = _Compile(spec, trainset, valset, options, metric)
    search = options["optimizer"] == "bootstrap_random_search"
    steps = job.search_steps() if search else job.single_steps()
    done: dict[str, Any] = dict((checkpoint or {}).get("done") or {})
    restored = [n for n, (name, _) in enumerate(steps, 1) if name in done]
    if restored:
        log.info("compile resumes after %d of %d steps", len(restored), len(steps))
        progress(max(restored), len(steps), _best_score(done))
    stop_at = options.get("stop_at_score")
    for n, (name, run) in enumerate(steps, 1):
        if name not in done:
            done[name] = run(done)
            save({"done": done})
            progress(n, len(steps), _best_score(done))
        stop_here = search and stop_at is not None and name.startswith("seed")
        if stop_here and done[name]["score"] >= stop_at:
            break
    if search:
        best = _best_candidate(done)
        assert best is not None
        baseline = done.get("baseline", done["seed-3"]["score"])
        return CompileOutcome(best["state"], best["score"], baseline)
    return CompileOutcome(done["compile"], done["evaluate"], done["baseline"])
