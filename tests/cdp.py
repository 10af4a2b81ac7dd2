"""Headless Chromium driven over its DevTools protocol (CDP), for UI checks.

Just what the Flower UI test needs: open a page, run JavaScript, type text, take a
screenshot. The websocket is aiohttp's (already a dependency of the test stack), so no
browser-automation package is installed. Chromium is Debian's ``chromium`` package
(``make chromium``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["Page", "chromium_path", "open_page"]

_LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One browser tab: ``send`` a CDP command, ``evaluate`` JavaScript."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self._ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:  # events arrive between answers; only the answer to this call counts
            message = json.loads(await self._ws.receive_str())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of ``expression`` (an exception in the page raises here)."""
        reply = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression!r}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float) -> Any:
        """Poll ``expression`` until it is truthy; returns that value."""
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(RuntimeError):
                value = await self.evaluate(expression)
                if value:
                    return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} still false after {timeout_s:g} s")
            await asyncio.sleep(0.1)

    async def screenshot(self, path: Path) -> Path:
        reply = await self.send("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(reply["data"]))
        return path


@contextlib.asynccontextmanager
async def open_page(
    profile_dir: Path, *, headers: dict[str, str] | None = None, timeout_s: float = 30.0
) -> AsyncIterator[Page]:
    """Start headless Chromium (own profile dir) and yield its first tab."""
    exe = chromium_path()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (make chromium)")
    argv = [
        exe,
        "--headless",
        "--no-sandbox",  # CI containers run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--window-size=1600,900",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile_dir}",
        "about:blank",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        browser_ws = await asyncio.wait_for(_listening(proc), timeout_s)
        http = browser_ws.replace("ws://", "http://").split("/devtools/")[0]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{http}/json/list") as reply:
                targets = await reply.json()
            page_ws = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with session.ws_connect(page_ws, max_msg_size=0) as ws:
                page = Page(ws)
                await page.send("Page.enable")
                await page.send("Runtime.enable")
                if headers:
                    await page.send("Network.enable")
                    await page.send("Network.setExtraHTTPHeaders", headers=headers)
                yield page
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


async def _listening(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stderr is not None
    loop = asyncio.get_running_loop()
    seen = b""
    while True:
        line = await loop.run_in_executor(None, proc.stderr.readline)
        if not line:
            raise RuntimeError(f"chromium exited ({proc.poll()}): {seen.decode(errors='replace')}")
        seen += line
        found = _LISTENING.search(line)
        if found:
            return found.group(1).decode()
