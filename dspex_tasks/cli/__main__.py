"""``python -m dspex_tasks.cli``: the ``dspex-tasks`` command without its console script."""

from __future__ import annotations

import sys

from dspex_tasks.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
