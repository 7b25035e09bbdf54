"""The `cloak` console script: signal handlers from the first instruction, then the command line.

Importing the command line imports torch (about a second). A SIGTERM or Ctrl-C in that second would otherwise end
the process by the signal's default action, while a `cloak serve` told to stop at any later moment drains and exits
0. So the handlers go in first and only note the signal; once the command line is imported, a noted signal ends the
process as the command would have: `serve` exits 0 (nothing started, nothing to drain), every other command 130
(cancelled; nothing was written).
"""

from __future__ import annotations

import signal
import sys

EXIT_CANCELLED = 130


def main() -> int:
    noted: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: noted.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        from .cli import main as cli_main
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if noted:
        return 0 if sys.argv[1:2] == ["serve"] else EXIT_CANCELLED
    return cli_main()
