"""Issue 16 against a real `cloak serve` subprocess on 127.0.0.1: signals at any moment, text logs, the upload
idle timeout flag, health under a stream flood, named tokens and the memory budget (process RSS)."""

from __future__ import annotations

import signal
import time

import pytest
from test_server_helpers import wait_for
from test_server_process import Served


def _listening(srv: Served, timeout: float = 60) -> str:
    got = wait_for(lambda: srv.first("listening") or (srv.proc.poll() is not None and {"dead": True}),
                   timeout=timeout)
    assert "dead" not in got, "\n".join(srv.lines)
    return f"127.0.0.1:{got['port']}"


def _stop(srv: Served) -> None:
    if srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.wait(10)


@pytest.mark.parametrize("delay", [0.0, 0.15, 0.4, 1.5])
def test_sigterm_at_any_moment_of_start_up_exits_0_without_abort(delay):
    """Embedded models load in the background after 'listening': SIGTERM before, during and after the load."""
    srv = Served(["--listen", "127.0.0.1:0", "--threads", "1"])
    try:
        _listening(srv)
        time.sleep(delay)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(60) == 0, "\n".join(srv.lines)
        srv.reader.join(5)
        assert not any("terminate called" in line for line in srv.lines), srv.lines
        assert srv.first("stopped") is not None
    finally:
        _stop(srv)
