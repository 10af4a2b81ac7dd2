"""A load harness, not a model: an OpenAI-compatible chat endpoint on loopback that
answers every ``POST /v1/chat/completions`` after a fixed delay.

    python benchmarks/_fake_openai.py --port 0 --delay-ms 200 --port-file /tmp/port

Plain asyncio (HTTP/1.1, keep-alive, Content-Length bodies), one process, so it costs the
benchmark as little CPU as possible and can hold hundreds of connections. The answer is
in DSPy's ChatAdapter format: every output field the system prompt lists gets the text
``echo <field>: <first line of the last user message>``, so a benchmark can check that
each task got the answer to *its* question. Not a benchmark itself (``make bench`` skips
files starting with ``_``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import time

import orjson

_FIELD = re.compile(r"^\d+\. `(\w+)`", re.MULTILINE)
_MARK = re.compile(r"\[\[ ## \w+ ## \]\]\n([^\n]*)")


def answer_text(body: dict[str, object]) -> str:
    messages = body.get("messages") or []
    assert isinstance(messages, list)
    system = next((m.get("content") for m in messages if m.get("role") == "system"), "") or ""
    users = [m.get("content") or "" for m in messages if m.get("role") == "user"]
    user = users[-1] if users else ""
    if not isinstance(system, str):
        system = "".join(p.get("text", "") for p in system)
    if not isinstance(user, str):
        user = "".join(p.get("text", "") for p in user)
    section = system.split("Your output fields are:", 1)[-1].split("All interactions", 1)[0]
    fields = _FIELD.findall(section) or ["answer"]
    first = _MARK.search(user)
    shown = first.group(1) if first else user[:80]
    parts = [f"[[ ## {name} ## ]]\necho {name}: {shown}\n" for name in fields]
    return "\n".join(parts) + "\n[[ ## completed ## ]]\n"


class Server:
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.served = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length) if length else b"{}"
                started = time.monotonic()
                payload = self.reply(orjson.loads(body))
                # The fixed latency counts from the request's arrival, like a provider's.
                await asyncio.sleep(max(0.0, self.delay_s - (time.monotonic() - started)))
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
                )
                await writer.drain()
                self.served += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def reply(self, body: dict[str, object]) -> bytes:
        text = answer_text(body)
        return orjson.dumps(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "bench"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
            }
        )


async def serve(port: int, delay_s: float, port_file: str | None) -> None:
    server = Server(delay_s)
    srv = await asyncio.start_server(server.handle, "127.0.0.1", port, backlog=1024)
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, default=200.0)
    parser.add_argument("--port-file")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.delay_ms / 1000, args.port_file))


if __name__ == "__main__":
    main()
