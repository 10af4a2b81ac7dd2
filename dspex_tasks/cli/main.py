"""The ``dspex-tasks`` command: its argument parser and ``main()``, which dispatches.

    dspex-tasks dev [--demo]                  the whole stack on this machine (API included)
    dspex-tasks worker|beat|flower [-- ARGS]  one service process (exec'd Celery)
    dspex-tasks api [--address A] [--port P]  the HTTP API and web console
    dspex-tasks session create|show|list|delete
    dspex-tasks var set|get|list
    dspex-tasks watch SID [--names a,b] [--json]   a session's events, live
    dspex-tasks runs SID | cancel RUN_ID [--rollback]
    dspex-tasks predict|cot SID SIGNATURE key=value ...
    dspex-tasks run SID PROGRAM_ID key=value ...
    dspex-tasks compile SID PROGRAM --trainset FILE.jsonl [--metric M] [--optimizer O]
    dspex-tasks history SID PROGRAM | rollback SID PROGRAM VERSION
    dspex-tasks stats | expire | doctor

Output is for humans by default; ``--json`` (before or after the subcommand) prints
exactly one JSON document on stdout instead, errors included (``{"error": {...}}``);
``dev``, ``worker``, ``beat`` and ``flower`` run processes and print their own logs.
Exit codes: 0 ok; 1 the command ran but what it runs or checks failed (a doctor check, a
batch task, a child of ``dev``, the demo); 2 an error (``error: <code>: <message>``, any
DspexError such as ``store_unavailable``, or ``timeout``); 64 a usage error.
Settings come from ``DSPEX_*`` variables (``--redis-url`` overrides DSPEX_REDIS_URL).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from dspex_tasks.cli import compile as compile_cmd
from dspex_tasks.cli import processes, runs, state, watch
from dspex_tasks.cli import usage as usage_cmd
from dspex_tasks.cli.devstack import DEFAULT_STATE_DIR
from dspex_tasks.cli.doctor import CHECKS
from dspex_tasks.cli.launch import DEFAULT_LOGLEVEL
from dspex_tasks.cli.output import EXIT_USAGE, Output, Reply, UsageError
from dspex_tasks.cli.tasks import add_task_arguments, run_task_command
from dspex_tasks.client import Client
from dspex_tasks.errors import DspexError
from dspex_tasks.settings import Settings

__all__ = ["build_parser", "main"]

_PROCESS_COMMANDS = frozenset({"worker", "beat", "flower"})
_LOGLEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
Handler = Callable[[argparse.Namespace, Output, list[str]], int]


class _Parser(argparse.ArgumentParser):
    """argparse with EX_USAGE (64) for usage errors, so 2 always means a runtime error."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# --- dispatch -----------------------------------------------------------------------------


def _client() -> Client:
    return Client(settings=Settings.from_env())


_CLIENT_COMMANDS: dict[str, Callable[[argparse.Namespace, Client], Reply]] = {
    "session": state.session,
    "var": state.var,
    "stats": state.stats,
    "usage": usage_cmd.usage,
    "expire": state.expire,
    "doctor": processes.doctor,
    "runs": runs.runs,
    "cancel": runs.cancel,
    "history": compile_cmd.history,
    "rollback": compile_cmd.rollback,
}


def _with_client(args: argparse.Namespace, out: Output, extra: list[str]) -> int:
    with _client() as client:
        if args.command in _CLIENT_COMMANDS:
            reply = _CLIENT_COMMANDS[args.command](args, client)
        elif args.command == "compile":
            # The progress bar goes to stderr; --json keeps the terminal quiet.
            progress = None if out.json_mode else out.stderr
            reply = compile_cmd.compile_program(args, client, progress)
        else:
            reply = run_task_command(client, args, out.stderr, args.command)
        return out.reply(reply)


# --- parser -----------------------------------------------------------------------------


def _common() -> _Parser:
    """Flags accepted before or after the subcommand (SUPPRESS keeps the global value)."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print one JSON document instead of text",
    )
    common.add_argument(
        "--redis-url",
        default=argparse.SUPPRESS,
        metavar="URL",
        help="the store's Redis (overrides DSPEX_REDIS_URL)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(
        prog="dspex-tasks",
        description="Run DSPy programs as Celery tasks over a Redis session store.",
        epilog="Exit codes: 0 ok, 1 a check/task/child failed, 2 error, 64 usage.",
    )
    parser.add_argument("--json", action="store_true", default=False, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version="%(prog)s 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    def loglevel(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--loglevel",
            type=str.upper,
            choices=_LOGLEVELS,
            default=DEFAULT_LOGLEVEL,
            help="Celery log level (default WARNING: per-task INFO lines cost ~17%% throughput)",
        )

    def print_command(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--print-command", action="store_true", help="print the command instead of running it"
        )

    p = command(
        "dev", processes.dev, "run Redis, a worker, beat, Flower and the API on this machine"
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="Redis data, logs and beat schedule (default .dev)",
    )
    p.add_argument("--demo", action="store_true", help="run the demo producer once up, then stop")
    p.add_argument("--redis-port", type=int, help="port for the local Redis (default: a free one)")
    p.add_argument("--concurrency", type=int, help="worker concurrency (default from settings)")
    loglevel(p)

    p = command("worker", processes.worker, "start a Celery worker (args after -- go to celery)")
    p.add_argument("--pool", choices=("threads", "prefork", "solo", "gevent"))
    p.add_argument("--concurrency", "-c", type=int)
    p.add_argument("--queues", "-Q", default="dspex,dspex.maintenance")
    p.add_argument("--hostname", "-n", help="node name, e.g. w1@%%h")
    p.add_argument(
        "--events",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send task events for Flower (-E; default on)",
    )
    p.add_argument("--without-mingle", action="store_true", help="skip startup sync (~1 s)")
    p.add_argument("--without-gossip", action="store_true", help="no worker-to-worker gossip")
    loglevel(p)
    print_command(p)

    p = command("beat", processes.beat, "start Celery beat (the expiry sweep schedule)")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="where the schedule file lives (default .dev)",
    )
    loglevel(p)
    print_command(p)

    p = command("flower", processes.flower, "start Flower with basic auth from DSPEX_FLOWER_*")
    p.add_argument("--address", help="bind address (default DSPEX_FLOWER_ADDRESS or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default DSPEX_FLOWER_PORT or 5555)")
    p.add_argument(
        "--allow-no-auth",
        action="store_true",
        help="start without a password (open UI, API locked); trusted interfaces only",
    )
    print_command(p)

    p = command("api", processes.api, "serve the HTTP API and web console (FastAPI on uvicorn)")
    p.add_argument("--address", help="bind address (default DSPEX_API_ADDRESS or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default DSPEX_API_PORT or 8000)")
    loglevel(p)

    p = command(
        "exporter",
        processes.exporter,
        "serve Prometheus metrics: queue depth/age, sessions, outcomes",
    )
    p.add_argument("--port", type=int, default=9808)
    p.add_argument("--address", default="127.0.0.1", help="bind address (0.0.0.0 in a container)")

    p = command("session", _with_client, "create, show, list or delete sessions")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = actions.add_parser("create", parents=[common], help="create a session")
    a.add_argument("session_id", nargs="?", metavar="SID", help="default: a random id")
    a.add_argument("--ttl", type=float, metavar="S", help="sliding TTL in seconds")
    a.add_argument("--metadata", metavar="JSON", help="a JSON object")
    a.add_argument("--exist-ok", action="store_true", help="no error if it exists")
    a = actions.add_parser("show", parents=[common], help="a session, its variables, programs")
    a.add_argument("session_id", metavar="SID")
    a.add_argument("--no-touch", action="store_true", help="do not slide the TTL")
    actions.add_parser("list", parents=[common], help="ids of live sessions")
    a = actions.add_parser("delete", parents=[common], help="delete a session (idempotent)")
    a.add_argument("session_id", metavar="SID")

    p = command("var", _with_client, "set, get or list session variables")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = actions.add_parser(
        "set",
        parents=[common],
        help="update a variable, or register it with --type",
        description="VALUE is JSON if it parses, else text (text types always take text).",
    )
    a.add_argument("session_id", metavar="SID")
    a.add_argument("name", metavar="NAME")
    a.add_argument("value", metavar="VALUE")
    a.add_argument("--type", help="register a new variable of this type")
    a.add_argument("--constraints", metavar="JSON", help="with --type: e.g. '{\"min\": 0}'")
    a.add_argument("--description", help="with --type")
    a.add_argument(
        "--expected-version", type=int, metavar="N", help="compare-and-set on the version"
    )
    a = actions.add_parser("get", parents=[common], help="one variable")
    a.add_argument("session_id", metavar="SID")
    a.add_argument("name", metavar="NAME")
    a = actions.add_parser("list", parents=[common], help="a session's variables")
    a.add_argument("session_id", metavar="SID")
    a.add_argument("pattern", nargs="?", default="*", help="glob on names (default *)")

    p = command("predict", _with_client, "run dspex.predict on a signature")
    add_task_arguments(p, target="SIGNATURE")
    p = command("cot", _with_client, "run dspex.chain_of_thought on a signature")
    add_task_arguments(p, target="SIGNATURE")
    p = command("run", _with_client, "run a stored program (dspex.run_program)")
    add_task_arguments(p, target="PROGRAM_ID")

    p = command("compile", _with_client, "optimize a stored program (dspex.compile)")
    compile_cmd.add_compile_arguments(p)
    p = command("history", _with_client, "a program's versions, newest first")
    p.add_argument("session_id", metavar="SID")
    p.add_argument("program_id", metavar="PROGRAM")
    p = command("rollback", _with_client, "write an old version of a program as a new one")
    p.add_argument("session_id", metavar="SID")
    p.add_argument("program_id", metavar="PROGRAM")
    p.add_argument("version", type=int, metavar="VERSION")
    p.add_argument("--force", action="store_true", help="even while a compile holds it")

    p = command("watch", watch.watch, "print a session's events as they happen (Ctrl-C stops)")
    watch.add_watch_arguments(p)

    p = command("runs", _with_client, "a session's runs, newest first")
    runs.add_runs_arguments(p)
    p = command("cancel", _with_client, "stop a run (queued: never starts; running: within 1 s)")
    runs.add_cancel_arguments(p)

    command("stats", _with_client, "store statistics")
    p = command("usage", _with_client, "a session's LM usage (tokens, calls) and budget")
    usage_cmd.add_usage_arguments(p)
    p = command("expire", _with_client, "expire sessions past their deadline now")
    p.add_argument("--limit", type=int, help="at most this many")

    p = command("doctor", _with_client, "check Redis, workers, the LM, local model and beat")
    p.add_argument(
        "--skip", action="append", choices=CHECKS, metavar="CHECK", help=f"one of {CHECKS}"
    )
    p.add_argument("--profile", default="default", help="LM profile to try (default)")
    p.add_argument(
        "--lm-timeout", type=float, default=30.0, metavar="S", help="LM answer timeout (30)"
    )
    return parser


def _split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dspex-tasks``; returns the exit code."""
    args_list, extra = _split_extra(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as e:  # --help (0) and usage errors (64)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    out = Output(bool(args.json))
    if args.redis_url:
        os.environ["DSPEX_REDIS_URL"] = args.redis_url
    try:
        if extra and args.command not in _PROCESS_COMMANDS:
            raise UsageError(f"'--' extra arguments are only for {sorted(_PROCESS_COMMANDS)}")
        handler: Handler = args.handler
        return handler(args, out, extra)
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"dspex-tasks: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except DspexError as e:
        return out.error(e)
    except TimeoutError as e:
        return out.failure("timeout", str(e))
    except OSError as e:  # e.g. an unreadable --batch file
        return out.failure("io_error", f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))
    except KeyboardInterrupt:
        return 130
