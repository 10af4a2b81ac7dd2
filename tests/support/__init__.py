"""Shared test harness: fixtures, Redis databases, processes, polling, workers.

``tests/conftest.py`` registers the fixture modules with ``pytest_plugins``; test modules
import the helpers (``from support.polling import wait_until``). ``tests/`` is on
``sys.path`` (pytest's rootdir-relative "prepend" import mode), so this package is
importable as ``support``.

- :mod:`support.dbs`: the one table of Redis databases per test module.
- :mod:`support.fixtures`: ``redis_url``, ``redis_client``, ``key_prefix``,
  ``make_store``, ``raw``.
- :mod:`support.polling`: ``wait_until`` (never sleep to synchronise).
- :mod:`support.procs`: child processes (workers, beat, Flower), ``free_port``.
- :mod:`support.redis_server`: throwaway ``redis-server`` processes.
- :mod:`support.store`: helpers for the SessionStore tests.
- :mod:`support.worker`: in-process Celery workers, the recording fake LM, the
  ``dspex`` fixture, and closing apps without leaking sockets.
- :mod:`support.reliability`: the reliability report's recorder.
"""
