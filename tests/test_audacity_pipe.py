"""The mod-script-pipe client against a fake Audacity (FIFO server thread speaking the reply format)."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the fake Audacity uses POSIX FIFOs")

from audacity_fake_pipe import BARE_NEWLINE, QUIT, SILENT, FakeServer, parse_command  # noqa: E402

from clients.audacity.commands import as_bool, format_command, format_number, parse_json  # noqa: E402
from clients.audacity.diagnose import AUDACITY4_HINT, diagnose_missing_pipe  # noqa: E402
from clients.audacity.errors import (  # noqa: E402
    AudacityGone,
    CommandFailed,
    NoProject,
    PipeNotFound,
    PipeTimeout,
    UnsupportedAudacity,
)
from clients.audacity.pipe import PipeClient  # noqa: E402

TRACKS_JSON = ('[ \n  { "name":"take 1", "focused":1, "selected":"1", "kind":"wave", "start":0, "end":6.01007, '
               '"pan":0, "gain":1, "channels":2, "solo":0, "mute":0, "VZoomMin":-1, "VZoomMax":1 } ]')


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(handler, **kw):
        s = FakeServer(tmp_path, handler, **kw)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()
        assert not s.errors, s.errors


def client(server, **kw) -> PipeClient:
    kw.setdefault("timeout", 2.0)
    kw.setdefault("connect_timeout", 2.0)
    return PipeClient(server.to_path, server.from_path, **kw)


@pytest.mark.parametrize("open_from_early", [True, False])
@pytest.mark.parametrize("chunk", [0, 7])
def test_replies_are_parsed_up_to_the_terminator(serve, open_from_early, chunk):
    def handler(line):
        if line.startswith("GetInfo"):
            return "\n" + TRACKS_JSON
        return ""

    s = serve(handler, chunk=chunk, open_from_early=open_from_early)
    with client(s) as c:
        tracks = c.tracks()
        assert tracks[0]["name"] == "take 1" and as_bool(tracks[0]["selected"]) and tracks[0]["channels"] == 2
        assert c.command("Select: Start=1 End=3") == ""
        reply = c.raw("GetInfo: Type=Tracks Format=JSON")
        assert reply.ok and reply.status == "OK" and reply.output.startswith("[")
    assert s.commands == ["GetInfo: Type=Tracks Format=JSON", "Select: Start=1 End=3",
                          "GetInfo: Type=Tracks Format=JSON"]
    assert s.connections == 1  # one connection for many commands


def test_failed_reply_raises_with_audacitys_message(serve):
    s = serve(lambda line: ("Your batch command of Bogus was not recognized.", False))
    with client(s) as c:
        reply = c.raw("Bogus: X=1")
        assert not reply.ok and reply.status == "Failed!"
        with pytest.raises(CommandFailed, match="was not recognized"):
            c.command("Bogus: X=1")


def test_timeout_then_the_late_reply_is_dropped_before_the_next_command(serve):
    calls = []

    def handler(line):
        calls.append(line)
        if line.startswith("Slow"):
            time.sleep(0.8)
            return "slow answer"
        return "fast answer"

    s = serve(handler)
    with client(s, timeout=0.3) as c:
        t = time.monotonic()
        with pytest.raises(PipeTimeout, match="did not answer Slow within 0.3 s"):
            c.command("Slow:")
        assert time.monotonic() - t < 0.7
        time.sleep(0.7)
        assert c.command("Fast:", timeout=2) == "fast answer"  # not "slow answer"


def test_a_dialog_that_never_closes_keeps_timing_out(serve):
    s = serve(lambda line: SILENT if line.startswith("Message") else "ok")
    with client(s, timeout=0.2) as c:
        with pytest.raises(PipeTimeout, match="dialog"):
            c.command("Message: Text=hi")
        with pytest.raises(PipeTimeout, match="still busy"):
            c.command("GetInfo: Type=Tracks Format=JSON")


def test_no_project_window_bare_newline(serve):
    s = serve(lambda line: BARE_NEWLINE)
    with client(s, timeout=0.3) as c:
        with pytest.raises(NoProject, match="no project window"):
            c.tracks()


def test_audacity_quitting_is_reported(serve):
    s = serve(lambda line: QUIT if line.startswith("Exit") else "ok")
    with client(s) as c:
        assert c.command("A:") == "ok"
        with pytest.raises(AudacityGone, match="closed the scripting pipe"):
            c.command("Exit:", timeout=2)


def test_missing_pipe_says_how_to_enable_it(tmp_path, monkeypatch):
    monkeypatch.setattr("clients.audacity.setup.script_pipe_setting", lambda profiles=None: None)
    monkeypatch.setattr("clients.audacity.setup.detect_audacity_versions", lambda home=None: [("cfg", "3.2.4")])
    c = PipeClient(str(tmp_path / "to"), str(tmp_path / "from"), timeout=1, connect_timeout=0.2)
    with pytest.raises(PipeNotFound, match="cloak audacity install"):
        c.connect()


def test_stale_fifo_does_not_hang(tmp_path):
    to, frm = tmp_path / "to", tmp_path / "from"
    os.mkfifo(to)
    os.mkfifo(frm)
    c = PipeClient(str(to), str(frm), timeout=1, connect_timeout=0.3)
    t = time.monotonic()
    with pytest.raises(PipeNotFound, match="nothing reads it"):
        c.connect()
    assert time.monotonic() - t < 3


def test_diagnosis_messages():
    e = diagnose_missing_pipe("x", versions=[("dpkg", "4.0.0")], setting=None, running=[(1, "audacity")])
    assert isinstance(e, UnsupportedAudacity) and "4.0.0" in str(e) and AUDACITY4_HINT in str(e)
    e = diagnose_missing_pipe("x", versions=[("cfg", "3.2.4")], setting="4", running=[(1, "audacity")])
    assert "new (not yet enabled)" in str(e) and "Preferences > Modules" in str(e)
    e = diagnose_missing_pipe("x", versions=[], setting="1", running=[])
    if sys.platform.startswith("linux"):
        assert "not running" in str(e) and "install" not in str(e)
    e = diagnose_missing_pipe("x", versions=[("cfg", "3.2.4")], setting="1", running=[(1, "audacity")])
    assert "Is Audacity 3.x running with mod-script-pipe enabled" in str(e)


def test_threaded_transport_windows_framing(serve):
    """The Windows transport (reader thread, '\\r\\n\\0' line ends) works over FIFOs too."""
    s = serve(lambda line: "line one\r\nline two" if line.startswith("Get") else "")
    with client(s, windows=True) as c:
        assert c.command("GetThing:") == "line one\nline two"
        assert c.command("Select: Start=0 End=1") == ""
    assert s.commands == ["GetThing:", "Select: Start=0 End=1"]


def test_threaded_transport_timeout(serve):
    s = serve(lambda line: SILENT)
    with client(s, windows=True, timeout=0.2) as c:
        with pytest.raises(PipeTimeout):
            c.command("Hang:")


def test_concurrent_clients_are_not_needed_one_connection_is_reused(serve):
    s = serve(lambda line: "ok")
    c = client(s)
    results = []

    def work():
        for _ in range(5):
            results.append(c.command("Ping:"))

    t = threading.Thread(target=work)
    t.start()
    t.join(10)
    c.close()
    assert results == ["ok"] * 5 and s.connections == 1


def test_format_command_and_numbers():
    assert format_command("Select", Start=1.0, End=2.5, Track=0, Mode="Set") == \
        'Select: Start=1 End=2.5 Track=0 Mode="Set"'
    assert format_command("SetTrack", Track=1, Name="take 1 (cloaked)", Mute=False) == \
        'SetTrack: Track=1 Name="take 1 (cloaked)" Mute=0'
    assert format_number(2.2675736961451248e-05) == "0.000022675736961"  # no exponent
    assert format_number(44100 / 44100) == "1" and format_number(-0.0) == "0"
    with pytest.raises(ValueError):
        format_command("SetLabel", Text='say "hi"')
    with pytest.raises(ValueError):
        format_command("Bad Name")
    with pytest.raises(ValueError, match="at most"):
        PipeClient("/nonexistent/to", "/nonexistent/from").raw("X: " + "a" * 2000)
    with pytest.raises(ValueError, match="one command per line"):
        PipeClient("/nonexistent/to", "/nonexistent/from").raw("A:\nB:")


def test_parse_helpers():
    assert parse_json("\n[ 1, 2 ]") == [1, 2] and parse_json("") == []
    assert as_bool("1") and as_bool(1) and as_bool("true") and not as_bool("0") and not as_bool(0)
    name, params = parse_command('NyquistPrompt: Command="(a \\"b\\")\\n(c)" Version=4')
    assert name == "NyquistPrompt" and params == {"Command": '(a "b")\n(c)', "Version": "4"}


def test_pipe_lock_serialises_transactions(tmp_path):
    from clients.audacity.errors import PipeBusy
    from clients.audacity.lock import PipeLock

    a, b = PipeLock(str(tmp_path / "l")), PipeLock(str(tmp_path / "l"))
    a.acquire()
    waited = []
    with pytest.raises(PipeBusy, match="watch"):
        b.acquire(timeout=0.3, on_wait=lambda: waited.append(1))
    assert waited == [1]
    t = threading.Timer(0.2, a.release)
    t.start()
    b.acquire(timeout=5)
    b.release()
    t.join()
