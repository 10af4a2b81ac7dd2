"""Collects one row per reliability test and writes the reliability report.

The fault, bad-input and security modules ask for the ``reliability`` fixture and call
``reliability.record(key, cases=..., passed=..., lost=..., figures=...)`` as the last
step of a test. The report is built from what really happened in the run: a row whose
test failed (or never got to record) shows as FAILED with the failure's message, a
row whose test did not run shows as not run, and the run's failures are listed.

The report is written outside the tracked tree, to ``$DSPEX_REPORT_DIR/reliability.md``
(default: ``<tmp>/dspex-reports``), whenever a reliability test ran. ``docs/reliability.md``
is refreshed from it only by ``make reliability-report``.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = ["ROWS", "Recorder", "reliability", "report_path"]

#: The modules whose tests fill the report.
MODULES = ("test_faults.py", "test_bad_input.py", "test_security.py")


def report_path() -> Path:
    """Where the run's report goes: ``$DSPEX_REPORT_DIR/reliability.md``."""
    base = os.environ.get("DSPEX_REPORT_DIR") or os.path.join(
        tempfile.gettempdir(), "dspex-reports"
    )
    return Path(base) / "reliability.md"


#: key -> (section, fault or input class). Order is the document's order.
ROWS: dict[str, tuple[str, str]] = {
    "kill": ("Faults", "SIGKILL a worker mid-task (x10)"),
    "visibility": ("Faults", "task longer than the visibility timeout"),
    "redis_restart": ("Faults", "Redis restart under load, AOF on (x5)"),
    "sigterm": ("Faults", "SIGTERM a worker with tasks in flight"),
    "two_beats": ("Faults", "two beat processes at once"),
    "flower_lost": ("Faults", "broker loses a task sent through Flower's API"),
    "cas": ("Faults", "50 threads x 100 compare-and-set increments"),
    "bad_store": ("Bad input", "store API"),
    "bad_task": ("Bad input", "raw task messages by name (send_task)"),
    "bad_wire": ("Bad input", "raw broker messages (non-UTF-8, nesting bomb)"),
    "bad_cli": ("Bad input", "CLI (`python -m dspex_tasks.cli`)"),
    "bad_flower": ("Bad input", "Flower HTTP API (async-apply)"),
    "pickle": ("Security", "pickle message refused; no unpickling in code"),
    "secrets": ("Security", "LM key never stored, returned or logged"),
    "settings_repr": ("Security", "settings reprs hide secrets"),
    "lm_endpoint": ("Security", "producer cannot pick LM endpoint, key or profile"),
    "names": ("Security", "no tool, type or class by name"),
    "forged_result": ("Security", "forged failure result (exc_module os)"),
    "session_ids": ("Security", "session ids cannot reach other keys"),
    "size_limits": ("Security", "size limits (values, inputs, results)"),
    "redis_auth": ("Security", "Redis requirepass and ACL user end to end"),
    "flower_auth": ("Security", "Flower API without credentials"),
}


@dataclass(frozen=True)
class Row:
    key: str
    cases: int
    passed: int
    lost: str
    figures: str
    #: The test that recorded the row.
    nodeid: str = ""


class Recorder:
    """Rows of the report, shared by every module of the session, and the outcome of
    every test of the reliability modules."""

    def __init__(self) -> None:
        self._rows: dict[str, Row] = {}
        self._lock = threading.Lock()
        #: nodeid -> failure message, for the reliability modules' failed tests.
        self.failures: dict[str, str] = {}
        self.ran = 0
        self.current = ""
        self.written: Path | None = None

    def record(self, key: str, *, cases: int, passed: int, lost: str, figures: str = "") -> None:
        """One row: ``lost`` says what the test measured as lost (tasks, writes), in words."""
        if key not in ROWS:
            raise KeyError(f"unknown report row {key!r}")
        with self._lock:
            self._rows[key] = Row(key, cases, passed, lost, figures, self.current)
        print(f"[reliability] {key}: {passed}/{cases} passed, lost {lost}; {figures}")

    def complete(self) -> bool:
        """Every row recorded, all its cases passed, and no reliability test failed."""
        with self._lock:
            return (
                set(self._rows) == set(ROWS)
                and all(r.passed == r.cases for r in self._rows.values())
                and not self.failures
            )

    def _cells(self, key: str) -> tuple[str, str, str, str]:
        """(cases, passed, lost, figures) of one row, from the run's real outcomes."""
        row = self._rows.get(key)
        if row is None:
            if self.failures:
                return ("-", "FAILED or not run", "unknown: see Failures below", "-")
            return ("-", "not run", "-", "-")
        failed = self.failures.get(row.nodeid)
        if failed is not None:
            return (str(row.cases), "FAILED", f"FAILED after recording: {failed}", row.figures)
        passed = str(row.passed) if row.passed == row.cases else f"{row.passed} (FAILED)"
        return (str(row.cases), passed, row.lost, row.figures or "-")

    def render(self) -> str:
        with self._lock:
            cells = {k: self._cells(k) for k in ROWS}
            failures = dict(self.failures)
        lines = [
            "# Reliability and security",
            "",
            "Generated by the reliability tests (`tests/test_faults.py`,",
            "`tests/test_bad_input.py`, `tests/test_security.py`, marked `fault`) from the",
            "outcomes of one run (`tests/support/reliability.py`): a test that failed shows",
            "as FAILED with its failure message. Every run writes the report to",
            "`$DSPEX_REPORT_DIR/reliability.md`; `make reliability-report` runs the three",
            "modules and copies the report here.",
            "",
            f"Run: {'all rows passed' if self.complete() else 'NOT all rows passed'}.",
            "",
            "Every fault test runs real processes: `celery worker` subprocesses (threads pool,",
            "`tests/fault_worker.py` = the production worker plus a test LM engine that sleeps on",
            "request and logs every call), `celery beat`, Flower, and dedicated `redis-server`s.",
            '"Lost" counts tasks that never completed, session writes applied zero or two times,',
            "and acknowledged writes missing after a restart. The figures column holds timings",
            "measured in the run that wrote this file (2-core CI machine; they vary run to run).",
            "",
            "| area | fault or input class | cases tried | passed | lost | figures |",
            "|---|---|---:|---:|---|---|",
        ]
        for key, (section, label) in ROWS.items():
            cases, passed, lost, figures = cells[key]
            lines.append(f"| {section} | {label} | {cases} | {passed} | {lost} | {figures} |")
        if failures:
            lines += ["", "## Failures in this run", ""]
            lines += [f"- `{nodeid}`: {message}" for nodeid, message in sorted(failures.items())]
        lines += [
            "",
            "What the rows check:",
            "",
            "- **SIGKILL**: each round kills the worker running a task (`store_outputs` to a",
            "  string and an integer variable) and starts a replacement; every task completes",
            "  and each variable's version ends at 1 + number of tasks (written exactly once).",
            "  Recovery = kill to result; it is bounded by the visibility timeout (3 s here)",
            "  plus the claim lease (5 s) plus the task itself.",
            "- **Visibility timeout**: timeout 2 s, a 5 s task, two workers: the message is",
            "  delivered again while it runs; the second delivery waits for the first and",
            "  answers its result, so the LM is called exactly once and the write happens once.",
            "- **Redis restart**: `appendonly yes`, `appendfsync always`; Redis is killed",
            "  (SIGKILL and SIGTERM alternately) while producers write variables and enqueue",
            "  tasks. Acknowledged writes survive, every enqueued task completes, workers",
            "  consume again (time from Redis up to a probe task's result), and store calls",
            "  during the outage fail with `store_unavailable` (time to error).",
            "- **Bad input**: every case gets the expected error class and code with a readable",
            "  message, and the session's keys are byte-identical before and after (DUMP of",
            "  every key, the record hash without `accessed_ms`/`deadline_ms`). Undecodable",
            "  broker messages are logged and discarded by the worker without running.",
            "- **Security**: see `tests/test_security.py`; every row is an end-to-end check",
            "  against real processes.",
            "",
            "## Bugs these tests found (all fixed)",
            "",
            "1. **Killed worker, task lost.** With a visibility timeout below the claim lease",
            "   (time limit + 30 s), the redelivered copy of a SIGKILLed worker's task saw the",
            "   dead claim as running and was ignored (acknowledged): the task never ran.",
            "   Claims now have a short lease (the visibility timeout, 5-30 s) that the holder",
            "   renews every third of it (`runtime.ClaimRenewer`); a delivery that finds a live",
            "   claim waits for it: it answers the first run's result (recorded by",
            "   `finish_task` even for tasks that write nothing) or runs the task once the",
            "   claim lapses.",
            "2. **Slow recovery.** kombu looked for abandoned unacknowledged messages every",
            "   100 s (interval 10 s x throttle 10); now every visibility/4 s (1-10 s), and its",
            "   restore mutex (300 s, kept in the AOF when Redis dies while a worker holds it,",
            "   blocking every restore) now expires after 5-30 s (`app.py`).",
            "3. **Workers died on a Redis restart** (Celery 5.7 / kombu 5.7): closing the lost",
            "   connection and acknowledging in-flight tasks on it raised `AttributeError`",
            '   ("Unrecoverable error"). `workers/fix_broker_reconnect_crash.py` guards those',
            "   calls; the messages come back after the visibility timeout.",
            "4. **A retry during an outage became a failure.** When the retry of a",
            "   `store_unavailable` task could not be published (one Redis for store and",
            "   broker), Celery recorded FAILURE and dropped the message; the message is now",
            "   left to the broker (`tasks.DspexTask`).",
            "5. **kombu loses a message when Redis dies between a worker's BRPOP and its",
            "   unacked bookkeeping** (about one run in ten of the restart test). The task",
            "   ledger (`store/ledger.py`): `Client` records each task before sending it, the",
            "   worker forgets it on success or failure, and beat's sweep sends again, with",
            "   the same id, any task unfinished after `DSPEX_RESEND_AFTER_S`.",
            "6. **Inputs JSON cannot carry** (lone surrogates, nesting over 255) failed with a",
            "   bare `TypeError`; now `invalid_inputs`.",
            '7. **An LM error echoing the API key** ("Incorrect API key provided: Bearer',
            '   sk-...") reached the result backend and the worker log, in the message and',
            "   the chained traceback. The key is redacted and the cause no longer chained.",
            "8. **LM settings written around the store** (raw Redis) could set `api_base`,",
            "   `model` or `api_key` for the worker's LM: the worker validates them again.",
            "9. **A stored program's DSPy state could name its own LM**: a `predict` state",
            "   with a top-level `lm` made the worker call that model with the provider key",
            "   from its environment; and stripping the nested `lm` of a ChainOfThought state",
            "   broke loading it (`KeyError: 'lm'`). `lm` is now blanked at both levels and",
            "   the worker normalizes stored programs again (a malformed one is",
            "   `invalid_program`).",
            "",
            "## Limits",
            "",
            "- The ledger covers tasks sent through `Client`, the CLI and Flower's API",
            "  (`workers/monitor.py` records them before Flower publishes; the",
            "  `flower_lost` row). Tasks sent by name by other producers (raw `send_task`,",
            "  other languages) rely on the broker alone.",
            "- A task whose submit raised during an outage may still have been published;",
            "  if so it runs, once.",
            "- Exactly-once is about session writes (`store_outputs`). The LM call of a task",
            "  whose worker dies mid-call is made again by the next delivery.",
            "- The threads pool enforces no time limits and cannot interrupt a running task",
            "  (a cold shutdown waits for it); a hung task stops renewing its claim after the",
            "  time limit + 30 s, and another delivery may then take it over.",
            "",
        ]
        return "\n".join(lines)

    def write(self) -> Path | None:
        """Write the report if any reliability test ran; returns where."""
        if not self.ran:
            return None
        path = report_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.render())
        self.written = path
        return path


#: One recorder per test session.
RECORDER = Recorder()


@pytest.fixture(scope="session")
def reliability() -> Iterator[Recorder]:
    """The session's report recorder."""
    yield RECORDER


def _is_reliability_test(item: pytest.Item) -> bool:
    return item.path.name in MODULES


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    if _is_reliability_test(item):
        RECORDER.current = item.nodeid
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    if not _is_reliability_test(item):
        return
    report: pytest.TestReport = outcome.get_result()
    if report.when == "call":
        RECORDER.ran += 1
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = getattr(crash, "message", None) or str(report.longrepr).splitlines()[-1]
        first = " ".join(message.split())[:300].replace("|", "\\|")
        RECORDER.failures[item.nodeid] = f"{report.when}: {first}"


def pytest_sessionfinish(session: pytest.Session) -> None:
    RECORDER.write()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if RECORDER.written is not None:
        state = "complete" if RECORDER.complete() else "INCOMPLETE or failing"
        terminalreporter.write_line(f"reliability report ({state}): {RECORDER.written}")
