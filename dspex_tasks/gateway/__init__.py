"""The HTTP API and web console (DESIGN.md §13): ``dspex-tasks api``.

    app.py       the FastAPI application: routes, handlers, middleware, console
    routes/      /v1 routes, one module per resource; events.py: the SSE streams
    errors.py    error code -> HTTP status (the one table) and the one error body
    auth.py      bearer tokens against SHA-256 digests (DSPEX_API_TOKENS)
    limits.py    the request body limit
    sse.py       Server-Sent Events: id / event / data, Last-Event-ID resume
    console.py   the web console at / (static/: no build step, no CDN)
    server.py    uvicorn, and the rule: no tokens, no bind beyond loopback

Sits on top beside ``cli/``: it uses the producer Client and the store, never DSPy.
"""

from __future__ import annotations

from dspex_tasks.gateway.app import create_app

__all__ = ["create_app"]
