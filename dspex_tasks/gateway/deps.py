"""What every route gets from the app: the producer Client (store + Celery app)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from dspex_tasks.client import Client

__all__ = ["ClientDep"]


async def _client(request: Request) -> Client:
    # async: resolved on the event loop, not in the threadpool like a sync dependency.
    client: Client = request.app.state.client
    return client


ClientDep = Annotated[Client, Depends(_client)]
