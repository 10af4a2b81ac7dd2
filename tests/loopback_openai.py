"""A loopback OpenAI-compatible chat endpoint for the security tests: answers ``POST
/v1/chat/completions`` in DSPy's ChatAdapter format and records every request's path,
Authorization header and body, so a test can prove which key reached which endpoint.

A question containing ``ECHO-AUTH`` gets a 401 whose error text echoes the Authorization
header (as some providers and proxies do); ``HUGE[n]`` makes every output field n
characters long.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dspex_tasks.echo_lm import output_fields

__all__ = ["FakeOpenAI", "Seen"]

_HUGE = re.compile(r"HUGE\[(\d+)\]")


@dataclass(frozen=True)
class Seen:
    path: str
    authorization: str | None
    body: dict[str, Any]


@dataclass
class FakeOpenAI:
    """``with FakeOpenAI() as server: server.base_url`` (``http://127.0.0.1:<port>/v1``)."""

    seen: list[Seen] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_port}/v1"

    def __enter__(self) -> FakeOpenAI:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                auth = self.headers.get("Authorization")
                owner.seen.append(Seen(self.path, auth, body))
                status, payload = owner.answer(body, auth)
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @staticmethod
    def _text(content: Any) -> str:
        if isinstance(content, str):
            return content
        return "".join(part.get("text", "") for part in content or [])

    def answer(self, body: dict[str, Any], auth: str | None) -> tuple[int, dict[str, Any]]:
        messages = body.get("messages") or []
        system = "".join(self._text(m["content"]) for m in messages if m["role"] == "system")
        users = [self._text(m["content"]) for m in messages if m["role"] == "user"]
        user = users[-1] if users else ""
        if "ECHO-AUTH" in user:
            error = {
                "message": f"Incorrect API key provided: {auth}",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
            }
            return 401, {"error": error}
        huge = _HUGE.search(user)
        size = int(huge.group(1)) if huge else 0
        text = "".join(
            f"[[ ## {name} ## ]]\n{'h' * size if size else f'fake {name}'}\n\n"
            for name, _ in output_fields(system)
        )
        text += "[[ ## completed ## ]]\n"
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        }
        return 200, {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", "?"),
            "choices": [choice],
            "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12},
        }
