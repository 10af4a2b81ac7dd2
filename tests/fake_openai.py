"""An OpenAI-compatible fake LM server for tests: fixed latency, recorded calls.

    python tests/fake_openai.py --host 10.77.0.1 --port 0 --delay-ms 200 --port-file F

Every ``POST .../chat/completions`` is answered after ``--delay-ms`` (counted from the
request's arrival, like a provider's latency) with a DSPy ChatAdapter answer: each
output field the system prompt lists gets ``<field> for MARK[<marker>]``, where the
marker is the ``MARK[...]`` token of the last user message. So a caller can tell which
task a call belonged to, and check that each task got the answer to its own question.

Every call is recorded (marker, the client's address, path, model, temperature,
``max_tokens`` / ``max_completion_tokens``, arrival and reply times); ``GET /_fake/calls``
returns the records as JSON, ``GET /_fake/health`` answers ``ok``. Anything else is a
404 (recorded too, under ``unknown``), so a test notices a client speaking another API.

Plain asyncio, one process, HTTP/1.1 with keep-alive and Content-Length or chunked
request bodies: it holds hundreds of connections at little CPU, so a throughput test
measures the workers, not this server. Self-contained (stdlib only) so it can run with
any interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import time
from typing import Any

__all__ = ["answer_for", "marker_of"]

MARK = re.compile(r"MARK\[([A-Za-z0-9_.:@#-]+)\]")
_FIELD = re.compile(r"^\d+\. `(\w+)`", re.MULTILINE)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def marker_of(body: dict[str, Any]) -> tuple[str | None, list[str]]:
    """(marker of the last user message, output field names from the system prompt)."""
    messages = body.get("messages") or []
    system = "".join(_text(m.get("content")) for m in messages if m.get("role") == "system")
    users = [_text(m.get("content")) for m in messages if m.get("role") == "user"]
    found = MARK.search(users[-1]) if users else None
    section = system.split("Your output fields are:", 1)[-1].split("All interactions", 1)[0]
    fields = _FIELD.findall(section) or ["answer"]
    return (found.group(1) if found else None), fields


def answer_for(marker: str | None, fields: list[str]) -> str:
    """A ChatAdapter-formatted completion naming the marker in every field."""
    parts = [f"[[ ## {name} ## ]]\n{name} for MARK[{marker}]\n" for name in fields]
    return "\n".join(parts) + "\n[[ ## completed ## ]]\n"


class FakeOpenAI:
    def __init__(self, delay_s: float, jitter_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.jitter_s = jitter_s
        self._rng = random.Random(0)
        self.calls: list[dict[str, Any]] = []
        self.unknown: list[dict[str, Any]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                arrived = time.time()
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = [*lines[0].split(" ", 2), "", ""][:3]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await self._body(reader, headers)
                status, payload = await self._route(method, path, body, peer, arrived)
                writer.write(
                    b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s"
                    % (status, b"OK" if status == 200 else b"Error", len(payload), payload)
                )
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    # Trailers (none expected) end with an empty line.
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    return b"".join(chunks)
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
        length = int(headers.get("content-length") or 0)
        return await reader.readexactly(length) if length else b""

    async def _route(
        self, method: str, path: str, raw: bytes, peer: tuple[Any, ...], arrived: float
    ) -> tuple[int, bytes]:
        route = path.split("?", 1)[0]
        if method == "GET" and route == "/_fake/calls":
            return 200, json.dumps({"calls": self.calls, "unknown": self.unknown}).encode()
        if method == "GET" and route == "/_fake/health":
            return 200, b'"ok"'
        if method != "POST" or not route.endswith("/chat/completions"):
            self.unknown.append({"method": method, "path": path, "client": peer[0]})
            return 404, b'{"error": {"message": "not found", "type": "invalid_request_error"}}'
        body = json.loads(raw or b"{}")
        marker, fields = marker_of(body)
        # The latency counts from the request's arrival, like a provider's.
        delay = self.delay_s + self._rng.uniform(-self.jitter_s, self.jitter_s)
        await asyncio.sleep(max(0.0, delay - (time.time() - arrived)))
        self.calls.append(
            {
                "marker": marker,
                "client": peer[0],
                "path": route,
                "model": body.get("model"),
                "temperature": body.get("temperature"),
                "max_tokens": body.get("max_tokens"),
                "max_completion_tokens": body.get("max_completion_tokens"),
                "stream": bool(body.get("stream")),
                "arrived": arrived,
                "replied": time.time(),
            }
        )
        reply = {
            "id": f"chatcmpl-fake-{len(self.calls)}",
            "object": "chat.completion",
            "created": int(arrived),
            "model": body.get("model") or "fake",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer_for(marker, fields)},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60},
        }
        return 200, json.dumps(reply).encode()


async def serve(
    hosts: list[str], port: int, delay_s: float, jitter_s: float, port_file: str | None
) -> None:
    app = FakeOpenAI(delay_s, jitter_s)
    srv = await asyncio.start_server(app.handle, hosts, port, backlog=1024)
    bound = srv.sockets[0].getsockname()[1]
    if port_file:
        tmp = port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(bound))
        os.replace(tmp, port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with srv:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", action="append", help="address to bind (repeatable)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, default=200.0)
    parser.add_argument(
        "--jitter-ms", type=float, default=0.0, help="delay varies uniformly by +- this"
    )
    parser.add_argument("--port-file")
    args = parser.parse_args()
    asyncio.run(
        serve(
            args.host or ["127.0.0.1"],
            args.port,
            args.delay_ms / 1000,
            args.jitter_ms / 1000,
            args.port_file,
        )
    )


if __name__ == "__main__":
    main()
