"""Compile jobs end to end (DESIGN.md §12): real threads-pool workers (``workers.worker``
subprocesses), real Redis, the fake OpenAI server answering ``KEY[...]`` questions right
once a program has demos -- so an optimizer raises the metric.

Covered: a bootstrap_fewshot compile that raises the metric, its progress (stream and
Celery state), versions and rollback, the optimization lock (force, a lapsed lease, the
code through Celery), cancel, stored datasets, a worker metric module, checks before
enqueue, and a worker killed with -9 mid-compile: the run resumes from its checkpoint,
pays at most 10 % more LM calls than an uninterrupted compile and ends with the same
program.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_openai import FakeOpenAI
from support.dbs import db_url
from support.polling import wait_until
from support.procs import Proc, base_env, start_worker, stopping

from dspex_tasks.app import COMPILE_TASK
from dspex_tasks.client import Client, SessionHandle, TaskHandle
from dspex_tasks.errors import (
    DatasetNotFound,
    HistoryUnavailable,
    InvalidInputs,
    OptimizationInProgress,
    PayloadTooLarge,
    RunCancelled,
)
from dspex_tasks.settings import Settings
from dspex_tasks.store import SessionStore

QA = "question -> answer"
#: KEY[aN] questions: the fake answers aN once it sees demos (or EASY), else "fake answer".
TRAIN = [
    {
        "question": f"What is item {n}? KEY[a{n}]" + (" EASY" if n % 3 == 0 else ""),
        "answer": f"a{n}",
    }
    for n in range(10)
]


class Stack:
    """The fake LM, the environment of the workers, a Client, and the running workers."""

    def __init__(self, fake: FakeOpenAI, env: dict[str, str], tmp: Path) -> None:
        self.fake, self.env, self.tmp = fake, env, tmp
        self.client = Client(settings=Settings.from_env(env))
        self.store: SessionStore = self.client.store
        self.workers: list[Proc] = []

    def worker(self) -> Proc:
        proc = start_worker(self.env, self.tmp, app="workers.worker", concurrency=4)
        self.workers.append(proc)
        proc.wait_log(" ready.", 60)
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {w.name}\n{w.log()[-4000:]}" for w in self.workers)

    def session(self, program: str = "qa") -> SessionHandle:
        s = self.client.create_session(f"c-{uuid.uuid4().hex[:10]}")
        s.create_program(program, "predict", QA)
        return s


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with FakeOpenAI() as fake:
        profiles = {
            "default": {
                "model": "openai/fake",
                "api_base": fake.base_url,
                "api_key_env": "FAKE_KEY",
                "params": {"temperature": 0.0, "max_tokens": 64},
            }
        }
        env = base_env(
            db_url(redis_url, "compile"),
            f"c{uuid.uuid4().hex[:6]}",
            DSPEX_LM_PROFILES=json.dumps(profiles),
            FAKE_KEY="sk-compile-test",
            DSPEX_METRIC_MODULES="compile_metrics",
            DSPEX_VISIBILITY_TIMEOUT_S="3",
            DSPEX_TASK_TIME_LIMIT_S="60",
        )
        s = Stack(fake, env, tmp_path_factory.mktemp("compile"))
        try:
            with stopping() as procs:
                s.workers = procs
                s.worker()
                yield s
        finally:
            s.client.close()


def progress_of(h: TaskHandle) -> list[dict[str, Any]]:
    return [e.data for e in h.stream(block_s=30) if e.type == "progress"]


# --- a compile, its progress, its versions -----------------------------------------------


def test_bootstrap_fewshot_raises_the_metric_with_progress_in_order(stack: Stack) -> None:
    s = stack.session()
    stack.fake.delay_s = 0.03  # long enough to see Celery's PROGRESS state
    try:
        h = s.compile("qa", trainset=TRAIN, metric="exact_match", optimizer="bootstrap_fewshot")
        seen = wait_until(lambda: h.progress, 30, interval=0.01, what="PROGRESS state")
    finally:
        stack.fake.delay_s = 0.0
    result = h.get_result(timeout=60)
    assert set(seen) == {"step", "total", "best_score"} and seen["total"] == 3
    assert result["session_id"] == s.id and result["program_id"] == "qa"
    assert result["baseline_score"] == pytest.approx(0.4)  # the EASY questions only
    assert result["score"] == 1.0 > result["baseline_score"]
    assert 0 <= result["baseline_score"] <= 1 and result["duration_ms"] > 0
    assert result["lm"]["usage"]["calls"] >= len(TRAIN)
    events = list(h.stream(block_s=5))
    progress = [e.data for e in events if e.type == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3]
    assert all(p["total"] == 3 for p in progress)
    assert progress[0]["best_score"] == result["baseline_score"]
    assert progress[-1]["best_score"] == result["score"]
    assert events[-1].type == "done" and events[-1].data == result
    spec = s.program("qa")
    assert spec["state"]["demos"], "the compiled program carries its demos"
    assert s.runs()[0].status == "succeeded" and s.runs()[0].task == COMPILE_TASK


def test_each_compile_is_a_new_version_and_rollback_writes_another(stack: Stack) -> None:
    s = stack.session()
    first = s.program("qa")
    h = s.compile("qa", trainset=TRAIN, optimizer="labeled_fewshot", options={"k": 3})
    result = h.get_result(timeout=60)
    history = s.program_history("qa")
    assert [v["version"] for v in history] == [2, 1] == [result["version"], 1]
    assert history[0]["run_id"] == h.id and history[0]["score"] == result["score"] == 1.0
    assert history[1]["run_id"] is None and history[1]["score"] is None
    assert history[0]["created_at"] >= history[1]["created_at"]
    assert len(s.program("qa")["state"]["demos"]) == 3

    assert s.rollback_program("qa", 1) == 3
    assert s.program("qa") == first
    assert [v["version"] for v in s.program_history("qa")] == [3, 2, 1]
    with pytest.raises(HistoryUnavailable):
        s.rollback_program("qa", 99)


# --- the optimization lock ----------------------------------------------------------------


def test_the_lock_refuses_writes_while_a_compile_runs_unless_forced(stack: Stack) -> None:
    s = stack.session()
    stack.fake.delay_s = 0.1
    try:
        h = s.compile("qa", trainset=TRAIN[:6], optimizer="bootstrap_fewshot")
        wait_until(lambda: stack.store.program_lease(s.id, "qa"), 30, what="the lease")
        with pytest.raises(OptimizationInProgress) as info:
            s.create_program("qa", "chain_of_thought", QA)
        assert info.value.code == "optimization_in_progress"
        assert info.value.details["run_id"] == h.id
        with pytest.raises(OptimizationInProgress):
            s.delete_program("qa")
        with pytest.raises(OptimizationInProgress):  # refused before enqueue
            s.compile("qa", trainset=TRAIN)
        # A foreign producer's compile gets the same code back through Celery.
        foreign = stack.client.app.send_task(COMPILE_TASK, args=[s.id, "qa", TRAIN, {}])
        with pytest.raises(OptimizationInProgress) as through:
            foreign.get(timeout=30)
        assert through.value.code == "optimization_in_progress"
        s.create_program("other", "predict", QA)  # other programs are free
    finally:
        stack.fake.delay_s = 0.0
    h.get_result(timeout=60)
    assert stack.store.program_lease(s.id, "qa") is None  # released by the commit
    s.create_program("qa", "chain_of_thought", QA)
    assert [v["version"] for v in s.program_history("qa")][:2] == [3, 2]


def test_force_writes_through_the_lock_and_a_dead_holders_lease_lapses(stack: Stack) -> None:
    s = stack.session()
    start = stack.store.begin_compile(s.id, "qa", "run-dead", "token-dead", lease_s=1.0)
    assert start.status == "ok" and start.spec == s.program("qa")
    with pytest.raises(OptimizationInProgress):
        s.create_program("qa", "chain_of_thought", QA)
    with pytest.raises(OptimizationInProgress):
        s.rollback_program("qa", 1)
    s.create_program("qa", "chain_of_thought", QA, force=True)
    assert s.program("qa")["module"] == "chain_of_thought"
    # Nobody renews it: the lease lapses and the program is free again.
    wait_until(lambda: stack.store.program_lease(s.id, "qa") is None, 5, what="a lapse")
    s.create_program("qa", "predict", QA)
    # The dead run's commit is refused: another write may have happened since.
    with pytest.raises(OptimizationInProgress):
        stack.store.commit_compile(s.id, "qa", "run-dead", "token-dead", {}, 1.0, 0.0)


def test_a_failed_compile_releases_the_lock(stack: Stack) -> None:
    """A foreign producer skips the Client's checks: the worker finds examples without the
    program's input field after it took the lease, fails, and lets the program go."""
    s = stack.session()
    h = stack.client.app.send_task(COMPILE_TASK, args=[s.id, "qa", [{"answer": "a"}], {}])
    with pytest.raises(InvalidInputs) as info:
        h.get(timeout=30)
    assert info.value.details["option"] == "trainset"
    assert stack.store.program_lease(s.id, "qa") is None
    assert s.runs()[0].status == "failed" and s.runs()[0].error_code == "invalid_inputs"
    s.create_program("qa", "chain_of_thought", QA)


def test_cancel_stops_a_compile_and_releases_the_lock(stack: Stack) -> None:
    s = stack.session()
    stack.fake.delay_s = 0.2
    try:
        h = s.compile("qa", trainset=TRAIN, optimizer="bootstrap_fewshot")
        wait_until(lambda: stack.store.program_lease(s.id, "qa"), 30, what="the lease")
        assert h.cancel() == "signalled"
        with pytest.raises(RunCancelled):
            h.get_result(timeout=30)
    finally:
        stack.fake.delay_s = 0.0
    wait_until(lambda: stack.store.program_lease(s.id, "qa") is None, 10, what="release")
    assert s.runs()[0].status == "cancelled"
    assert [v["version"] for v in s.program_history("qa")] == [1]  # nothing written
    events = list(h.stream(block_s=5))
    assert events[-1].type == "error" and events[-1].data["code"] == "run_cancelled"


# --- inputs: datasets, metrics, checks before enqueue -------------------------------------


def test_a_stored_dataset_and_a_worker_metric(stack: Stack) -> None:
    s = stack.session()
    assert s.store_dataset("train", TRAIN) == len(TRAIN)
    assert stack.store.list_datasets(s.id) == ["train"]
    h = s.compile("qa", trainset="train", metric="answer_startswith", optimizer="labeled_fewshot")
    assert h.get_result(timeout=60)["score"] == 1.0
    with pytest.raises(DatasetNotFound):
        s.compile("qa", trainset="missing")
    with pytest.raises(PayloadTooLarge):
        s.store_dataset("huge", [{"question": "x" * 5_000_000, "answer": "y"}])
    # Datasets and versions are session keys: deleting the session deletes them.
    raw = stack.store.redis
    pattern = stack.store.keys.session_pattern(s.id)
    assert raw.exists(stack.store.keys.datasets(s.id), stack.store.keys.program_versions(s.id))
    s.delete()
    assert not list(raw.scan_iter(match=pattern))


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"optimizer": "gradient_descent"}, "optimizer"),
        ({"metric": "no_such_metric"}, "metric"),
        ({"metric": "bad name!"}, "metric"),
        ({"options": {"max_bootstrapped_demos": 100}}, "max_bootstrapped_demos"),
        ({"options": {"max_rounds": "2"}}, "max_rounds"),
        ({"options": {"temperature": 0.5}}, "temperature"),
        ({"optimizer": "labeled_fewshot", "options": {"num_candidate_programs": 4}}, None),
        ({"optimizer": "bootstrap_random_search", "options": {"stop_at_score": 2}}, None),
        ({"trainset": []}, "trainset"),
        ({"trainset": [{"question": "no answer"}]}, "trainset"),
        ({"trainset": [{"answer": "no question"}]}, "trainset"),
        ({"options": {"valset": [{"question": "q"}]}}, "valset"),
    ],
)
def test_bad_requests_fail_before_enqueue(
    stack: Stack, kwargs: dict[str, Any], option: str | None
) -> None:
    s = stack.session()
    call: dict[str, Any] = {"trainset": TRAIN, **kwargs}
    with pytest.raises(InvalidInputs) as info:
        s.compile("qa", **call)
    assert info.value.code == "invalid_inputs"
    if option is not None:
        assert info.value.details["option"] == option
    assert s.runs() == []  # nothing was enqueued


# --- durability ---------------------------------------------------------------------------


def test_a_compile_longer_than_the_visibility_timeout_runs_once(stack: Stack) -> None:
    """The broker hands a running compile's message out again after 3 s; that delivery
    finds the lease renewed, waits, and answers the first one's result: one version, and
    no LM call paid twice."""
    s = stack.session()
    stack.fake.delay_s = 0.25  # ~6 s of LM calls
    try:
        # Counted by arrival: a request an earlier test abandoned (a cancel) is recorded
        # when the fake answers it, which may fall in this test.
        since = time.time()
        h = s.compile("qa", trainset=TRAIN, optimizer="bootstrap_fewshot")
        result = h.get_result(timeout=60)
        paid = sum(1 for c in list(stack.fake.calls) if c.arrived >= since)
    finally:
        stack.fake.delay_s = 0.0
    worker = stack.workers[0]
    wait_until(
        lambda: worker.log().count(f"dspex.compile[{h.id}] succeeded") >= 2,
        30,
        what="the second delivery to end",
        diagnose=stack.logs,
    )
    assert worker.log().count(f"dspex.compile[{h.id}] received") >= 2
    assert paid == result["lm"]["usage"]["calls"]
    assert [v["version"] for v in s.program_history("qa")] == [2, 1]
    assert s.runs()[0].status == "succeeded"


def test_kill_9_mid_compile_resumes_from_its_checkpoint(stack: Stack) -> None:
    """Killed after two of its five steps, the run comes back on another worker, resumes
    at step three, pays at most 10 % more LM calls than the same compile uninterrupted,
    and writes the same program."""
    options = {"num_candidate_programs": 2, "seed": 7}
    kind = {"optimizer": "bootstrap_random_search", "options": options}
    reference = stack.session()
    calls_before = len(stack.fake.calls)
    expected = reference.compile("qa", trainset=TRAIN, **kind).get_result(timeout=60)
    uninterrupted = len(stack.fake.calls) - calls_before
    assert uninterrupted >= 20

    victim = stack.workers[0]
    s = stack.session()
    stack.fake.delay_s = 0.03
    try:
        calls_before = len(stack.fake.calls)
        h = s.compile("qa", trainset=TRAIN, **kind)
        steps: list[int] = []
        for event in h.stream(block_s=30):
            if event.type == "progress":
                steps.append(event.data["step"])
                if event.data["step"] == 2:
                    break
        victim.kill()
        stack.workers.remove(victim)
        survivor = stack.worker()
        result = wait_until(
            lambda: h.ready() and h.get_result(timeout=1),
            90,
            what="the resumed compile",
            diagnose=stack.logs,
        )
    finally:
        stack.fake.delay_s = 0.0
    paid = len(stack.fake.calls) - calls_before
    print(f"kill -9 mid-compile: {paid} LM calls, {uninterrupted} uninterrupted")
    assert paid <= 1.1 * uninterrupted, (paid, uninterrupted)
    resumed = re.search(r"compile resumes after (\d) of 5 steps", survivor.log())
    assert resumed is not None and int(resumed.group(1)) >= 2, stack.logs()
    assert result["score"] == expected["score"]
    assert result["baseline_score"] == expected["baseline_score"]
    assert s.program("qa") == reference.program("qa")  # the same program JSON
    progress = [p["step"] for p in progress_of(h)]
    assert progress == sorted(progress) and set(progress) == {1, 2, 3, 4, 5}
    assert stack.store.program_lease(s.id, "qa") is None
    assert [v["run_id"] for v in s.program_history("qa")] == [h.id, None]


def test_mipro_v2_light_compiles(stack: Stack) -> None:
    pytest.importorskip("optuna")
    s = stack.session()
    h = s.compile("qa", trainset=TRAIN, optimizer="mipro_v2")
    result = h.get_result(timeout=120)
    assert result["score"] == 1.0 > result["baseline_score"]
    assert [p["step"] for p in progress_of(h)] == [1, 2, 3]


def test_the_cli_compiles_with_a_progress_bar_and_json(stack: Stack, tmp_path: Path) -> None:
    s = stack.session()
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(e) for e in TRAIN) + "\n")
    cli = [sys.executable, "-m", "dspex_tasks.cli"]
    shown = subprocess.run(
        [*cli, "compile", s.id, "qa", "--trainset", str(train), "--optimizer", "labeled_fewshot",
         "--option", "k=4"],
        env=stack.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "version 2: score 1.0" in shown.stdout
    assert "3/3" in shown.stderr  # the progress bar's last state
    as_json = subprocess.run(
        [*cli, "compile", s.id, "qa", "--trainset", str(train), "--json"],
        env=stack.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    doc = json.loads(as_json.stdout)
    assert doc["version"] == 3 and doc["program_id"] == "qa" and as_json.stderr == ""
    history = subprocess.run(
        [*cli, "history", s.id, "qa", "--json"],
        env=stack.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert [v["version"] for v in json.loads(history.stdout)["versions"]] == [3, 2, 1]
    bad = subprocess.run(
        [*cli, "compile", s.id, "qa", "--trainset", str(train), "--option", "k=0", "--json"],
        env=stack.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2
    assert json.loads(bad.stdout)["error"]["code"] == "invalid_inputs"
