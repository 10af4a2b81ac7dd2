"""The FastAPI application: routes, error handlers, auth, body limit, CORS, console."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from anyio import to_thread
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware

from dspex_tasks import __version__
from dspex_tasks.client import Client
from dspex_tasks.gateway.auth import BearerAuth
from dspex_tasks.gateway.console import mount_console
from dspex_tasks.gateway.errors import error_responses, install_error_handlers
from dspex_tasks.gateway.limits import BodyLimit
from dspex_tasks.gateway.routes import ROUTERS
from dspex_tasks.settings import Settings
from dspex_tasks.store.base import translate_errors

__all__ = ["create_app"]

_DESCRIPTION = """Sessions, typed variables, programs and runs of dspex-tasks over HTTP.

Every error is `{"error": {"code", "message", "details"}}` with a stable `code` (the
same codes as the Python client) and the HTTP status that fits it. `/v1` needs
`Authorization: Bearer <token>` when the server has tokens configured.
"""


def create_app(settings: Settings, *, client: Client | None = None) -> FastAPI:
    """The API over ``client`` (default: a new Client from ``settings``, closed with
    the app)."""
    owned = client is None
    producer = client if client is not None else Client(settings=settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The routes' store and broker calls run in this many threads. Their work is
        # mostly Python under one GIL: more threads add switching, not throughput.
        to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        yield
        if owned:
            producer.close()

    app = FastAPI(
        title="dspex-tasks",
        version=__version__,
        description=_DESCRIPTION,
        docs_url=None,  # the interactive docs load scripts from a CDN
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
    )
    app.state.client = producer
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)

    @app.get("/healthz", tags=["health"], responses=error_responses(public=True))
    async def healthz() -> dict[str, Any]:
        """200 when the store's Redis answers (readiness), else 503 ``store_unavailable``."""

        def ping() -> None:
            with translate_errors():
                producer.store.redis.ping()

        await run_in_threadpool(ping)
        return {"status": "ok"}

    mount_console(app)
    # Outermost last: CORS (so a 401 still carries its headers), auth, then the limit.
    app.add_middleware(BodyLimit, limit_bytes=settings.api_body_limit_bytes)
    app.add_middleware(BearerAuth, digests=settings.api_token_digests, protected_prefix="/v1/")
    if settings.api_cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.api_cors_origins),
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
        )
    return app
