"""The ``dspex-tasks`` command line, kept apart from the library it drives.

The package holds the parser and dispatch (``main``), the state and process commands, task
enqueueing from a shell, output and exit codes, process command lines, the dev stack,
``doctor`` and the demo. It imports the client, settings, errors and store; nothing in the
core imports it. ``main`` is re-exported here for the ``dspex-tasks`` console script
(``dspex_tasks.cli:main``).
"""

from __future__ import annotations

from dspex_tasks.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
