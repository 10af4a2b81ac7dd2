"""An OpenAI-compatible fake LM server: the LM boundary of the tests and benchmarks.

In the test's process (a background thread), for tests that look at what was sent::

    with FakeOpenAI() as lm:              # lm.base_url == "http://127.0.0.1:<port>/v1"
        ...
        lm.calls                          # a Call per chat completion request

In its own process, so that a load test measures the workers and not this server::

    python tests/fake_openai.py --host 10.77.0.1 --port 0 --delay-ms 200 --port-file F

Every ``POST .../chat/completions`` is answered after the delay (counted from the
request's arrival, like a provider's latency, optionally +- a seeded jitter) in DSPy's
ChatAdapter format. Each output field the system prompt lists gets ``<field> for
MARK[<marker>]`` when the last user message carries a ``MARK[<marker>]`` token, so a
caller can check that each task got the answer to its own question, and ``fake
<field>`` otherwise. ``KEY[<answer>]`` in that message is a question the fake can learn:
every field is answered ``<answer>`` when the conversation carries demos (an earlier
user message: DSPy's few-shot examples) or the message says ``EASY``, and ``fake
<field>`` otherwise -- so a metric scores a program higher once an optimizer gave it
demos. In that user message, ``HUGE[n]`` makes every field n characters
long, ``WORDS[n]`` n words long, and ``ECHO-AUTH`` gets a 401 whose error text echoes the
Authorization header (as some providers and proxies do). ``HANG`` makes the server read
the whole request and never answer (a hung endpoint); such requests are counted in
``hanging`` when they arrive, and get a 503 only when the server stops.

A request with ``"stream": true`` is answered as Server-Sent Events (``chat.completion.chunk``
objects, then ``data: [DONE]``, chunked transfer encoding): the content split before each
word, one chunk per word, ``chunk_delay_s`` apart (the first after the delay), then a
usage chunk when ``stream_options.include_usage`` asks for it. ``first_chunk`` in the
call record is when the first content chunk was written.

Rate limits, like a provider's: with ``limit_rpm`` set, a request arriving when that
many requests arrived in the last 60 s (``limit_window_s``) is answered 429 with a
``Retry-After`` of ``retry_after_s``; ``storm(seconds)`` answers every request 429 for
that long. 429s are recorded in ``rejected`` (arrival times), not in ``calls``;
``POST /_fake/config`` (``{"limit_rpm", "limit_window_s", "retry_after_s", "storm_s",
"delay_s"}``) sets the same from another process, and ``POST /_fake/reset`` forgets
every record (calls, arrivals, 429s, hanging requests) and ends a storm.

Every chat request is recorded as a :class:`Call`, with the client's address and the
Authorization header, so a test can prove which key reached which endpoint.
``GET /_fake/calls`` returns the records as JSON (``{"calls": [...], "unknown": [...]}``)
for a server in another process, ``GET /_fake/health`` answers ``"ok"``. Anything else
is a 404, recorded under ``unknown``, so a test notices a client speaking another API.

Plain asyncio, HTTP/1.1 with keep-alive and Content-Length or chunked request bodies: it
holds hundreds of connections at little CPU. Standard library only, so it runs under
any interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Call", "FakeOpenAI"]

_MARK = re.compile(r"MARK\[([A-Za-z0-9_.:@#-]+)\]")
_HUGE = re.compile(r"HUGE\[(\d+)\]")
_KEY = re.compile(r"KEY\[([^\]]+)\]")
_WORDS = re.compile(r"WORDS\[(\d+)\]")
_HANG = "HANG"
_FIELD = re.compile(r"^\d+\. `(\w+)`", re.MULTILINE)
_NOT_FOUND = b'{"error": {"message": "not found", "type": "invalid_request_error"}}'


@dataclasses.dataclass(frozen=True)
class Call:
    """One chat completion request, as the server saw it."""

    path: str
    #: The client's address: in a multi-host test, which host made the call.
    client: str
    authorization: str | None
    marker: str | None
    model: str | None
    temperature: float | None
    max_tokens: int | None
    max_completion_tokens: int | None
    stream: bool
    #: Unix times.
    arrived: float
    replied: float
    #: When the first content chunk of a streamed reply was written (else None).
    first_chunk: float | None = None


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _fields(system: str) -> list[str]:
    section = system.split("Your output fields are:", 1)[-1].split("All interactions", 1)[0]
    return _FIELD.findall(section) or ["answer"]


def _users(body: dict[str, Any]) -> list[str]:
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    return [_text(m.get("content")) for m in messages if m.get("role") == "user"]


def _prompt(body: dict[str, Any]) -> tuple[str, str]:
    """(the system prompt, the last user message)."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    system = "".join(_text(m.get("content")) for m in messages if m.get("role") == "system")
    users = _users(body)
    return system, users[-1] if users else ""


def _completion(
    body: dict[str, Any], auth: str | None, n: int
) -> tuple[int, dict[str, Any], str | None]:
    """(HTTP status, the JSON reply, the request's marker)."""
    system, user = _prompt(body)
    mark, huge = _MARK.search(user), _HUGE.search(user)
    marker = mark.group(1) if mark else None
    if "ECHO-AUTH" in user:
        error = {
            "message": f"Incorrect API key provided: {auth}",
            "type": "invalid_request_error",
            "code": "invalid_api_key",
        }
        return 401, {"error": error}, marker
    text = ""
    words, key = _WORDS.search(user), _KEY.search(user)
    learned = key is not None and (len(_users(body)) > 1 or "EASY" in user)
    for name in _fields(system):
        if learned:
            assert key is not None
            value = key.group(1)
        elif words:
            value = " ".join(f"w{i}" for i in range(int(words.group(1))))
        elif huge:
            value = "h" * int(huge.group(1))
        elif marker:
            value = f"{name} for MARK[{marker}]"
        else:
            value = f"fake {name}"
        text += f"[[ ## {name} ## ]]\n{value}\n\n"
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text + "[[ ## completed ## ]]\n"},
        "finish_reason": "stop",
    }
    reply = {
        "id": f"chatcmpl-fake-{n}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model") or "fake",
        "choices": [choice],
        "usage": {"prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60},
    }
    return 200, reply, marker


class FakeOpenAI:
    """The server. ``with FakeOpenAI(...)`` runs it on a loopback port in a thread;
    :meth:`serve` runs it in the caller's event loop until :meth:`stop`."""

    def __init__(
        self,
        delay_s: float = 0.0,
        jitter_s: float = 0.0,
        chunk_delay_s: float = 0.0,
        *,
        limit_rpm: int | None = None,
        limit_window_s: float = 60.0,
        retry_after_s: float = 1.0,
    ) -> None:
        self.delay_s = delay_s
        self.jitter_s = jitter_s
        self.chunk_delay_s = chunk_delay_s
        self.limit_rpm = limit_rpm
        self.limit_window_s = limit_window_s
        self.retry_after_s = retry_after_s
        #: Until when (unix time) every request is answered 429.
        self.storm_until = 0.0
        #: Arrival times of the requests answered 429.
        self.rejected: list[float] = []
        #: Arrival times of every chat request (answered or not), for windows and rates.
        self.arrivals: list[float] = []
        self.calls: list[Call] = []
        self.unknown: list[dict[str, str]] = []
        #: Markers of the requests that arrived in ``HANG`` mode (never answered).
        self.hanging: list[str | None] = []
        #: Markers of the hanging requests whose client closed the connection (abandoned).
        self.abandoned: list[str | None] = []
        # Seeded: two runs with the same settings see the same latencies.
        self._rng = random.Random(0)
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._open: set[asyncio.StreamWriter] = set()

    def storm(self, seconds: float) -> None:
        """Answer every request 429 (Retry-After: ``retry_after_s``) for ``seconds``."""
        self.storm_until = time.time() + seconds

    def per_second(self) -> dict[int, int]:
        """Chat requests per second of arrival (unix seconds), 429s included."""
        counts: dict[int, int] = {}
        for t in list(self.arrivals):
            counts[int(t)] = counts.get(int(t), 0) + 1
        return counts

    def _throttled(self, arrived: float) -> bool:
        if arrived < self.storm_until:
            return True
        if self.limit_rpm is None:
            return False
        since = arrived - self.limit_window_s
        recent = sum(1 for t in self.arrivals[-(self.limit_rpm + 1) :] if t > since)
        return recent > self.limit_rpm

    @property
    def base_url(self) -> str:
        assert self._port is not None, "the server is not running"
        return f"http://127.0.0.1:{self._port}/v1"

    async def serve(
        self, hosts: list[str], port: int, started: Callable[[int], None] = lambda port: None
    ) -> None:
        """Listen on ``hosts`` (port 0: any free one), call ``started(port)``, serve."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._handle, hosts, port, backlog=1024)
        self._port = server.sockets[0].getsockname()[1]
        started(self._port)
        await self._stopping.wait()
        server.close()
        # Closed here, so that their handlers return (at EOF, or at the failed write of
        # a delayed reply) instead of being cancelled by asyncio.run, which Python 3.11
        # logs as an error.
        for writer in list(self._open):
            writer.close()
        deadline = time.monotonic() + self.delay_s + self.jitter_s + 1
        while self._open and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def stop(self) -> None:
        """End :meth:`serve`; callable from any thread or a signal handler."""
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)

    def __enter__(self) -> FakeOpenAI:
        ready = threading.Event()
        self._thread = threading.Thread(
            target=asyncio.run,
            args=(self.serve(["127.0.0.1"], 0, lambda port: ready.set()),),
            name="fake-openai",
            daemon=True,
        )
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake OpenAI server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        self._open.add(writer)
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
                raw = await self._body(reader, headers)
                status, payload = await self._route(
                    method, path, headers, raw, peer, arrived, reader
                )
                if isinstance(payload, _Streamed):
                    await self._stream(writer, payload)
                    continue
                extra = b""
                if status == 429:
                    extra = b"Retry-After: %s\r\n" % str(self.retry_after_s).encode()
                writer.write(
                    b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n%s"
                    b"Content-Length: %d\r\n\r\n%s"
                    % (status, b"OK" if status == 200 else b"Error", extra, len(payload), payload)
                )
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._open.discard(writer)
            writer.close()

    async def _stream(self, writer: asyncio.StreamWriter, reply: _Streamed) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        )

        def send(data: bytes) -> None:
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))

        for n, event in enumerate(reply.events):
            if n and self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            send(b"data: " + json.dumps(event).encode() + b"\n\n")
            if n == 0 or self.chunk_delay_s:
                await writer.drain()
            if n == 0:
                first = time.time()
        send(b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        self.calls.append(Call(**reply.record, replied=time.time(), first_chunk=first))

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
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        raw: bytes,
        peer: tuple[Any, ...],
        arrived: float,
        reader: asyncio.StreamReader | None = None,
    ) -> tuple[int, bytes | _Streamed]:
        route = path.split("?", 1)[0]
        if method == "GET" and route == "/_fake/calls":
            calls = [dataclasses.asdict(c) for c in self.calls]
            doc = {
                "calls": calls,
                "unknown": self.unknown,
                "rejected": self.rejected,
                "arrivals": self.arrivals,
                "hanging": self.hanging,
            }
            return 200, json.dumps(doc).encode()
        if method == "POST" and route == "/_fake/config":
            conf = json.loads(raw or b"{}")
            for name in ("limit_rpm", "limit_window_s", "retry_after_s", "delay_s"):
                if name in conf:
                    setattr(self, name, conf[name])
            if conf.get("storm_s"):
                self.storm(float(conf["storm_s"]))
            return 200, b'"ok"'
        if method == "POST" and route == "/_fake/reset":
            records = (self.calls, self.unknown, self.rejected, self.arrivals, self.hanging)
            for record in (*records, self.abandoned):
                record.clear()
            self.storm_until = 0.0
            return 200, b'"ok"'
        if method == "GET" and route == "/_fake/health":
            return 200, b'"ok"'
        if method != "POST" or not route.endswith("/chat/completions"):
            self.unknown.append({"method": method, "path": path, "client": str(peer[0])})
            return 404, _NOT_FOUND
        body = json.loads(raw or b"{}")
        auth = headers.get("authorization")
        if _HANG in _prompt(body)[1]:
            marker = _MARK.search(_prompt(body)[1])
            self.hanging.append(marker.group(1) if marker else None)
            assert self._stopping is not None
            # Accepted, never answered: until the server stops, or the client gives up
            # (closes the connection: the request was abandoned).
            stopping = asyncio.ensure_future(self._stopping.wait())
            gone = asyncio.ensure_future(reader.read(1)) if reader is not None else None
            waits = {stopping} if gone is None else {stopping, gone}
            done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if gone is not None and gone in done and gone.result() == b"":
                self.abandoned.append(marker.group(1) if marker else None)
                raise ConnectionResetError("the client abandoned the request")
            return 503, b'{"error": {"message": "stopping"}}'
        self.arrivals.append(arrived)
        if self._throttled(arrived):
            self.rejected.append(arrived)
            error = {"message": "Rate limit reached", "type": "rate_limit_error"}
            return 429, json.dumps({"error": error}).encode()
        status, reply, marker = _completion(body, auth, len(self.calls) + 1)
        delay_s = self.delay_s + self._rng.uniform(-self.jitter_s, self.jitter_s)
        await asyncio.sleep(max(0.0, delay_s - (time.time() - arrived)))
        streamed = status == 200 and bool(body.get("stream"))
        record = dict(
            path=route,
            client=str(peer[0]),
            authorization=auth,
            marker=marker,
            model=body.get("model"),
            temperature=body.get("temperature"),
            max_tokens=body.get("max_tokens"),
            max_completion_tokens=body.get("max_completion_tokens"),
            stream=bool(body.get("stream")),
            arrived=arrived,
        )
        if streamed:
            usage = (body.get("stream_options") or {}).get("include_usage")
            return status, _Streamed(_chunks(reply, bool(usage)), record)
        self.calls.append(
            Call(
                path=route,
                client=str(peer[0]),
                authorization=auth,
                marker=marker,
                model=body.get("model"),
                temperature=body.get("temperature"),
                max_tokens=body.get("max_tokens"),
                max_completion_tokens=body.get("max_completion_tokens"),
                stream=bool(body.get("stream")),
                arrived=arrived,
                replied=time.time(),
            )
        )
        return status, json.dumps(reply).encode()


class _Streamed:
    """A streamed reply, and its call's record (written once the reply went out)."""

    def __init__(self, events: list[dict[str, Any]], record: dict[str, Any]) -> None:
        self.events = events
        self.record = record


def _chunks(reply: dict[str, Any], usage: bool) -> list[dict[str, Any]]:
    """A chat completion as ``chat.completion.chunk`` objects, one per word."""
    content = reply["choices"][0]["message"]["content"]
    base = {"id": reply["id"], "object": "chat.completion.chunk", "created": reply["created"]}
    base["model"] = reply["model"]
    pieces = re.findall(r"\s*\S+|\s+", content)
    events = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": piece}}]}
        for piece in pieces
    ]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if usage:
        events.append({**base, "choices": [], "usage": reply["usage"]})
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", action="append", help="address to bind (repeatable)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, default=200.0)
    parser.add_argument(
        "--jitter-ms", type=float, default=0.0, help="delay varies uniformly by +- this"
    )
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="between SSE chunks")
    parser.add_argument("--port-file", help="where to write the bound port, once listening")
    parser.add_argument("--limit-rpm", type=int, help="answer 429 past this many requests/min")
    parser.add_argument("--retry-after-s", type=float, default=1.0)
    args = parser.parse_args()
    server = FakeOpenAI(
        args.delay_ms / 1000,
        args.jitter_ms / 1000,
        args.chunk_delay_ms / 1000,
        limit_rpm=args.limit_rpm,
        retry_after_s=args.retry_after_s,
    )

    def started(port: int) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, server.stop)
        if args.port_file:
            # Written whole, then renamed: a poller never reads a partial number.
            tmp = args.port_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(str(port))
            os.replace(tmp, args.port_file)

    asyncio.run(server.serve(args.host or ["127.0.0.1"], args.port, started))


if __name__ == "__main__":
    main()
