"""``/``: the web console, static files shipped inside the package (no build step, no
CDN). It uses only the public API, like any other client: the token the user types is
sent as a bearer token, and streams are read with ``fetch`` (``EventSource`` cannot send
an ``Authorization`` header), resuming with ``Last-Event-ID``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["STATIC_DIR", "mount_console"]

STATIC_DIR = Path(str(resources.files("dspex_tasks.gateway") / "static"))
#: The console runs only its own files: no inline script, no other origin.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def mount_console(app: FastAPI) -> None:
    """Serve the console at ``/`` and its assets under ``/console/``."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def console() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=_HEADERS)

    app.mount("/console", StaticFiles(directory=STATIC_DIR), name="console")
