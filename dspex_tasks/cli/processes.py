"""Process commands of ``dspex-tasks``: ``worker``, ``beat`` and ``flower`` exec the Celery
process that ``launch`` builds (or print its command line), ``exporter`` serves
``workers.exporter`` and ``api`` the HTTP API in this process, ``dev`` supervises the
whole stack on this machine and ``doctor`` checks whether a deployment's processes can
serve tasks right now.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from dspex_tasks.cli.devstack import DevOptions, run_dev
from dspex_tasks.cli.doctor import run_checks
from dspex_tasks.cli.launch import (
    ALLOW_NO_AUTH_ENV,
    beat_argv,
    child_env,
    flower_argv,
    worker_argv,
)
from dspex_tasks.cli.output import EXIT_FAILED, EXIT_OK, Output, Reply, UsageError
from dspex_tasks.client import Client
from dspex_tasks.errors import ConfigError
from dspex_tasks.settings import Settings

__all__ = ["api", "beat", "dev", "doctor", "exporter", "flower", "worker"]


def _exec(argv: list[str], env: dict[str, str], args: argparse.Namespace, out: Output) -> int:
    if args.print_command:
        return out.reply(Reply({"argv": argv}, shlex.join(argv)))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)  # replaces this process: Celery owns the signals now


def worker(args: argparse.Namespace, out: Output, extra: list[str]) -> int:
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


def beat(args: argparse.Namespace, out: Output, extra: list[str]) -> int:
    Settings.from_env()  # fail here, naming the variable, rather than in Celery
    state_dir = args.state_dir.resolve()
    if not args.print_command:
        state_dir.mkdir(parents=True, exist_ok=True)
    return _exec(beat_argv(state_dir, loglevel=args.loglevel, extra=extra), child_env(), args, out)


def flower(args: argparse.Namespace, out: Output, extra: list[str]) -> int:
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


def exporter(args: argparse.Namespace, out: Output, extra: list[str]) -> int:
    try:
        from workers.exporter import serve
    except ModuleNotFoundError as e:
        if e.name != "prometheus_client":
            raise
        raise ConfigError("the exporter needs: pip install 'dspex-tasks[metrics]'") from e
    # Where it listens (and scrape warnings) go to stderr, as ``python -m workers.exporter``.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    serve(Settings.from_env(), port=args.port, address=args.address)  # blocks until SIGTERM
    return 0


def api(args: argparse.Namespace, out: Output, extra: list[str]) -> int:
    settings = Settings.from_env()
    try:
        from dspex_tasks.gateway.server import serve
    except ModuleNotFoundError as e:
        if e.name not in {"fastapi", "uvicorn", "sse_starlette", "starlette"}:
            raise
        raise ConfigError("the HTTP API needs: pip install 'dspex-tasks[api]'") from e
    from workers import fix_client_per_command

    # A process of our own, so kombu may be patched: every run it starts publishes its
    # task and a task-sent event, each through a client kombu would build anew.
    fix_client_per_command.install()
    serve(
        settings,
        address=args.address or settings.api_address,
        port=args.port or settings.api_port,
        loglevel=args.loglevel,
    )  # blocks until SIGINT / SIGTERM
    return 0


def dev(args: argparse.Namespace, out: Output, extra: list[str]) -> int:
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


def doctor(args: argparse.Namespace, client: Client) -> Reply:
    checks = run_checks(
        client, skip=set(args.skip or ()), lm_profile=args.profile, lm_timeout_s=args.lm_timeout
    )
    ok = all(c.status != "fail" for c in checks)
    doc = {"ok": ok, "checks": {c.name: c.to_dict() for c in checks}}
    lines = [f"  {c.status:<5} {c.name:<12} {c.summary}" for c in checks]
    return Reply(doc, "\n".join(lines), EXIT_OK if ok else EXIT_FAILED)
