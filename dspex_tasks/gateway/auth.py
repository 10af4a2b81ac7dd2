"""Bearer-token auth: plain ASGI middleware in front of every ``/v1`` route.

Tokens are never stored: ``DSPEX_API_TOKENS`` holds their SHA-256 digests (lowercase
hex), and a request's token is hashed and compared with every digest in constant time
(``hmac.compare_digest``), so neither the comparison nor the number of digests tried
says how close a guess was. A failure is a 401 with code ``unauthorized`` in the one
error body. Without digests configured, auth is off (the server then refuses to listen
beyond loopback: ``server.py``).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection

from starlette.types import ASGIApp, Receive, Scope, Send

from dspex_tasks.errors import Unauthorized
from dspex_tasks.gateway.errors import send_error

__all__ = ["BearerAuth", "token_digest"]

_CHALLENGE = {"www-authenticate": 'Bearer realm="dspex-tasks"'}


def token_digest(token: str) -> str:
    """The digest to put in ``DSPEX_API_TOKENS`` for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


class BearerAuth:
    """Lets a request through to a protected path only with a known bearer token."""

    def __init__(self, app: ASGIApp, digests: Collection[str], protected_prefix: str) -> None:
        self.app = app
        self._digests = tuple(d.encode() for d in digests)
        self._prefix = protected_prefix

    def _allowed(self, scope: Scope) -> bool:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return False
        digest = hashlib.sha256(token).hexdigest().encode()
        # Compare with every digest, whatever matched: the time taken says nothing.
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(digest, known)
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self._digests
            or not scope["path"].startswith(self._prefix)
            # A CORS preflight carries no credentials by design.
            or scope["method"] == "OPTIONS"
            or self._allowed(scope)
        ):
            await self.app(scope, receive, send)
            return
        denied = Unauthorized("a valid bearer token is required", {})
        await send_error(scope, receive, send, denied, headers=_CHALLENGE)
