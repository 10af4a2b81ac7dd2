"""``dspex-tasks api``: run the app on uvicorn, refusing an open bind without tokens."""

from __future__ import annotations

import ipaddress
import sys

from dspex_tasks.errors import ConfigError
from dspex_tasks.settings import Settings

__all__ = ["check_bind", "is_loopback", "serve"]


def is_loopback(address: str) -> bool:
    """Whether ``address`` (an IP or ``localhost``) is reachable from this host only."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(address: str, settings: Settings) -> None:
    """Without tokens the API is open to whoever can connect: loopback only.

    Raises:
        ConfigError: ``address`` is not loopback and ``DSPEX_API_TOKENS`` is empty.
    """
    if not settings.api_token_digests and not is_loopback(address):
        raise ConfigError(
            f"refusing to listen on {address}: set DSPEX_API_TOKENS (SHA-256 digests of "
            "bearer tokens) first, or listen on 127.0.0.1"
        )


def serve(settings: Settings, *, address: str, port: int, loglevel: str) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's graceful shutdown)."""
    check_bind(address, settings)
    # Imported here: the CLI's other commands never pay for uvicorn and FastAPI.
    import uvicorn

    from dspex_tasks.gateway.app import create_app

    app = create_app(settings)
    auth = "bearer tokens" if settings.api_token_digests else "no auth, loopback only"
    host = f"[{address}]" if ":" in address else address
    print(f"dspex-tasks api: serving http://{host}:{port} ({auth})", file=sys.stderr, flush=True)
    uvicorn.run(
        app,
        host=address,
        port=port,
        log_level=loglevel.lower(),
        # Logs never carry a token: it is in a header, and headers are not logged.
        access_log=loglevel.upper() in ("DEBUG", "INFO"),
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=5,
    )
