"""Compile jobs: wall time and LM calls of ``dspex.compile`` against the same optimizer
run in-process with DSPy directly.

One fake OpenAI-compatible endpoint in its own process (``BENCH_DELAY_MS``, default 20 ms
per call; ``KEY[...]`` questions it answers right once it sees demos), one threads-pool
worker (``workers.worker``) in a subprocess, the test Redis. Per optimizer and round, on
a fresh trainset (no cache carries over between rounds or between the two variants):

* **service**: ``s.compile(...)`` from a Client to its result (enqueue, the worker's
  baseline evaluation, the optimizer, the compiled program's evaluation, a checkpoint per
  step, the new version written);
* **direct**: the same steps with DSPy in this process: ``Evaluate`` of the program,
  the optimizer's ``compile``, ``Evaluate`` of the result (for random search: DSPy's own
  ``BootstrapFewShotWithRandomSearch.compile``, whose zero-shot candidate is the
  baseline), with DSPy's in-memory cache as the only cache.

LM calls are the calls the fake endpoint answered. Targets: service / direct <= 1.1x the
calls and <= 1.2x the wall time. ``BENCH_ROUNDS`` (3), ``BENCH_EXAMPLES`` (20).
Run: ``make bench BENCH=compile``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dspy
from _harness import Proc, env_int, med_spread, redis_url, start_fake_lm, wait_until

from dspex_tasks.client import Client
from dspex_tasks.settings import Settings

KEY_ENV = "BENCH_FAKE_KEY"
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "labeled_fewshot": {"k": 8},
    "bootstrap_fewshot": {"max_bootstrapped_demos": 4, "max_labeled_demos": 8},
    "bootstrap_random_search": {
        "max_bootstrapped_demos": 4,
        "max_labeled_demos": 8,
        "num_candidate_programs": 3,
    },
}


def _profiles(port: int) -> str:
    profile = {
        "model": "openai/fake",
        "api_base": f"http://127.0.0.1:{port}/v1",
        "api_key_env": KEY_ENV,
        "params": {"temperature": 0.0, "max_tokens": 64},
    }
    return json.dumps({"default": profile})


def _fake(port: int, path: str, method: str = "GET") -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method, data=b"{}" if method == "POST" else None
    )
    with urllib.request.urlopen(request) as reply:
        return json.loads(reply.read())


def _calls(port: int) -> int:
    return len(_fake(port, "/_fake/calls")["calls"])


def trainset(tag: str, n: int) -> list[dict[str, str]]:
    easy = " EASY"
    return [
        {
            "question": f"Round {tag}: what is item {i}? KEY[{tag}-{i}]"
            + (easy if i % 3 == 0 else ""),
            "answer": f"{tag}-{i}",
        }
        for i in range(n)
    ]


def direct(name: str, options: dict[str, Any], train: list[dict[str, str]], port: int) -> None:
    """The same compile, with DSPy alone in this process."""
    lm = dspy.LM(
        "openai/fake",
        api_base=f"http://127.0.0.1:{port}/v1",
        api_key="sk-bench",
        temperature=0.0,
        max_tokens=64,
    )
    examples = [dspy.Example(**e).with_inputs("question") for e in train]

    def exact(example: Any, prediction: Any, trace: Any = None) -> float:
        return float(str(prediction.answer).strip().lower() == example.answer.lower())

    evaluate = dspy.Evaluate(devset=examples, metric=exact, num_threads=1, display_progress=False)
    student = dspy.Predict("question -> answer")
    with dspy.context(lm=lm):
        if name == "bootstrap_random_search":
            search = dspy.BootstrapFewShotWithRandomSearch(metric=exact, num_threads=1, **options)
            search.compile(student, trainset=examples, valset=examples)
            return
        evaluate(student)
        if name == "labeled_fewshot":
            compiled = dspy.LabeledFewShot(**options).compile(student, trainset=examples)
        else:
            compiled = dspy.BootstrapFewShot(metric=exact, **options).compile(
                student, trainset=examples
            )
        evaluate(compiled)


def main() -> int:
    rounds = env_int("BENCH_ROUNDS", 3)
    n = env_int("BENCH_EXAMPLES", 20)
    delay_ms = env_int("BENCH_DELAY_MS", 20)
    url = redis_url()
    os.environ[KEY_ENV] = "sk-bench"
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)
    lm, port = start_fake_lm(delay_ms)
    prefix = f"bc{uuid.uuid4().hex[:6]}"
    env = {
        "DSPEX_REDIS_URL": url,
        "DSPEX_KEY_PREFIX": prefix,
        "DSPEX_LM_PROFILES": _profiles(port),
    }
    worker = Proc(
        "worker",
        [
            *(sys.executable, "-m", "celery", "-A", "workers.worker", "worker"),
            *("--pool=threads", "--concurrency=2", "--without-mingle", "--without-gossip"),
            "--loglevel=WARNING",
        ],
        env=env,
    )
    settings = Settings.from_env(
        environ={"DSPEX_LM_PROFILES": _profiles(port)}, redis_url=url, key_prefix=prefix
    )
    client = Client(settings=settings)
    ratios: list[tuple[str, float, float]] = []
    try:
        wait_until(lambda: bool(client.workers()), "the worker to answer a ping")
        for name, options in OPTIMIZERS.items():
            figures: dict[str, list[float]] = {"st": [], "dt": [], "sc": [], "dc": []}
            for r in range(rounds + 1):  # round 0 warms both paths up, and is not counted
                tag = f"{name[:4]}{r}{uuid.uuid4().hex[:4]}"
                train = trainset(tag, n)
                order = ["service", "direct"] if r % 2 else ["direct", "service"]
                for variant in order:
                    _fake(port, "/_fake/reset", "POST")
                    t0 = time.perf_counter()
                    if variant == "service":
                        s = client.create_session(f"{tag}-s")
                        s.create_program("qa", "predict", "question -> answer")
                        s.compile("qa", trainset=train, optimizer=name, options=options).get_result(
                            timeout=600
                        )
                    else:
                        direct(name, options, [dict(e) for e in train], port)
                    elapsed = time.perf_counter() - t0
                    if r:
                        key = variant[0]
                        figures[f"{key}t"].append(elapsed)
                        figures[f"{key}c"].append(_calls(port))
            call_ratio = statistics.median(figures["sc"]) / statistics.median(figures["dc"])
            time_ratio = statistics.median(figures["st"]) / statistics.median(figures["dt"])
            ratios.append((name, call_ratio, time_ratio))
            print(
                f"{name}: {n} examples, {rounds} rounds. LM calls service "
                f"{med_spread(figures['sc'], '.0f')} vs direct {med_spread(figures['dc'], '.0f')}"
                f"; wall time service {med_spread(figures['st'], '.2f')} s vs direct "
                f"{med_spread(figures['dt'], '.2f')} s",
                flush=True,
            )
    finally:
        client.close()
        worker.stop()
        lm.stop()
    missed = False
    for name, call_ratio, time_ratio in ratios:
        ok = call_ratio <= 1.1 and time_ratio <= 1.2
        missed = missed or not ok
        print(
            f"{name}: service/direct calls {call_ratio:.2f}x (target <= 1.1x), wall time "
            f"{time_ratio:.2f}x (target <= 1.2x)" + ("" if ok else "  TARGET MISSED")
        )
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
