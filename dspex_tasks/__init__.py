"""dspex-tasks: run DSPy programs as Celery tasks over a Redis-backed SessionStore.

Where each behaviour lives (imports point down this list; the README has the same map)::

    errors.py settings.py types.py keys.py   pure core: the error tree, Settings, variable
    specs.py field_types.py lru.py           types, every Redis key name, program specs and
    compile_request.py                       signature types, the one small LRU, what a
                                             compile may ask for
    store/          SessionStore on Redis: sessions, variables (varschema, varwrites),
                    programs and their versions, datasets, events and history, runs,
                    run streams, expiry, the task ledger and claims, outcome counters;
                    connection.py (every Redis topology); scripts/ (every Lua script,
                    one module per concern)
    lm/             LM profiles and safe params; engines/ (echo, the offline local model);
                    abandon.py (stopping a run's LM call from outside its thread)
    programs.py registry.py tools.py metrics.py   specs -> DSPy modules; functions
                    a worker registers by name: ReAct tools and compile metrics
    runtime.py      one run's work on a worker: session -> LM -> module -> outputs
    streaming.py runcontext.py   token streaming of a run; the current run, for tools
    optimize.py compile_job.py      DSPy optimizers as checkpointed steps; a compile run
                    on a worker (lease, checkpoints, progress stream)
    app.py tasks.py resultbackend.py handoff.py   the Celery side: app, thin tasks,
                    result store, handing a session's turn to its next run
    client.py handles.py   the producer API (Celery and redis-py only, never DSPy);
    program_handles.py compile_client.py   a session's programs and compiles, and the
                    checks a compile passes before it is enqueued
    gateway/        the HTTP API and web console (dspex-tasks api), on the Client
    cli/            the dspex-tasks command: state, tasks, runs, watch, dev stack, doctor
    ../workers/     process entry points (worker, beat, Flower, exporter) and each
                    Celery/kombu/Flower workaround in a fix_*.py module of its own
"""

from __future__ import annotations

from dspex_tasks.client import Client, SessionHandle, TaskHandle
from dspex_tasks.errors import DspexError
from dspex_tasks.settings import Settings
from dspex_tasks.store import Session, SessionStore, Variable
from dspex_tasks.types import register_type

__all__ = [
    "Client",
    "DspexError",
    "Session",
    "SessionHandle",
    "SessionStore",
    "Settings",
    "TaskHandle",
    "Variable",
    "register_type",
]
__version__ = "0.1.0"
