"""Which Redis database of the shared test server belongs to whom.

Test modules that keep a broker, result backend or store in a database of their own
(so that ``redis_client``'s FLUSHDB of db 0, or another module's FLUSHDB, never pulls
a queue or a session out from under them) take it from this one table. The db number
is the owner's position in :data:`OWNERS`, so two owners cannot get the same database;
``tests/test_harness.py`` also checks the table.
"""

from __future__ import annotations

from types import MappingProxyType
from urllib.parse import urlsplit, urlunsplit

__all__ = ["DBS", "OWNERS", "db_url", "with_db"]

#: Redis has 16 databases by default (``databases 16``).
MAX_DBS = 16

#: One entry per owner; the index is the database. Append new owners at the end.
OWNERS: tuple[str, ...] = (
    "shared",  # 0: redis_client (FLUSHDB per test) and prefix-isolated store tests
    "client",  # 1: test_client's worker
    "client.idle",  # 2: test_client's broker that no worker consumes
    "worker",  # 3: support.worker's `dspex` fixture (test_tasks, test_bad_input)
    "local_lm",  # 4: test_local_lm's worker
    "cli",  # 5: test_cli's worker and commands
    "cli.lonely",  # 6: test_cli's doctor without workers
    "dev",  # 7: test_dev's `dev --demo` on a given Redis
    "metrics",  # 8: test_metrics' queues and exporter
    "time_limits",  # 9: test_time_limits' worker against the hung fake LM
    "compile",  # 10: test_compile's workers and client
    "api",  # 11: test_api's API server and worker
    "api.console",  # 12: test_api_console's API server and worker
    "records",  # 13: test_task_records_split's worker (broker, store)
    "records.backend",  # 14: ... and its result backend, on a database of its own
)

if len(set(OWNERS)) != len(OWNERS) or len(OWNERS) > MAX_DBS:  # pragma: no cover
    raise RuntimeError(f"support.dbs: duplicate owner or more than {MAX_DBS} dbs: {OWNERS}")

#: owner -> database number (read-only).
DBS = MappingProxyType({owner: db for db, owner in enumerate(OWNERS)})


def with_db(url: str, db: int) -> str:
    """``url`` pointing at Redis database ``db`` (whatever db it named before)."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


def db_url(url: str, owner: str) -> str:
    """``url`` pointing at the database allocated to ``owner`` (KeyError if none)."""
    return with_db(url, DBS[owner])
