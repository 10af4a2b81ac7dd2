"""The baseline of ``api.py``: a bare FastAPI endpoint doing one Redis call, on uvicorn
with the same options as ``dspex-tasks api`` (a helper: ``make bench`` skips ``_*.py``).

    python benchmarks/_bare_api.py REDIS_URL PORT
"""

from __future__ import annotations

import sys
from typing import Any

import redis
import uvicorn
from fastapi import FastAPI


def make_app(url: str) -> FastAPI:
    client = redis.Redis.from_url(url)
    app = FastAPI()

    # A plain ``def`` like the service's routes: FastAPI runs it in its threadpool.
    @app.post("/bare")
    def bare(body: dict[str, Any]) -> dict[str, Any]:
        return {"n": client.incr("bench:bare")}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


if __name__ == "__main__":
    uvicorn.run(
        make_app(sys.argv[1]),
        host="127.0.0.1",
        port=int(sys.argv[2]),
        log_level="warning",
        access_log=False,
        server_header=False,
    )
