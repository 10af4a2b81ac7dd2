"""The ``/v1`` routes, one module per resource."""

from __future__ import annotations

from fastapi import APIRouter

from dspex_tasks.gateway.routes import events, programs, runs, sessions, variables

__all__ = ["ROUTERS"]

ROUTERS: tuple[APIRouter, ...] = (
    sessions.router,
    variables.router,
    programs.router,
    runs.router,
    events.router,
)
