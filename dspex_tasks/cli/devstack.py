"""``dspex-tasks dev``: the whole stack on one machine, stopped cleanly by Ctrl-C.

Starts a local ``redis-server`` (unless ``DSPEX_REDIS_URL`` is set), one worker, beat,
Flower and the HTTP API (with its web console) on 127.0.0.1, each in its own process
group with its log under ``<state dir>/logs/``. Flower's basic-auth credentials are
``DSPEX_FLOWER_USER`` / ``DSPEX_FLOWER_PASSWORD`` when set, generated otherwise; the
banner prints ``export`` lines for everything a following command needs (Celery's CLI,
the README's curl lines) and the API's URL.
Flower starts once the worker answers, so its ``/api/workers`` lists the worker at once.
The local Redis keeps its data (AOF) in ``<state dir>/redis`` between runs.

SIGINT or SIGTERM stops everything it started: SIGTERM to each group, up to 10 s grace,
then SIGKILL (a second signal skips the grace). Celery processes stop first so the
worker's warm shutdown can still reach Redis; Redis stops last.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import redis

from dspex_tasks.cli.launch import api_argv, beat_argv, child_env, flower_argv, worker_argv
from dspex_tasks.cli.output import EXIT_FAILED, EXIT_OK, Output, dumps
from dspex_tasks.client import Client
from dspex_tasks.errors import ConfigError, StoreUnavailable
from dspex_tasks.settings import Settings, mask_url

__all__ = ["DEFAULT_STATE_DIR", "DevOptions", "run_dev"]

DEFAULT_STATE_DIR = Path(".dev")
STOP_GRACE_S = 10.0
WORKER_READY_TIMEOUT_S = 90.0
FLOWER_READY_TIMEOUT_S = 30.0
FLOWER_LIST_TIMEOUT_S = 5.0
API_READY_TIMEOUT_S = 30.0
_POLL_S = 0.2


class _Stop(BaseException):
    """Raised by the signal handler to unwind into the shutdown path."""


@dataclass
class DevOptions:
    state_dir: Path = DEFAULT_STATE_DIR
    redis_port: int | None = None
    loglevel: str = "WARNING"
    concurrency: int | None = None


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``port`` now.

    With ``SO_REUSEADDR``, as Tornado (Flower) binds: a port left in TIME_WAIT by the
    previous run is free for it, so Flower is not moved off a port it could have used.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Supervisor:
    """Starts children in their own process groups and stops every one of them."""

    log_dir: Path
    out: Output
    children: list[Child] = field(default_factory=list)
    force: bool = False

    def start(self, name: str, argv: Sequence[str], env: dict[str, str], cwd: Path) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            log.write(f"$ {shlex.join(argv)}\n".encode())
            log.flush()
            # Own session: the terminal's Ctrl-C reaches only us, and killpg reaches
            # every grandchild (prefork children, Redis' AOF rewrite).
            proc = subprocess.Popen(
                list(argv),
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def dead(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def _signal(self, child: Child, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, sig)

    def _stop_group(self, group: list[Child]) -> None:
        for child in group:
            if child.proc.poll() is None:
                self._signal(child, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in group:
            while child.proc.poll() is None and time.monotonic() < deadline and not self.force:
                time.sleep(0.05)
            if child.proc.poll() is None:
                self.out.note(f"dev: {child.name} did not stop in time; killing it")
            # Also reaps what the leader left behind in its group.
            self._signal(child, signal.SIGKILL)
            child.proc.wait()

    def take_over_signals(self) -> None:
        """From now on SIGINT / SIGTERM only hurry the shutdown (kill without grace)."""

        def hurry(signum: int, frame: FrameType | None) -> None:
            self.force = True

        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, hurry)

    def stop_all(self) -> None:
        """Stop Celery processes first (the worker's warm shutdown needs Redis), then Redis."""
        self._stop_group([c for c in self.children if c.name != "redis"])
        self._stop_group([c for c in self.children if c.name == "redis"])


def _wait_for(
    what: str,
    ready: Callable[[], bool],
    timeout_s: float,
    supervisor: Supervisor,
) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        dead = supervisor.dead()
        if dead is not None:
            raise _ChildDied(dead)
        if time.monotonic() > deadline:
            raise ConfigError(f"dev: {what} not ready after {timeout_s:g} s")
        time.sleep(_POLL_S)


class _ChildDied(Exception):
    def __init__(self, child: Child) -> None:
        super().__init__(child.name)
        self.child = child


def _start_redis(sup: Supervisor, opts: DevOptions, env: dict[str, str]) -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        raise ConfigError("redis-server not found on PATH (try: make redis)")
    port = opts.redis_port or free_port()
    data_dir = (opts.state_dir / "redis").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        exe,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes",
        "--save",
        "",
        "--daemonize",
        "no",
    ]
    sup.start("redis", argv, env, data_dir)
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            return False

    try:
        _wait_for("redis-server", answers, 20.0, sup)
    finally:
        client.close()
    return f"redis://127.0.0.1:{port}/0"


def _http_ready(url: str) -> Callable[[], bool]:
    """Whether ``url`` answers 200 (Flower's ``/healthcheck``, the API's ``/healthz``)."""

    def ready() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    return ready


def _flower_workers(url: str, user: str, password: str, *, refresh: bool) -> dict[str, Any]:
    """Flower's ``/api/workers`` (``{}`` when it cannot answer)."""
    request = urllib.request.Request(f"{url}/api/workers" + ("?refresh=1" if refresh else ""))
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10.0) as r:
            answer = json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return {}
    return answer if isinstance(answer, dict) else {}


def _bold(text: str, stream: Any) -> str:
    isatty = getattr(stream, "isatty", None)
    return f"\033[1m{text}\033[0m" if isatty is not None and isatty() else text


def _exports(env: dict[str, str]) -> list[str]:
    """``export`` lines for a following shell: Celery's CLI, the CLI, curl to Flower."""
    names = ("DSPEX_REDIS_URL", "DSPEX_FLOWER_PORT", "DSPEX_FLOWER_USER", "DSPEX_FLOWER_PASSWORD")
    return [f"export {name}={shlex.quote(env[name])}" for name in names]


def _moved(info: dict[str, Any], service: str, what: str, stream: Any) -> list[str]:
    """The banner's loud line for a service whose default port was taken."""
    if not info[f"{service}_port_moved"]:
        return []
    port, asked = info[f"{service}_port"], info[f"{service}_port_asked"]
    return [_bold(f"          {what} is on port {port}: port {asked} is taken", stream)]


def _banner(info: dict[str, Any], stream: Any) -> str:
    logs = info["logs"]
    flower = f"  Flower  {info['flower_url']}  user {info['flower_user']}  " + (
        "password from DSPEX_FLOWER_PASSWORD"
        if info["flower_password_given"]
        else f"password {info['flower_password']}"
    )
    lines = [
        "dspex-tasks dev: the stack is up",
        f"  Redis   {info['redis_url']}"
        + (f"  (data kept in {info['redis_dir']}, AOF on)" if info["redis_started"] else ""),
        flower,
    ]
    lines += _moved(info, "flower", "Flower", stream)
    lines.append(f"  API     {info['api_url']}  (web console at /; {info['api_auth']})")
    lines += _moved(info, "api", "the API", stream)
    lines += [
        f"  Worker  {info['worker']}",
        f"  Logs    {Path(logs['worker']).parent}/{{{','.join(logs)}}}.log",
        "For a producer, Celery's CLI or curl to Flower, in another shell:",
        *(f"  {line}" for line in info["exports"]),
        "  (e.g. curl -u $DSPEX_FLOWER_USER:$DSPEX_FLOWER_PASSWORD "
        "http://127.0.0.1:$DSPEX_FLOWER_PORT/api/workers)",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class _StackEnv:
    env: dict[str, str]
    redis_started: bool
    flower_port_asked: int
    api_port_asked: int
    password_given: bool


def _service_port(base: dict[str, str], variable: str, asked: int, what: str, out: Output) -> int:
    """The port a service gets. A port set in ``variable`` that is taken is an error;
    the default one that is taken moves, loudly (banner and stderr)."""
    if port_free("127.0.0.1", asked):
        return asked
    if base.get(variable):
        raise ConfigError(
            f"dev: {variable}={asked} is taken on 127.0.0.1; free it, or unset "
            f"{variable} to let dev pick a free port"
        )
    port = free_port()
    out.note(_bold(f"dev: port {asked} is taken: {what} will listen on {port}", out.stderr))
    return port


def _stack_env(opts: DevOptions, sup: Supervisor, out: Output) -> _StackEnv:
    """The children's environment (starting Redis if needed)."""
    base = child_env()
    redis_url = base.get("DSPEX_REDIS_URL")
    started = not redis_url
    if not redis_url:
        out.note("dev: starting redis-server ...")
        redis_url = _start_redis(sup, opts, base)
        # One Redis for everything: a stray broker setting would split the stack.
        for name in ("DSPEX_BROKER_URL", "DSPEX_RESULT_BACKEND"):
            base.pop(name, None)
    asked = Settings.from_env(base)
    flower_port = _service_port(base, "DSPEX_FLOWER_PORT", asked.flower_port, "Flower", out)
    api_port = _service_port(base, "DSPEX_API_PORT", asked.api_port, "the API", out)
    password = base.get("DSPEX_FLOWER_PASSWORD")
    env = child_env(
        base,
        DSPEX_REDIS_URL=redis_url,
        DSPEX_FLOWER_ADDRESS="127.0.0.1",
        DSPEX_FLOWER_PORT=str(flower_port),
        DSPEX_FLOWER_USER=base.get("DSPEX_FLOWER_USER") or "admin",
        DSPEX_FLOWER_PASSWORD=password or secrets.token_urlsafe(18),
        DSPEX_API_ADDRESS="127.0.0.1",
        DSPEX_API_PORT=str(api_port),
    )
    return _StackEnv(env, started, asked.flower_port, asked.api_port, bool(password))


def _start_worker_and_beat(
    opts: DevOptions, sup: Supervisor, settings: Settings, env: dict[str, str]
) -> None:
    state_dir = opts.state_dir.resolve()
    worker = worker_argv(
        settings,
        loglevel=opts.loglevel,
        concurrency=opts.concurrency,
        hostname=f"{_node_prefix()}%h",
        without_mingle=True,
        without_gossip=True,
    )
    sup.start("worker", worker, env, state_dir)
    sup.start("beat", beat_argv(state_dir, loglevel=opts.loglevel), env, state_dir)


def _node_prefix() -> str:
    return f"dspex-dev-{os.getpid()}@"


def _our_workers(client: Client) -> list[str]:
    # Only our node: a given Redis may have other workers on it already.
    return [n for n in client.workers(0.5) if n.startswith(_node_prefix())]


def _serve(sup: Supervisor) -> NoReturn:
    """Wait for a signal; a child that dies ends the stack."""
    while True:
        dead = sup.dead()
        if dead is not None:
            raise _ChildDied(dead)
        time.sleep(_POLL_S * 2)


def run_dev(opts: DevOptions, out: Output, demo: Callable[[Client], int] | None = None) -> int:
    """Run the stack until a signal (or, with ``demo``, until the demo returns)."""
    state_dir = opts.state_dir.resolve()
    sup = Supervisor(state_dir / "logs", out)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise _Stop()

    # Explicit for SIGINT too: a shell starts background jobs with SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    client: Client | None = None
    try:
        stack = _stack_env(opts, sup, out)
        env = stack.env
        settings = Settings.from_env(env)
        client = Client(settings=settings)
        try:
            client.store.redis.ping()
        except redis.RedisError as e:
            url = mask_url(settings.redis_url)
            raise StoreUnavailable(f"Redis at {url} is unavailable: {e}") from e
        out.note("dev: starting worker and beat ...")
        _start_worker_and_beat(opts, sup, settings, env)
        ready_client = client
        workers: list[str] = []

        def worker_answers() -> bool:
            workers[:] = _our_workers(ready_client)
            return bool(workers)

        _wait_for("the worker", worker_answers, WORKER_READY_TIMEOUT_S, sup)
        # Only now: Flower asks for the workers when it starts; one that had not answered
        # yet stays missing from /api/workers until a ?refresh=1.
        out.note("dev: starting flower ...")
        sup.start("flower", flower_argv(), env, state_dir)
        flower_url = f"http://127.0.0.1:{settings.flower_port}"
        _wait_for("Flower", _http_ready(f"{flower_url}/healthcheck"), FLOWER_READY_TIMEOUT_S, sup)
        # Flower fills /api/workers from one inspection at start (about a second); wait
        # for it to list our worker, and ask it to inspect again once if it does not.
        user, password = settings.flower_user, settings.flower_password.get()

        def flower_lists_worker(refresh: bool = False) -> bool:
            listed = _flower_workers(flower_url, user, password, refresh=refresh)
            return any(name.startswith(_node_prefix()) for name in listed)

        try:
            _wait_for("Flower's worker list", flower_lists_worker, FLOWER_LIST_TIMEOUT_S, sup)
        except ConfigError:
            if not flower_lists_worker(refresh=True):
                out.note("dev: Flower does not list the worker yet; try /api/workers?refresh=1")
        out.note("dev: starting the API ...")
        api_url = f"http://127.0.0.1:{settings.api_port}"
        sup.start(
            "api", api_argv("127.0.0.1", settings.api_port, loglevel=opts.loglevel), env, state_dir
        )
        _wait_for("the API", _http_ready(f"{api_url}/healthz"), API_READY_TIMEOUT_S, sup)
        exports = _exports(env)
        info: dict[str, Any] = {
            "status": "ready",
            "redis_url": settings.redis_url,
            "redis_started": stack.redis_started,
            "redis_dir": str(state_dir / "redis") if stack.redis_started else None,
            "flower_url": flower_url,
            "flower_port": settings.flower_port,
            "flower_port_asked": stack.flower_port_asked,
            "flower_port_moved": settings.flower_port != stack.flower_port_asked,
            "flower_user": settings.flower_user,
            "flower_password": settings.flower_password.get(),
            "flower_password_given": stack.password_given,
            "api_url": api_url,
            "api_port": settings.api_port,
            "api_port_asked": stack.api_port_asked,
            "api_port_moved": settings.api_port != stack.api_port_asked,
            "api_auth": "bearer tokens" if settings.api_token_digests else "no auth",
            # The readiness answer: asking again could miss a busy worker's reply.
            "worker": ", ".join(workers),
            "state_dir": str(state_dir),
            "logs": {c.name: str(c.log_path) for c in sup.children},
            "pids": {c.name: c.pid for c in sup.children},
            "exports": exports,
            "env": "\n".join(exports),
        }
        text = dumps(info) if out.json_mode else _banner(info, out.stdout)
        print(text, file=out.stdout, flush=True)
        if demo is not None:
            return demo(client)
        _serve(sup)
    except (KeyboardInterrupt, _Stop):
        out.note("dev: stopping ...")
        return EXIT_FAILED if demo is not None else EXIT_OK
    except _ChildDied as e:
        child = e.child
        out.note(
            f"dev: {child.name} exited with status {child.proc.returncode}; "
            f"last lines of {child.log_path}:\n{child.tail()}"
        )
        return EXIT_FAILED
    finally:
        sup.take_over_signals()  # first: a signal must not cut the cleanup short
        if client is not None:
            gc.collect()  # finalize result handles while Redis is still up
            with contextlib.suppress(Exception):
                client.close()
        sup.stop_all()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if sup.children:
            out.note("dev: stopped " + ", ".join(c.name for c in sup.children))
