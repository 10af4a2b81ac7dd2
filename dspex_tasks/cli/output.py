"""Shared pieces of the ``dspex-tasks`` command: output, exit codes, argument values."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import orjson

from dspex_tasks.errors import DspexError

__all__ = [
    "EXIT_ERROR",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Output",
    "Reply",
    "UsageError",
    "parse_assignments",
    "parse_json_arg",
    "parse_value",
    "read_jsonl",
]

#: Exit codes: 0 success; 1 the command ran but what it checks or runs failed (a doctor
#: check, a batch task, a child of ``dev``); 2 an error (any DspexError, e.g. Redis down,
#: a timeout); 64 a usage error (EX_USAGE from sysexits.h, unlike argparse's default 2).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ERROR = 2
EXIT_USAGE = 64

#: Variable types whose values are text: a bare argument is taken as the string itself.
_TEXT_TYPES = frozenset({"string", "choice", "module"})
_TEXT_FIELDS = frozenset({"str", "literal"})


class UsageError(Exception):
    """Raised for a malformed argument the parser cannot catch (exit 64)."""


@dataclass
class Reply:
    """What a command produced: one JSON document, its human form, and the exit code."""

    doc: Any
    text: str = ""
    code: int = EXIT_OK
    notes: list[str] = field(default_factory=list)


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def dumps(doc: Any) -> str:
    """One line of JSON (``jq`` pretty-prints it)."""
    return orjson.dumps(doc, default=_json_default, option=orjson.OPT_NON_STR_KEYS).decode()


class Output:
    """Writes replies and errors in the chosen mode (human text or one JSON document)."""

    def __init__(
        self, json_mode: bool, stdout: TextIO | None = None, stderr: TextIO | None = None
    ) -> None:
        self.json_mode = json_mode
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr

    def reply(self, reply: Reply) -> int:
        if self.json_mode:
            print(dumps(reply.doc), file=self.stdout, flush=True)
        elif reply.text:
            print(reply.text, file=self.stdout, flush=True)
        for note in reply.notes:
            self.note(note)
        return reply.code

    def note(self, text: str) -> None:
        """A message for the human at the terminal (stderr, so stdout stays parseable)."""
        print(text, file=self.stderr, flush=True)

    def error(self, error: DspexError) -> int:
        return self.failure(error.code, error.message, error.details)

    def failure(self, code: str, message: str, details: Mapping[str, Any] | None = None) -> int:
        """One error: ``error: <code>: <message>`` on stderr, or ``{"error": {...}}``."""
        if self.json_mode:
            doc = {"error": {"code": code, "message": message, "details": dict(details or {})}}
            print(dumps(doc), file=self.stdout, flush=True)
        else:
            line = f"error: {code}: {message}".replace("\n", " ")
            print(line, file=self.stderr, flush=True)
        return EXIT_ERROR


def parse_json_arg(raw: str, what: str) -> Any:
    """A JSON argument (``--constraints``, ``--inputs``); malformed is a usage error."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise UsageError(f"{what} is not valid JSON: {e}") from None


def read_jsonl(path: Path, what: str) -> list[dict[str, Any]]:
    """The JSON objects of a JSON Lines file (``what`` each one is), blank lines
    skipped; a line that is not a JSON object is a usage error naming it."""
    rows: list[dict[str, Any]] = []
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise UsageError(f"{path}:{number}: not valid JSON: {e}") from None
            if not isinstance(value, dict):
                raise UsageError(f"{path}:{number}: expected a JSON object of {what}")
            rows.append(value)
    return rows


def parse_value(raw: str, type_hint: str | None = None) -> Any:
    """A value from the command line: JSON if it parses, else the text itself.

    For text types (a ``string``/``choice`` variable, a ``str`` input field) a bare
    argument is always the text (``42`` stays ``"42"``); quote it as JSON to be explicit.
    """
    if type_hint in _TEXT_TYPES or type_hint in _TEXT_FIELDS:
        if raw.startswith('"'):
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return raw
            return value if isinstance(value, str) else raw
        return raw
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw


def parse_assignments(
    pairs: Sequence[str], field_types: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``key=value`` arguments -> dict; values parsed with :func:`parse_value`."""
    types = field_types or {}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"expected key=value, got {pair!r}")
        out[key] = parse_value(raw, types.get(key))
    return out
