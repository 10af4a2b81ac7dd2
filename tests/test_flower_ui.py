"""Flower's task list shows sessions (issue 21, item 3), checked in headless Chromium.

A real worker runs tasks for two sessions; Flower runs with ``workers/flowerconfig.py``
(basic auth, ``tasks_columns``). Chromium opens ``/tasks``, types one session id into the
search box, and the table must show exactly that session's tasks with their args and
results. The screenshot is kept in ``test-artifacts/`` (gitignored).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cdp import chromium_path, open_page
from support.polling import wait_until
from support.procs import ROOT, Proc, base_env, flower_conf_proc
from support.redis_server import free_port
from support.worker import DspexWorker

from dspex_tasks.app import EXPIRE_TASK, PREDICT_TASK

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(chromium_path() is None, reason="chromium not installed (make chromium)"),
]

AUTH = ("viewer", "ui-check-pw")
ARTIFACTS = ROOT / "test-artifacts"
QA = "question -> answer"

# Headers in page order and, per row (tr id = task uuid), the text of each cell.
TABLE_JS = """(() => {
  const heads = [...document.querySelectorAll('#tasks-table thead th')];
  const columns = heads.map(th => th.dataset.column).filter(Boolean);
  const rows = [...document.querySelectorAll('#tasks-table tbody tr[id]')].map(tr =>
    [tr.id, [...tr.querySelectorAll('td')].map(td => td.innerText)]);
  return JSON.stringify({columns, labels: heads.map(th => th.innerText), rows});
})()"""


@pytest.fixture(scope="module")
def flower(dspex: DspexWorker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    env = base_env(
        dspex.url,
        dspex.prefix,
        DSPEX_FLOWER_PORT=str(port),
        DSPEX_FLOWER_USER=AUTH[0],
        DSPEX_FLOWER_PASSWORD=AUTH[1],
    )
    proc: Proc = flower_conf_proc(env, tmp_path_factory.mktemp("flower"))
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_log("Visit me at", 30)

        # Flower's event receiver subscribes after it starts listening, and events sent
        # before that are gone: send probe tasks until Flower has seen one.
        def probe_seen() -> bool:
            probe = dspex.send(EXPIRE_TASK)
            probe.get(timeout=30)
            return _tasks_in_flower(url, {probe.id}, ("SUCCESS",), wait_s=2.0)

        wait_until(
            probe_seen, 30, interval=0, what="Flower receiving task events", diagnose=proc.log
        )
        yield url
    finally:
        proc.stop()


def _tasks_in_flower(
    flower: str, task_ids: set[str], states: tuple[str, ...], *, wait_s: float
) -> bool:
    """Whether Flower lists every task of ``task_ids`` in one of ``states`` within ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        tasks = requests.get(f"{flower}/api/tasks", auth=AUTH, timeout=10).json()
        if all(tasks.get(t, {}).get("state") in states for t in task_ids):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def test_searching_a_session_id_lists_its_tasks_with_args_and_result(
    dspex: DspexWorker,
    flower: str,
    tmp_path: Path,
) -> None:
    mine, other = dspex.session(), dspex.session()
    sent = [
        dspex.send(PREDICT_TASK, mine, QA, {"question": "first"}),
        dspex.send(PREDICT_TASK, mine, QA, {"question": "second"}),
        dspex.send(PREDICT_TASK, mine, QA, {"nope": "x"}),  # fails: invalid_inputs
        dspex.send(PREDICT_TASK, other, QA, {"question": "elsewhere"}),
    ]
    for result in sent:
        result.get(timeout=30, propagate=False)
    ids = [r.id for r in sent]
    # Flower learns about tasks from worker events: wait until it has all four.
    assert _tasks_in_flower(flower, set(ids), ("SUCCESS", "FAILURE"), wait_s=30)

    token = base64.b64encode(":".join(AUTH).encode()).decode()
    shot = ARTIFACTS / "flower-session-search.png"

    async def drive() -> dict[str, Any]:
        async with open_page(
            tmp_path / "chromium", headers={"Authorization": f"Basic {token}"}
        ) as page:
            await page.send("Page.navigate", url=f"{flower}/tasks")
            await page.wait_for(
                "window.jQuery && jQuery.fn.dataTable.isDataTable('#tasks-table')"
                " && document.querySelectorAll('#tasks-table tbody tr[id]').length >= 4",
                30,
            )
            # Type the session id into the search box, as a person would.
            await page.evaluate("document.querySelector('#tasks-table_filter input').focus()")
            await page.send("Input.insertText", text=mine)
            wanted = json.dumps(sorted(ids[:3]), separators=(",", ":"))  # as JS writes it
            await page.wait_for(
                "JSON.stringify([...document.querySelectorAll('#tasks-table tbody tr[id]')]"
                f".map(tr => tr.id).sort()) === {json.dumps(wanted)}",
                30,
            )
            table: dict[str, Any] = json.loads(await page.evaluate(TABLE_JS))
            await page.screenshot(shot)
            return table

    table = asyncio.run(drive())
    columns = table["columns"]
    assert {"args", "result", "exception"} <= set(columns), table
    rows = {task_id: dict(zip(columns, cells, strict=True)) for task_id, cells in table["rows"]}
    assert set(rows) == set(ids[:3])  # the other session's task is filtered out
    for task_id in ids[:3]:
        assert mine in rows[task_id]["args"], rows[task_id]
    for task_id in ids[:2]:  # a success shows its result JSON (outputs, model)
        assert rows[task_id]["state"] == "SUCCESS"
        assert "outputs" in rows[task_id]["result"] and mine in rows[task_id]["result"]
    failed = rows[ids[2]]
    assert failed["state"] == "FAILURE" and "invalid_inputs" in failed["exception"], failed
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
