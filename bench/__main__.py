"""`python -m bench` (from the repository root): the CPU speed benchmark, bench/speed.py; same flags."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import main  # noqa: E402

if __name__ == "__main__":
    main()
