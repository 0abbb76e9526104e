"""zchat's benchmark: ``python3 dev.py bench`` runs this file; ``--help`` says the rest (cli.py)."""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script, this file's folder is sys.path[0], where "bench" would name this very
    # file; the repository root instead makes "bench" the folder of modules (a namespace package).
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    from bench.cli import main

    sys.exit(main())
