"""``python -m comm ...``: the ``comm`` command line (see `comm.cli`)."""

from __future__ import annotations

import sys

from comm.cli import main

if __name__ == "__main__":
    sys.exit(main())
