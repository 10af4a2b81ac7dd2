"""``dspex-tasks compile SID PROGRAM --trainset file.jsonl``: optimize a stored program
and wait for its new version, with a progress bar on stderr (tqdm when installed --
the ``cli`` extra -- else one line per step).

Examples are JSON Lines files, one example (a JSON object) per line; ``--dataset NAME``
names a dataset stored in the session instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import IO, Any

from dspex_tasks.cli.output import Reply, UsageError, parse_value, read_jsonl
from dspex_tasks.client import Client, TaskHandle
from dspex_tasks.compile_request import OPTIMIZERS

__all__ = ["add_compile_arguments", "compile_program", "history", "rollback"]


def add_compile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("session_id", metavar="SID")
    p.add_argument("program_id", metavar="PROGRAM")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--trainset", type=Path, metavar="FILE", help="examples, JSON Lines")
    source.add_argument("--dataset", metavar="NAME", help="a dataset stored in the session")
    p.add_argument("--valset", type=Path, metavar="FILE", help="examples to score on (JSONL)")
    p.add_argument("--metric", default="exact_match", help="metric name (default exact_match)")
    p.add_argument(
        "--optimizer",
        default="bootstrap_fewshot",
        choices=sorted(OPTIMIZERS),
        help="default bootstrap_fewshot",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an optimizer option, e.g. max_bootstrapped_demos=2 (repeatable)",
    )
    p.add_argument("--timeout", type=float, default=3600.0, metavar="S", help="wait (3600)")


def _options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        if not eq or not key:
            raise UsageError(f"--option {pair!r}: use KEY=VALUE")
        options[key] = parse_value(raw)
    return options


class _Bar:
    """tqdm if it is installed, else a line per step on ``out``."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self._bar: Any = None
        try:
            from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            self._tqdm: Any = None
        else:
            self._tqdm = tqdm

    def update(self, step: int, total: int, best: float | None) -> None:
        shown = "-" if best is None else f"{best:.3f}"
        if self._tqdm is None:
            print(f"step {step}/{total}  best score {shown}", file=self.out, flush=True)
            return
        if self._bar is None:
            self._bar = self._tqdm(total=total, file=self.out, unit="step", desc="compile")
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix_str(f"best {shown}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _follow(handle: TaskHandle, out: IO[str] | None, timeout_s: float) -> None:
    if out is None:
        return
    bar = _Bar(out)
    try:
        for event in handle.stream(block_s=timeout_s):
            if event.type == "progress":
                d = event.data
                bar.update(int(d["step"]), int(d["total"]), d.get("best_score"))
    finally:
        bar.close()


def compile_program(args: argparse.Namespace, client: Client, progress: IO[str] | None) -> Reply:
    """Enqueue the compile, show its progress on ``progress`` (None: quiet), wait."""
    trainset: Any = args.dataset if args.dataset else read_jsonl(args.trainset, "example fields")
    options = _options(args.option)
    if args.valset is not None:
        options["valset"] = read_jsonl(args.valset, "example fields")
    handle = client.session(args.session_id).compile(
        args.program_id,
        trainset=trainset,
        metric=args.metric,
        optimizer=args.optimizer,
        options=options,
    )
    _follow(handle, progress, args.timeout)
    result = handle.get_result(timeout=args.timeout)
    text = (
        f"program {result['program_id']} version {result['version']}: score "
        f"{result['score']} (baseline {result['baseline_score']}) in "
        f"{result['duration_ms'] / 1000:.1f} s"
    )
    return Reply({"run_id": handle.id, **result}, text)


def history(args: argparse.Namespace, client: Client) -> Reply:
    versions = client.session(args.session_id).program_history(args.program_id)
    lines = [
        f"{v['version']:>4}  {v['created_at']}  score "
        + ("-" if v["score"] is None else str(v["score"]))
        + (f"  run {v['run_id']}" if v["run_id"] else "")
        for v in versions
    ]
    doc = {"session_id": args.session_id, "program_id": args.program_id, "versions": versions}
    return Reply(doc, "\n".join(lines))


def rollback(args: argparse.Namespace, client: Client) -> Reply:
    s = client.session(args.session_id)
    version = s.rollback_program(args.program_id, args.version, force=args.force)
    doc = {"program_id": args.program_id, "version": version, "from_version": args.version}
    return Reply(doc, f"program {args.program_id}: version {args.version} is now version {version}")
