"""`python -m bench` (from the repository root): the CPU speed benchmark, bench/speed.py; same flags."""

from __future__ import annotations

from bench.speed import main

if __name__ == "__main__":
    main()
