"""``dspex-tasks predict|cot|run``: enqueue LM tasks from a shell, one or a batch."""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from dspex_tasks.cli.output import (
    EXIT_FAILED,
    EXIT_OK,
    Reply,
    UsageError,
    parse_assignments,
    parse_json_arg,
    read_jsonl,
)
from dspex_tasks.client import BatchHandle, Client
from dspex_tasks.errors import DspexError
from dspex_tasks.specs import normalize_signature

__all__ = ["add_task_arguments", "run_task_command"]

_KIND = {"predict": "predict", "cot": "chain_of_thought", "run": "run_program"}
_BAR_WIDTH = 30
_POLL_S = 0.2


def add_task_arguments(parser: argparse.ArgumentParser, *, target: str) -> None:
    parser.add_argument("session_id", metavar="SID")
    parser.add_argument("target", metavar=target)
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="KEY=VALUE",
        help="an input field; str fields take the text as is, others parse as JSON",
    )
    parser.add_argument("--inputs", dest="inputs_json", metavar="JSON", help="inputs object")
    parser.add_argument(
        "--store-outputs",
        metavar="FIELD[=VAR],...",
        help="write these output fields to session variables (which must exist)",
    )
    parser.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait for the result (default) or print the task id and return",
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, metavar="S", help="seconds to wait (120)"
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="stream the run: print its tokens (and steps) on stderr as they arrive",
    )
    parser.add_argument(
        "--batch",
        type=Path,
        metavar="FILE.jsonl",
        help="one inputs object per line (KEY=VALUE inputs are defaults for every line); "
        "submitted together, progress on stderr",
    )


def _store_outputs(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    if raw.lstrip().startswith("{"):
        value = parse_json_arg(raw, "--store-outputs")
        if not isinstance(value, dict):
            raise UsageError("--store-outputs JSON must be an object {field: variable}")
        return {"store_outputs": value}
    mapping: dict[str, str] = {}
    for item in raw.split(","):
        field, _, var = item.strip().partition("=")
        if not field:
            raise UsageError(f"--store-outputs: empty field in {raw!r}")
        mapping[field] = var or field
    return {"store_outputs": mapping}


def _input_types(client: Client, kind: str, sid: str, target: str) -> dict[str, str]:
    """Input field name -> type, so ``text=42`` stays text for a str field."""
    try:
        if kind == "run_program":
            signature = client.store.get_program(sid, target)["signature"]
        else:
            signature = normalize_signature(target)
    except DspexError:
        return {}  # submit() raises the real error with its code
    return {f["name"]: f["type"] for f in signature["inputs"]}


def _base_inputs(args: argparse.Namespace, types: Mapping[str, str]) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    if args.inputs_json:
        value = parse_json_arg(args.inputs_json, "--inputs")
        if not isinstance(value, dict):
            raise UsageError("--inputs must be a JSON object")
        inputs.update(value)
    inputs.update(parse_assignments(args.inputs, types))
    return inputs


def _outputs_text(result: Mapping[str, Any], task_id: str) -> str:
    lines = [f"{name}: {value}" for name, value in result.get("outputs", {}).items()]
    lm = result.get("lm", {})
    lines.append(
        f"(model {lm.get('model', '?')}, {result.get('duration_ms', '?')} ms, task {task_id})"
    )
    return "\n".join(lines)


def _read_batch(path: Path, defaults: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = [{**defaults, **value} for value in read_jsonl(path, "inputs")]
    if not rows:
        raise UsageError(f"{path}: no inputs")
    return rows


class _ProgressBar:
    """``[#####-----] 12/40 tasks 3.1 s`` on stderr: redrawn in place on a terminal,
    otherwise one line per tenth done (logs stay short)."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self.shown = -1

    def update(self, done: int) -> None:
        if done == self.shown:
            return
        step = max(1, self.total // 10)
        if not self.tty and done != self.total and done // step == max(self.shown, 0) // step:
            return
        self.shown = done
        filled = _BAR_WIDTH * done // self.total
        line = (
            f"[{'#' * filled}{'-' * (_BAR_WIDTH - filled)}] {done}/{self.total} tasks "
            f"{time.monotonic() - self.started:.1f} s"
        )
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _wait_batch(batch: BatchHandle, timeout_s: float, stream: TextIO) -> None:
    bar = _ProgressBar(len(batch), stream)
    deadline = time.monotonic() + timeout_s
    while True:
        done = batch.completed_count()
        bar.update(done)
        if done >= len(batch):
            return
        if time.monotonic() >= deadline:
            if bar.tty:
                stream.write("\n")
            raise TimeoutError(
                f"{len(batch) - done} of {len(batch)} tasks did not finish within {timeout_s:g} s"
            )
        time.sleep(_POLL_S)


def _run_batch(
    client: Client,
    args: argparse.Namespace,
    kind: str,
    inputs: Mapping[str, Any],
    options: Mapping[str, Any] | None,
    stderr: TextIO,
) -> Reply:
    rows = _read_batch(args.batch, inputs)
    target_key = "program_id" if kind == "run_program" else "signature"
    requests = [
        {
            "task": kind,
            "session_id": args.session_id,
            target_key: args.target,
            "inputs": row,
            "options": options,
        }
        for row in rows
    ]
    try:
        batch = client.submit_batch(requests)
    except DspexError as e:
        index = e.details.get("request_index")
        if isinstance(index, int):
            e.message = f"{e.message} (batch item {index + 1})"
        raise
    if not args.wait:
        return Reply({"task_ids": batch.ids}, "\n".join(batch.ids))
    _wait_batch(batch, args.timeout, stderr)
    results = batch.results(timeout=5)
    docs: list[dict[str, Any]] = []
    lines: list[str] = []
    for n, (task_id, result) in enumerate(zip(batch.ids, results, strict=True), 1):
        if isinstance(result, DspexError):
            docs.append({"task_id": task_id, "error": result.to_dict()})
            lines.append(f"#{n} error: {result.code}: {result.message}")
        else:
            docs.append({"task_id": task_id, **result})
            outputs = result.get("outputs", {})
            lines.append(f"#{n} " + "; ".join(f"{k}: {v}" for k, v in outputs.items()))
    failed = sum(1 for d in docs if "error" in d)
    summary = f"{len(docs) - failed} succeeded, {failed} failed"
    doc = {"tasks": len(docs), "succeeded": len(docs) - failed, "failed": failed, "results": docs}
    return Reply(doc, "\n".join([*lines, summary]), EXIT_FAILED if failed else EXIT_OK)


def run_task_command(
    client: Client, args: argparse.Namespace, stderr: TextIO, command: str
) -> Reply:
    """predict / cot / run: one task (waited for or not), or a batch from a JSONL file."""
    kind = _KIND[command]
    types = _input_types(client, kind, args.session_id, args.target)
    inputs = _base_inputs(args, types)
    options = _store_outputs(args.store_outputs)
    if args.batch is not None:
        return _run_batch(client, args, kind, inputs, options, stderr)
    if getattr(args, "stream", False) and args.batch is None:
        options = {**(options or {}), "stream": True}
    handle = client.submit(kind, args.session_id, args.target, inputs, options)
    if getattr(args, "stream", False) and args.wait:
        _print_stream(handle, stderr, args.timeout)
    if not args.wait:
        return Reply({"task_id": handle.id, "status": handle.status}, handle.id)
    result = handle.get_result(timeout=args.timeout)
    return Reply({"task_id": handle.id, **result}, _outputs_text(result, handle.id))


def _print_stream(handle: Any, out: TextIO, timeout: float) -> None:
    """A streamed run's tokens as they come, each field under its name; steps in
    brackets. The result (or error) is reported by the caller afterwards."""
    field = None
    for event in handle.stream(block_s=timeout):
        if event.type == "token":
            if event.data["field"] != field:
                field = event.data["field"]
                out.write(f"\n{field}: ")
            out.write(event.data["delta"])
        elif event.type == "status":
            detail = f" {event.data['detail']}" if event.data.get("detail") else ""
            out.write(f"\n[{event.data['step']}{detail}]")
            field = None
        out.flush()
    out.write("\n")
    out.flush()


def task_commands() -> Sequence[str]:
    return tuple(_KIND)
