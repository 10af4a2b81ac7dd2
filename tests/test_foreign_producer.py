"""A producer without dspex_tasks reads a failed task's error code (issue 21, item 1).

The producer runs in its own virtualenv holding only ``celery`` and ``redis`` (the same
versions as ours, from pip's usual index or cache). If that venv cannot be built (no
index reachable), it runs with ``python -I -S`` and a ``sys.path`` of site-packages only:
no ``.pth`` file is processed, so the editable ``dspex_tasks`` is not importable either.
Either way the script checks that ``dspex_tasks`` does not import before it sends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import redis
from support.worker import DspexWorker

from dspex_tasks.app import PREDICT_TASK
from dspex_tasks.client import TaskHandle
from dspex_tasks.errors import SessionNotFound

PRODUCER = textwrap.dedent(
    """
    import json, sys
    try:
        import dspex_tasks  # noqa: F401
    except ImportError:
        pass
    else:
        sys.exit("dspex_tasks is importable: this is not a foreign producer")
    from celery import Celery

    url, session_id = sys.argv[1], sys.argv[2]
    app = Celery("foreign", broker=url, backend=url)
    app.conf.update(task_serializer="json", result_serializer="json",
                    accept_content=["json"], result_accept_content=["json"])
    result = app.send_task("dspex.predict", queue="dspex",
                           args=[session_id, "question -> answer", {"question": "hi"}])
    exc = result.get(timeout=60, propagate=False)
    print(json.dumps({
        "task_id": result.id,
        "state": result.state,
        "class": type(exc).__module__ + "." + type(exc).__qualname__,
        "args": list(exc.args),
        "traceback": result.traceback,
    }))
    """
)


def _foreign_python(root: Path) -> list[str]:
    """A Python with celery and redis but no dspex_tasks: a venv, else ``-I -S``."""
    venv = root / "venv"
    python = venv / "bin" / "python"
    pins = [f"celery[redis]=={version('celery')}", f"redis=={version('redis')}"]
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins],
            check=True,
            timeout=600,
            capture_output=True,
        )
        return [str(python)]
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        # -S: no .pth file runs, so only what sits in site-packages itself (celery, kombu,
        # redis, vine, billiard...) imports; the editable dspex_tasks does not.
        site = sysconfig.get_paths()["purelib"]
        boot = (
            "import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]"
            f" + [{site!r}]; exec(open(sys.argv.pop(1)).read())"
        )
        return [sys.executable, "-I", "-S", "-c", boot]


@pytest.fixture(scope="module")
def foreign_python(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return _foreign_python(tmp_path_factory.mktemp("foreign"))


def test_a_producer_without_dspex_tasks_reads_the_code(
    dspex: DspexWorker,
    foreign_python: list[str],
    tmp_path: Path,
) -> None:
    script = tmp_path / "producer.py"
    script.write_text(PRODUCER)
    missing = f"nope-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run(
        [*foreign_python, str(script), dspex.url, missing],
        env=env,
        cwd=tmp_path,  # not the repository: nothing of ours on the path
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen: dict[str, Any] = json.loads(proc.stdout)
    assert seen["state"] == "FAILURE"
    # Celery builds a stand-in class (our module is not importable) with our args.
    assert seen["class"] == "celery.exceptions.SessionNotFound"
    message, wire = seen["args"]
    assert wire == {"code": "session_not_found", "details": {"session_id": missing}}
    assert missing in message
    assert seen["traceback"] is None  # no worker paths reach the producer

    # The raw result in the backend: the JSON every producer can read.
    raw = redis.Redis.from_url(dspex.url)
    try:
        stored = json.loads(raw.get(f"celery-task-meta-{seen['task_id']}") or b"null")
    finally:
        raw.close()
    assert stored["status"] == "FAILURE" and stored["traceback"] is None
    assert stored["result"] == {
        "exc_type": "SessionNotFound",
        "exc_module": "dspex_tasks.errors",
        "exc_message": [message, wire],
    }


def test_the_python_client_rebuilds_the_same_class_and_code(dspex: DspexWorker) -> None:
    missing = f"nope-{uuid.uuid4().hex[:8]}"
    handle = TaskHandle(dspex.send(PREDICT_TASK, missing, "question -> answer", {"question": "x"}))
    with pytest.raises(SessionNotFound) as info:
        handle.get_result(timeout=30)
    exc = info.value
    assert type(exc) is SessionNotFound and exc.code == "session_not_found"
    assert exc.details == {"session_id": missing}
    assert exc.args == (exc.message, {"code": "session_not_found", "details": exc.details})
