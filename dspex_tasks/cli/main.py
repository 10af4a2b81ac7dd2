"""The ``dspex-tasks`` command: state, tasks and processes from a shell.

    dspex-tasks dev [--demo]                  the whole stack on this machine
    dspex-tasks worker|beat|flower [-- ARGS]  one service process (exec'd Celery)
    dspex-tasks session create|show|list|delete
    dspex-tasks var set|get|list
    dspex-tasks predict|cot SID SIGNATURE key=value ...
    dspex-tasks run SID PROGRAM_ID key=value ...
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
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from dspex_tasks.cli.devstack import DEFAULT_STATE_DIR, DevOptions, run_dev
from dspex_tasks.cli.doctor import CHECKS, run_checks
from dspex_tasks.cli.launch import (
    ALLOW_NO_AUTH_ENV,
    DEFAULT_LOGLEVEL,
    beat_argv,
    child_env,
    flower_argv,
    worker_argv,
)
from dspex_tasks.cli.output import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Output,
    Reply,
    UsageError,
    dumps,
    parse_json_arg,
    parse_value,
)
from dspex_tasks.cli.tasks import add_task_arguments, run_task_command
from dspex_tasks.client import Client
from dspex_tasks.errors import ConfigError, DspexError, VariableNotFound
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


# --- state commands ---------------------------------------------------------------------


def _client() -> Client:
    return Client(settings=Settings.from_env())


def _session_text(doc: dict[str, Any]) -> str:
    lines = [
        f"session {doc['id']}",
        f"  created    {doc['created_at']}",
        f"  accessed   {doc['last_accessed']}",
        f"  expires    {doc['expires_at']}  (ttl {doc['ttl_s']:g} s, sliding)",
    ]
    if doc.get("metadata"):
        lines.append(f"  metadata   {dumps(doc['metadata'])}")
    if doc.get("lm"):
        lines.append(f"  lm         {dumps(doc['lm'])}")
    if "variables" in doc:
        shown = ", ".join(f"{k}={dumps(v)}" for k, v in doc["variables"].items())
        lines.append(f"  variables  {shown or '-'}")
    if "programs" in doc:
        lines.append(f"  programs   {', '.join(doc['programs']) or '-'}")
    return "\n".join(lines)


def _session(args: argparse.Namespace, client: Client) -> Reply:
    action = args.action
    if action == "create":
        metadata = parse_json_arg(args.metadata, "--metadata") if args.metadata else None
        handle = client.create_session(
            args.session_id, ttl_s=args.ttl, metadata=metadata, exist_ok=args.exist_ok
        )
        doc = handle.info().to_dict()
        return Reply(doc, _session_text(doc))
    if action == "show":
        session = client.store.get_session(args.session_id, touch=not args.no_touch)
        doc = session.to_dict()
        variables = client.store.list_variables(args.session_id)
        doc["variables"] = {v.name: v.to_dict()["value"] for v in variables}
        doc["programs"] = client.store.list_programs(args.session_id)
        return Reply(doc, _session_text(doc))
    if action == "list":
        ids = client.list_sessions()
        return Reply({"sessions": ids}, "\n".join(ids) if ids else "(no sessions)")
    deleted = client.delete_session(args.session_id)
    text = f"deleted {args.session_id}" if deleted else f"{args.session_id}: no such session"
    return Reply({"session_id": args.session_id, "deleted": deleted}, text)


def _var_text(doc: dict[str, Any]) -> str:
    return f"{doc['name']} = {dumps(doc['value'])}  ({doc['type']}, version {doc['version']})"


def _var(args: argparse.Namespace, client: Client) -> Reply:
    sid = args.session_id
    if args.action == "set":
        if args.type:
            constraints = (
                parse_json_arg(args.constraints, "--constraints") if args.constraints else None
            )
            var = client.store.register_variable(
                sid,
                args.name,
                args.type,
                parse_value(args.value, args.type),
                constraints=constraints,
                description=args.description,
            )
        else:
            if args.constraints or args.description:
                raise UsageError("--constraints and --description need --type (registration)")
            try:
                current = client.store.get_variable(sid, args.name)
            except VariableNotFound as e:
                e.message += " (pass --type to register it)"
                raise
            var = client.store.update_variable(
                sid,
                args.name,
                parse_value(args.value, current.type),
                expected_version=args.expected_version,
            )
        doc = var.to_dict()
        return Reply(doc, _var_text(doc))
    if args.action == "get":
        doc = client.store.get_variable(sid, args.name).to_dict()
        return Reply(doc, _var_text(doc))
    docs = [v.to_dict() for v in client.store.list_variables(sid, args.pattern)]
    text = "\n".join(_var_text(d) for d in docs) if docs else "(no variables)"
    return Reply({"session_id": sid, "variables": docs}, text)


def _stats(args: argparse.Namespace, client: Client) -> Reply:
    doc = client.stats()
    last = client.store.last_sweep_at()
    doc["last_sweep_at"] = last.isoformat() if last else None
    width = max(len(k) for k in doc)
    return Reply(doc, "\n".join(f"{k:<{width}}  {v}" for k, v in doc.items()))


def _expire(args: argparse.Namespace, client: Client) -> Reply:
    expired = client.store.expire_sessions(limit=args.limit)
    return Reply({"expired": expired}, f"expired {expired} session(s)")


def _doctor(args: argparse.Namespace, client: Client) -> Reply:
    checks = run_checks(
        client, skip=set(args.skip or ()), lm_profile=args.profile, lm_timeout_s=args.lm_timeout
    )
    ok = all(c.status != "fail" for c in checks)
    doc = {"ok": ok, "checks": {c.name: c.to_dict() for c in checks}}
    lines = [f"  {c.status:<5} {c.name:<12} {c.summary}" for c in checks]
    return Reply(doc, "\n".join(lines), EXIT_OK if ok else EXIT_FAILED)


_CLIENT_COMMANDS: dict[str, Callable[[argparse.Namespace, Client], Reply]] = {
    "session": _session,
    "var": _var,
    "stats": _stats,
    "expire": _expire,
    "doctor": _doctor,
}


def _with_client(args: argparse.Namespace, out: Output, extra: list[str]) -> int:
    with _client() as client:
        if args.command in _CLIENT_COMMANDS:
            reply = _CLIENT_COMMANDS[args.command](args, client)
        else:
            reply = run_task_command(client, args, out.stderr, args.command)
        return out.reply(reply)


# --- process commands -------------------------------------------------------------------


def _exec(argv: list[str], env: dict[str, str], args: argparse.Namespace, out: Output) -> int:
    if args.print_command:
        return out.reply(Reply({"argv": argv}, shlex.join(argv)))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)  # replaces this process: Celery owns the signals now


def _worker(args: argparse.Namespace, out: Output, extra: list[str]) -> int:
    settings = Settings.from_env()
    argv = worker_argv(
        settings,
        loglevel=args.loglevel,
        pool=args.pool,
        concurrency=args.concurrency,
        queues=args.queues.split(","),
        hostname=args.hostname,
        events=args.events,
        without_mingle=args.without_mingle,
        without_gossip=args.without_gossip,
        extra=extra,
    )
    return _exec(argv, child_env(), args, out)


def _beat(args: argparse.Namespace, out: Output, extra: list[str]) -> int:
    Settings.from_env()  # fail here, naming the variable, rather than in Celery
    state_dir = args.state_dir.resolve()
    if not args.print_command:
        state_dir.mkdir(parents=True, exist_ok=True)
    return _exec(beat_argv(state_dir, loglevel=args.loglevel, extra=extra), child_env(), args, out)


def _flower(args: argparse.Namespace, out: Output, extra: list[str]) -> int:
    overrides: dict[str, str] = {}
    if args.address:
        overrides["DSPEX_FLOWER_ADDRESS"] = args.address
    if args.port:
        overrides["DSPEX_FLOWER_PORT"] = str(args.port)
    if args.allow_no_auth:
        overrides[ALLOW_NO_AUTH_ENV] = "true"
    env = child_env(**overrides)
    settings = Settings.from_env(env)
    if not settings.flower_password and not settings.flower_allow_no_auth:
        raise ConfigError(
            "refusing to start Flower without a password: set DSPEX_FLOWER_PASSWORD "
            "(and DSPEX_FLOWER_USER), or pass --allow-no-auth for an open UI "
            "(Flower then keeps its API locked)"
        )
    return _exec(flower_argv(extra), env, args, out)


def _exporter(args: argparse.Namespace, out: Output, extra: list[str]) -> int:
    try:
        from workers.exporter import serve
    except ModuleNotFoundError as e:
        if e.name != "prometheus_client":
            raise
        raise ConfigError("the exporter needs: pip install 'dspex-tasks[metrics]'") from e
    serve(Settings.from_env(), port=args.port, address=args.address)  # blocks until SIGTERM
    return 0


def _dev(args: argparse.Namespace, out: Output, extra: list[str]) -> int:
    if args.demo and out.json_mode:
        raise UsageError("--demo prints a human tour; it does not combine with --json")
    opts = DevOptions(
        state_dir=args.state_dir,
        redis_port=args.redis_port,
        loglevel=args.loglevel,
        concurrency=args.concurrency,
    )
    demo = None
    if args.demo:
        from dspex_tasks.cli import demo as demo_module

        demo = demo_module.main
    return run_dev(opts, out, demo)


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

    p = command("dev", _dev, "run Redis, a worker, beat and Flower on this machine")
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

    p = command("worker", _worker, "start a Celery worker (args after -- go to celery)")
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

    p = command("beat", _beat, "start Celery beat (the expiry sweep schedule)")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="where the schedule file lives (default .dev)",
    )
    loglevel(p)
    print_command(p)

    p = command("flower", _flower, "start Flower with basic auth from DSPEX_FLOWER_*")
    p.add_argument("--address", help="bind address (default DSPEX_FLOWER_ADDRESS or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default DSPEX_FLOWER_PORT or 5555)")
    p.add_argument(
        "--allow-no-auth",
        action="store_true",
        help="start without a password (open UI, API locked); trusted interfaces only",
    )
    print_command(p)

    p = command(
        "exporter", _exporter, "serve Prometheus metrics: queue depth/age, sessions, outcomes"
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

    command("stats", _with_client, "store statistics")
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
