"""The `cloak` console script handles SIGTERM from its first instruction: a stop while torch is still importing
ends `cloak serve` with exit 0 and any other command with 130, never by the signal (issue: SIGTERM at any moment)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

SCRIPT = "import sys; from clients.entry import main; sys.exit(main())"


@pytest.mark.parametrize(("command", "code"), [(["serve", "--listen", "127.0.0.1:0"], 0), (["info"], 130)])
def test_sigterm_while_importing_ends_cleanly(command, code):
    p = subprocess.Popen([sys.executable, "-c", SCRIPT, *command], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(0.25)  # python is up; the command line (torch) is still importing (~1 s)
    p.send_signal(signal.SIGTERM)
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    assert p.returncode == code, err
