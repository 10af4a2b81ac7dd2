"""Request body limit: plain ASGI middleware that reads a body at most once, whole.

A body over the limit (``Settings.api_body_limit_bytes``, derived from the store's own
size limits) is refused with 413 ``payload_too_large`` before the route runs: at once
from its ``Content-Length``, or, for a chunked body, as soon as the bytes read pass the
limit. A body within it is handed to the app as one message; later ``receive`` calls
(a client disconnecting) go through untouched.

Not FastAPI's ``max_body_size`` (Starlette's ``RequestBodyLimitMiddleware``): its 413
leaves the app as a plain-text body, outside the exception handlers that give every
error the one JSON body with a stable code.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dspex_tasks.errors import PayloadTooLarge
from dspex_tasks.gateway.errors import send_error

__all__ = ["BodyLimit"]


def _too_large(size: int | None, limit: int) -> PayloadTooLarge:
    shown = f"{size} bytes" if size is not None else "more bytes than that"
    return PayloadTooLarge(
        f"request body is {shown}, over the limit of {limit}",
        {"size_bytes": size, "limit_bytes": limit},
    )


class BodyLimit:
    """Refuses request bodies larger than ``limit_bytes``."""

    def __init__(self, app: ASGIApp, limit_bytes: int) -> None:
        self.app = app
        self.limit = limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length_header = headers.get(b"content-length")
        if length_header is None and b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body (GET, an SSE stream)
            return
        declared = int(length_header) if length_header and length_header.isdigit() else None
        if declared is not None and declared > self.limit:
            await send_error(scope, receive, send, _too_large(declared, self.limit))
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before its body was whole
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await send_error(scope, receive, send, _too_large(None, self.limit))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
