"""Start/stop real ``redis-server`` processes for tests.

Used by the session fixture in ``conftest.py`` and reusable by fault tests that
need to kill or restart Redis (pass the old ``port`` and ``data_dir`` back in to
bring a server up again at the same address with the same files).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

# Same flags as scripts/with-redis.sh: loopback only, no persistence.
BASE_ARGS: tuple[str, ...] = ("--bind", "127.0.0.1", "--save", "", "--appendonly", "no")


def free_port() -> int:
    """A currently unused TCP port on 127.0.0.1 (racy, but fine for tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class RedisProc:
    port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] = field(repr=False)
    # Whether stop() deletes data_dir (only when we created it ourselves).
    owns_data_dir: bool = True

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> str:
        try:
            return (self.data_dir / "redis.log").read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: simulate a crash (no shutdown, no final save)."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful SIGTERM (escalating to SIGKILL), then clean up owned files."""
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        else:
            self.proc.wait()
        if self.owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def start_redis_server(
    port: int | None = None,
    extra_args: Sequence[str] = (),
    *,
    data_dir: Path | None = None,
    timeout: float = 10.0,
) -> RedisProc:
    """Start ``redis-server`` in the background and wait until it answers PING.

    ``extra_args`` come after the defaults, so e.g. ``("--appendonly", "yes")``
    overrides them. If ``data_dir`` is given it is used as ``--dir`` and kept on
    stop(); otherwise a temp dir is created and removed on stop().
    """
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not found on PATH (try: make redis)")

    owns = data_dir is None
    ddir = Path(tempfile.mkdtemp(prefix="dspex-redis-")) if data_dir is None else data_dir
    ddir.mkdir(parents=True, exist_ok=True)
    port = free_port() if port is None else port

    cmd = [
        exe,
        "--port",
        str(port),
        *BASE_ARGS,
        "--dir",
        str(ddir),
        "--logfile",
        str(ddir / "redis.log"),
        "--daemonize",
        "no",
        *extra_args,
    ]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    server = RedisProc(port=port, data_dir=ddir, proc=proc, owns_data_dir=owns)

    deadline = time.monotonic() + timeout
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0)
    try:
        while True:
            if not server.alive():
                log = server.log
                server.stop()
                raise RuntimeError(f"redis-server exited during startup:\n{log}")
            try:
                if client.ping():
                    return server
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                log = server.log
                server.stop()
                raise RuntimeError(f"redis-server not ready after {timeout}s:\n{log}")
            time.sleep(0.05)
    finally:
        client.close()
