"""The web console (``/``) in headless Chromium, against a real API server, worker and
the fake LM streaming word by word.

As a person would: type the token and a session id, open the session (its variables
load and its events stream goes live), see a write made by another client appear in the
variable panel, start a streamed run and see its tokens arrive while it is still running.
The screenshot is kept in ``test-artifacts/`` (gitignored).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cdp import Page, chromium_path, open_page
from support.api import ApiStack, api_stack
from support.procs import ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(chromium_path() is None, reason="chromium not installed (make chromium)"),
]

ARTIFACTS = ROOT / "test-artifacts"
WORDS = 80  # ~1.6 s of tokens at the fake LM's 20 ms per word

# Records, from the page's own DOM changes, when the answer first shows text and when
# the run is reported done (installed before the run starts; the console knows nothing
# of it).
OBSERVE_JS = """(() => {
  const seen = window.__seen = {firstToken: null, partial: null, done: null};
  new MutationObserver(() => {
    const box = document.querySelector('pre[data-field="answer"]');
    const done = document.querySelector('#run-status').textContent.endsWith(': done');
    const now = performance.now();
    if (box && box.textContent && seen.firstToken === null && !done) {
      seen.firstToken = now;
      seen.partial = box.textContent;
    }
    if (done && seen.done === null) seen.done = now;
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
  return true;
})()"""


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    with api_stack(redis_url, "api.console", tmp_path_factory.mktemp("console")) as s:
        yield s


async def type_into(page: Page, selector: str, text: str) -> None:
    await page.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
    await page.send("Input.insertText", text=text)


def row_js(name: str) -> str:
    row = f"#variables tr[data-name={json.dumps(name)}]"
    return (
        f"(() => {{ const r = document.querySelector('{row}');"
        " return r ? [r.querySelector('.value').textContent,"
        " r.querySelector('.version').textContent] : null; })()"
    )


def test_console_shows_live_variables_and_streams_tokens(stack: ApiStack, tmp_path: Path) -> None:
    sid = stack.session()
    stack.store.register_variable(sid, "style", "string", "plain")
    shot = ARTIFACTS / "api-console.png"

    async def drive() -> dict[str, Any]:
        async with open_page(tmp_path / "chromium") as page:
            await page.send("Page.navigate", url=f"{stack.url}/")
            await page.wait_for("document.readyState === 'complete' && !!window.CSS", 20)
            await type_into(page, "#token", stack.token)
            await page.evaluate(
                "document.querySelector('#token').dispatchEvent(new Event('change'))"
            )
            await type_into(page, "#session-id", sid)
            await page.evaluate("document.querySelector('#session-form').requestSubmit()")
            await page.wait_for(
                "document.querySelector('#events-state').textContent === 'live'", 20
            )
            assert await page.wait_for(row_js("style"), 20) == ["plain", "1"]

            # Another client writes: the panel follows from the events stream.
            with stack.client() as other:
                reply = other.put(f"/v1/sessions/{sid}/variables/style", json={"value": "terse"})
                assert reply.status_code == 200, reply.text
                other.post(
                    f"/v1/sessions/{sid}/variables",
                    json={"name": "temperature", "type": "float", "value": 0.3},
                )
            await page.wait_for(f'JSON.stringify({row_js("style")}) === \'["terse","2"]\'', 20)
            assert await page.wait_for(row_js("temperature"), 20) == ["0.3", "1"]

            # A streamed run: tokens show up before the run is done.
            assert await page.evaluate(OBSERVE_JS)
            await page.evaluate("document.querySelector('#run-inputs').value = ''")
            await type_into(
                page, "#run-inputs", json.dumps({"question": f"WORDS[{WORDS}] MARK[ui] why?"})
            )
            await page.evaluate("document.querySelector('#run-form').requestSubmit()")
            await page.wait_for("window.__seen.done !== null", 60)
            seen: dict[str, Any] = await page.evaluate("window.__seen")
            seen["final"] = await page.evaluate(
                "document.querySelector('pre[data-field=\"answer\"]').textContent"
            )
            seen["run_id"] = await page.evaluate(
                "document.querySelector('#run-status').dataset.runId"
            )
            await page.screenshot(shot)
            return seen

    seen = asyncio.run(drive())
    with stack.client() as http:
        run = http.get(f"/v1/runs/{seen['run_id']}").json()
    answer = run["result"]["outputs"]["answer"]
    assert seen["final"] == answer and len(answer.split()) == WORDS
    assert seen["firstToken"] is not None and seen["firstToken"] < seen["done"]
    partial = seen["partial"]
    assert answer.startswith(partial) and len(partial) < len(answer)  # mid-stream text
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
