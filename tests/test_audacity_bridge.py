"""The "Cloak selection" workflow, the watch mode and the CLI against a fake Audacity project behind a FIFO server."""

from __future__ import annotations

import argparse
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the fake Audacity uses POSIX FIFOs")

from audacity_fake_pipe import FakeServer  # noqa: E402
from audacity_fake_project import FakeProject, FTrack  # noqa: E402

from clients import cli  # noqa: E402
from clients.audacity.bridge import Bridge  # noqa: E402
from clients.audacity.cli import register_audacity, run_audacity  # noqa: E402
from clients.audacity.errors import BridgeError, SelectionError  # noqa: E402
from clients.audacity.macro import DONE, FAILED  # noqa: E402
from clients.audacity.pipe import PipeClient  # noqa: E402
from clients.audacity.watch import Watcher  # noqa: E402
from cloak import ConfigError  # noqa: E402
from cloak.audio import fit_to_budget  # noqa: E402

EPS = 0.002
RATE = 44100


def signal(seconds: float, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.3 * rng.standard_normal((int(seconds * RATE), channels))).astype(np.float32)


def nudge(audio: np.ndarray, rate: int) -> np.ndarray:
    """A fast stand-in for cloak.protect: a deterministic perturbation within (and partly beyond) epsilon."""
    ramp = np.linspace(-1.5, 1.5, audio.size, dtype=np.float32).reshape(audio.shape) * EPS
    return audio + ramp


class Env:
    def __init__(self, tmp_path):
        self.project = FakeProject(RATE)
        self.server = FakeServer(tmp_path, self.project)
        self.client = PipeClient(self.server.to_path, self.server.from_path, timeout=2, connect_timeout=2)
        self.tmp = tmp_path

    def bridge(self, process=nudge, **kw) -> Bridge:
        kw.setdefault("workdir", self.tmp / "work")
        return Bridge(self.client, process, epsilon=EPS, **kw)

    def select(self, t0, t1, *tracks):
        self.project.sel = (t0, t1)
        for i, t in enumerate(self.project.tracks):
            t.selected = i in tracks

    def snapshot(self):
        return [(t.name, t.kind, [(s, a.copy()) for s, a in t.clips], [list(lab) for lab in t.labels])
                for t in self.project.tracks]

    def assert_unchanged(self, snap):
        now = self.snapshot()
        assert [(n, k) for n, k, _, _ in now] == [(n, k) for n, k, _, _ in snap]
        for (_, _, c1, l1), (_, _, c0, l0) in zip(now, snap, strict=True):
            assert l1 == l0
            assert len(c1) == len(c0)
            for (s1, a1), (s0, a0) in zip(c1, c0, strict=True):
                assert s1 == s0 and np.array_equal(a1, a0)


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    e.client.close()
    e.server.stop()
    assert not e.server.errors, e.server.errors


def check_cloaked(orig: np.ndarray, new: np.ndarray) -> None:
    diff = np.abs(new.astype(np.float64) - orig.astype(np.float64))
    assert diff.max() > 0 and diff.max() <= EPS + 1e-9


# ------------------------------------------------------------------------------------------ one-shot


def test_new_track_is_placed_sample_exactly_in_one_undo_step(env):
    x = signal(6.0, 2)
    env.project.add_wave("take 1", x)
    env.select(1.0, 3.0, 0)
    history = len(env.project.history)
    outcome = env.bridge().cloak_selection()
    p = env.project
    assert [t.name for t in p.tracks] == ["take 1", "take 1 (cloaked)"]
    assert np.array_equal(p.tracks[0].dense(), x)  # original untouched
    (s, a), = p.tracks[1].clips
    assert s == RATE and len(a) == 2 * RATE
    check_cloaked(x[RATE:3 * RATE], a)
    assert len(p.history) == history + 1  # exactly one new undo state: the Paste
    assert outcome.tracks[0].start_sample == RATE and outcome.tracks[0].new_track == "take 1 (cloaked)"
    assert abs(outcome.tracks[0].linf - EPS) < 1e-6  # the 1.5*eps ramp was clamped
    assert p.prefs["/FileFormats/ExportFormat_SF1_Type/WAV_10000"] == "0"  # export preference restored
    assert p.sel == (1.0, 3.0) and p.tracks[0].selected and not p.tracks[1].selected  # selection restored
    p.do_Undo({})
    assert [t.name for t in p.tracks] == ["take 1"]


def test_replace_changes_only_the_range_in_one_undo_step(env):
    x = signal(5.0, 1)
    env.project.add_wave("voice", x)
    env.select(1.2345, 3.33333, 0)
    history = len(env.project.history)
    env.project.prefs["/FileFormats/ExportFormat_SF1_Type/WAV_10000"] = "4"  # 24-bit chosen by the user
    env.bridge(replace=True).cloak_selection()
    p = env.project
    y = p.tracks[0].dense()
    s0, s1 = int(np.floor(1.2345 * RATE + 0.5)), int(np.floor(3.33333 * RATE + 0.5))
    assert y.shape == x.shape and len(p.tracks) == 1
    assert np.array_equal(y[:s0], x[:s0]) and np.array_equal(y[s1:], x[s1:])
    check_cloaked(x[s0:s1], y[s0:s1])
    assert len(p.history) == history + 1
    assert p.prefs["/FileFormats/ExportFormat_SF1_Type/WAV_10000"] == "4"
    p.do_Undo({})
    assert np.array_equal(p.tracks[0].dense(), x)


def test_several_tracks_and_clamping_to_the_audio(env):
    a = signal(4.0, 1, seed=1)
    b = signal(2.0, 2, seed=2)
    env.project.add_wave("mono", a)
    env.project.add_wave("late stereo", b, start=RATE)  # 1.0 .. 3.0 s
    env.project.add_wave("music", signal(4.0, 2, seed=3))
    env.select(0.5, 3.5, 0, 1)  # music not selected
    out = env.bridge().cloak_selection()
    p = env.project
    assert [t.name for t in p.tracks] == ["mono", "late stereo", "music", "mono (cloaked)", "late stereo (cloaked)"]
    (s_mono, a_mono), = p.tracks[3].clips
    (s_st, a_st), = p.tracks[4].clips
    assert s_mono == RATE // 2 and len(a_mono) == 3 * RATE
    assert s_st == RATE and len(a_st) == 2 * RATE  # clamped to the track's audio
    check_cloaked(a[RATE // 2:7 * RATE // 2], a_mono)
    check_cloaked(b, a_st)
    assert [t.track for t in out.tracks] == ["mono", "late stereo"]


def test_replace_on_two_tracks_with_different_extents_is_one_paste_per_range(env):
    env.project.add_wave("a", signal(4.0, 1, seed=1))
    env.project.add_wave("b", signal(2.0, 1, seed=2), start=RATE)
    env.select(0.5, 3.5, 0, 1)
    history = len(env.project.history)
    env.bridge(replace=True).cloak_selection()
    assert len(env.project.history) == history + 2


@pytest.mark.parametrize("setup, message", [
    (lambda t: setattr(t, "mute", True), "muted"),
    (lambda t: setattr(t, "gain", 0.5), "gain of -6.02 dB"),
    (lambda t: setattr(t, "pan", -0.3), "panned"),
    (lambda t: setattr(t, "rate", 48000), "project rate is 44100 Hz"),
    (lambda t: setattr(t, "envelope", [[1.5, 0.5]]), "envelope"),
])
def test_tracks_whose_export_would_differ_are_refused(env, setup, message):
    env.project.add_wave("v", signal(4.0, 1))
    setup(env.project.tracks[0])
    env.project.push()  # a change made in Audacity's GUI is an undo state of its own
    env.select(1.0, 3.0, 0)
    snap = env.snapshot()
    with pytest.raises(SelectionError, match=message):
        env.bridge().cloak_selection()
    env.assert_unchanged(snap)


def test_replace_refuses_integer_tracks_but_new_track_mode_works(env):
    env.project.add_wave("v16", signal(3.0, 1), fmt="16")
    env.select(1.0, 2.0, 0)
    with pytest.raises(SelectionError, match="16-bit"):
        env.bridge(replace=True).cloak_selection()
    env.bridge().cloak_selection()
    assert env.project.tracks[-1].name == "v16 (cloaked)"


def test_empty_selection_and_nothing_selected_never_reach_a_dialog(env):
    env.project.add_wave("v", signal(3.0, 1))
    env.select(1.0, 1.0, 0)
    snap = env.snapshot()
    with pytest.raises(SelectionError, match="empty"):
        env.bridge().cloak_selection()
    assert not env.project.modal and "NyquistPrompt" not in env.project.calls
    env.assert_unchanged(snap)
    env.select(1.0, 2.0)
    with pytest.raises(SelectionError, match="no audio track is selected"):
        env.bridge().cloak_selection()
    env.select(4.0, 5.0, 0)  # beyond the audio
    with pytest.raises(SelectionError, match="nothing to cloak"):
        env.bridge().cloak_selection()
    env.assert_unchanged(snap)


def test_failures_leave_the_project_as_it_was(env):
    env.project.add_wave("a", signal(4.0, 1, seed=1))
    env.project.add_wave("b", signal(4.0, 2, seed=2))
    env.select(1.0, 3.0, 0, 1)
    snap = env.snapshot()

    def boom(audio, rate):
        raise RuntimeError("model exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        env.bridge(boom).cloak_selection()
    env.assert_unchanged(snap)
    assert env.project.prefs["/FileFormats/ExportFormat_SF1_Type/WAV_10000"] == "0"

    for command, nth in (("Import2", 2), ("SetClip", 1), ("Copy", 1), ("Paste", 1)):
        env.project.fail_on = {command: nth}
        env.project.calls.clear()
        with pytest.raises(BridgeError):
            env.bridge().cloak_selection()
        env.assert_unchanged(snap)
    env.project.fail_on = {}

    with pytest.raises(BridgeError, match="shape"):
        env.bridge(lambda a, r: a[:-1]).cloak_selection()
    with pytest.raises(BridgeError, match="NaN"):
        env.bridge(lambda a, r: a * np.nan).cloak_selection()
    env.assert_unchanged(snap)


def test_a_16_bit_export_is_refused_for_replace_and_warned_about_otherwise(env):
    env.project.add_wave("v", signal(3.0, 1))
    env.project.export_ignores_pref = True
    env.select(1.0, 2.0, 0)
    snap = env.snapshot()
    with pytest.raises(BridgeError, match="16 bit"):
        env.bridge(replace=True).cloak_selection()
    env.assert_unchanged(snap)
    out = env.bridge().cloak_selection()
    assert out.warnings and "not 32-bit float" in out.warnings[0]


def test_fit_to_budget_is_exact_in_float32():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 100_000).astype(np.float32)
    y = fit_to_budget(x + rng.uniform(-0.01, 0.01, x.shape).astype(np.float32), x, EPS)
    assert y.dtype == np.float32 and np.abs(y.astype(np.float64) - x.astype(np.float64)).max() <= EPS


# ------------------------------------------------------------------------------------------ watch


def test_macro_marks_are_cloaked_and_labelled(env):
    x = signal(6.0, 2)
    env.project.add_wave("take", x)
    env.project.add_wave("bed", signal(6.0, 2, seed=5))
    env.select(1.0, 3.0, 0)
    env.client.command("Macro_CloakSelection:")  # what Tools > Apply Macro > Cloak selection does
    env.select(4.0, 4.05, 0)
    env.client.command("Macro_CloakSelection:")  # too short: fails with a reason
    env.project.tracks.append(FTrack("hand", "label", labels=[[2.0, 2.5, "cloak:pending"]]))  # typed by hand
    reports = []
    w = Watcher(env.bridge(), report=reports.append)
    w.poll_once()
    texts = [lab[2] for _, lab in env.project.labels_flat()]
    assert texts[0] == DONE and texts[1].startswith(FAILED + ": nothing to cloak") and texts[2] == DONE
    names = [t.name for t in env.project.tracks if t.kind == "wave"]
    assert names == ["take", "bed", "take (cloaked)", "take (cloaked)", "bed (cloaked)"]
    first = env.project.tracks[5]
    (s, a), = first.clips
    assert s == RATE and len(a) == 2 * RATE
    check_cloaked(x[RATE:3 * RATE], a)
    assert [r.ok for r in reports] == [True, False, True]
    # nothing pending any more; a failure is not retried even if its text is undone back to pending
    env.project.tracks[3].labels[0][2] = "cloak:pending tracks=0 start=4.000000000 end=4.050000000"
    assert w.poll_once() == []
    assert env.project.tracks[3].labels[0][2].startswith(FAILED)


def test_watch_run_once_and_cli(env, capsys, monkeypatch):
    env.project.add_wave("take", signal(4.0, 1))
    env.select(1.0, 2.0, 0)
    env.client.command("Macro_CloakSelection:")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    register_audacity(sub)
    args = parser.parse_args(["audacity", "watch", "--once", "--json", "-q"])
    import clients.audacity.cli as acli

    monkeypatch.setattr(acli, "PipeClient",
                        lambda timeout: PipeClient(env.server.to_path, env.server.from_path, timeout=timeout))
    if True:
        assert run_audacity(args, processor=nudge, epsilon=EPS) == 0
        out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert out[0]["ok"] and out[0]["tracks"][0]["new_track"] == "take (cloaked)"
        env.select(2.5, 3.5, 0)
        args = parser.parse_args(["audacity", "cloak-selection", "--replace", "--json", "-q"])
        assert run_audacity(args, processor=nudge, epsilon=EPS) == 0
        rec = json.loads(capsys.readouterr().out)
        assert rec["mode"] == "replace" and rec["tracks"][0]["start_sample"] == int(2.5 * RATE)
        env.select(2.5, 2.5, 0)
        args = parser.parse_args(["audacity", "cloak-selection"])
        assert run_audacity(args, processor=nudge, epsilon=EPS) == 3
        assert "selection is empty" in capsys.readouterr().err
        env.project.modal = True  # a dialog is open
        args = parser.parse_args(["audacity", "cloak-selection", "--pipe-timeout", "0.3"])
        assert run_audacity(args, processor=nudge, epsilon=EPS) == 5
        assert "dialog" in capsys.readouterr().err


def test_server_mode_uses_the_remote_client(env, capsys, monkeypatch):
    import clients.audacity.cli as acli
    from clients import remote

    seen = {}

    class FakeRemote:
        def __init__(self, target, token=None, tls_ca=None):
            seen.update(target=target, token=token)

        def info(self):  # make_protector asks at once: an unreachable server fails before any job
            if seen["target"] == "down:1":
                raise remote.ServerUnavailable("UNAVAILABLE", "no server reachable")
            return SimpleNamespace(version="test", device="cpu", models=[])

        def protect(self, audio, rate, config, progress=None, cancel=None):
            seen.update(epsilon=config.epsilon, iterations=config.iterations)
            if seen["target"] == "flaky:1":
                raise remote.ServerUnavailable("UNAVAILABLE", "connection reset")
            if seen["target"] == "broken:1":
                raise remote.RemoteError("INTERNAL", "out of memory")
            return remote.RemoteResult(nudge(audio, rate), rate)

    monkeypatch.setattr(remote, "RemoteProtector", FakeRemote)
    monkeypatch.setattr(acli, "PipeClient",
                        lambda timeout: PipeClient(env.server.to_path, env.server.from_path, timeout=timeout))
    token = env.tmp / "token"
    token.write_text("s3cret\n")
    env.project.add_wave("take", signal(3.0, 1))
    env.select(1.0, 2.0, 0)
    parser = argparse.ArgumentParser()
    register_audacity(parser.add_subparsers(dest="command"))
    argv = ["audacity", "cloak-selection", "-q", "--server", "gpu:50051", "--token-file", str(token),
            "--epsilon", "0.001", "--iterations", "3", "--device", "cpu"]
    assert run_audacity(parser.parse_args(argv)) == 0
    assert seen == {"target": "gpu:50051", "token": "s3cret", "epsilon": 0.001, "iterations": 3}
    (s, a), = env.project.tracks[-1].clips
    assert np.abs(a - env.project.tracks[0].render(s, s + len(a))).max() <= 0.001 + 1e-9  # the server's epsilon
    for target, code, says in (("down:1", 5, "server down:1 unavailable: UNAVAILABLE: no server reachable"),
                               ("flaky:1", 5, "server flaky:1 unavailable: UNAVAILABLE: connection reset"),
                               ("broken:1", 1, "server broken:1: INTERNAL: out of memory")):
        argv[4] = target
        assert run_audacity(parser.parse_args(argv)) == code
        assert says in capsys.readouterr().err
    assert [t.name for t in env.project.tracks] == ["take", "take (cloaked)"]  # the project was left as it was
    (env.tmp / "empty").write_text("\n")
    for extra, needle in ((["--token-file", str(env.tmp / "nope")], "token file not found"),
                          (["--token-file", str(env.tmp / "empty")], "is empty")):
        with pytest.raises((cli.UsageError, ConfigError), match=needle):
            run_audacity(parser.parse_args([*argv, *extra]))
    argv = [a for a in argv if a not in ("--server", "gpu:50051", "broken:1")]
    with pytest.raises(cli.UsageError, match="--server"):  # a token without a server is a mistake, not local mode
        run_audacity(parser.parse_args(argv))


def test_local_mode_protects_through_make_protector(env, capsys, monkeypatch):
    """Without --server the bridge cloaks with clients.cli.make_protector's local protector (the models the settings
    name, the settings' config), the same way `cloak protect` does."""
    import clients.audacity.cli as acli
    import cloak
    from clients.cli import protector as cli_protector

    seen = {}

    def load(settings):
        seen["models"] = settings.models
        return SimpleNamespace(wavlm=None, info=[])

    def protect(audio, rate, models, config, progress=None, cancel=None):
        seen.update(epsilon=config.epsilon, cancel=cancel is not None)
        return cloak.ProtectResult(nudge(audio, rate), rate, {})

    monkeypatch.setattr(cli_protector, "load_models_for", load)
    monkeypatch.setattr(cloak, "protect", protect)
    monkeypatch.setattr(acli, "PipeClient",
                        lambda timeout: PipeClient(env.server.to_path, env.server.from_path, timeout=timeout))
    env.project.add_wave("take", signal(3.0, 1))
    env.select(1.0, 2.0, 0)
    parser = argparse.ArgumentParser()
    register_audacity(parser.add_subparsers(dest="command"))
    argv = ["audacity", "cloak-selection", "--models", str(env.tmp), "--epsilon", "0.001", "--device", "cpu"]
    assert run_audacity(parser.parse_args(argv)) == 0
    assert seen == {"models": str(env.tmp), "epsilon": 0.001, "cancel": True}
    assert f"cloak audacity: loading models ({env.tmp}) on cpu" in capsys.readouterr().err
    assert [t.name for t in env.project.tracks] == ["take", "take (cloaked)"]


def test_watch_keeps_polling_until_stopped(env, monkeypatch):
    import threading
    import time

    import clients.audacity.cli as acli

    monkeypatch.setattr(acli, "PipeClient",
                        lambda timeout: PipeClient(env.server.to_path, env.server.from_path, timeout=timeout))
    env.project.add_wave("take", signal(3.0, 1))
    parser = argparse.ArgumentParser()
    register_audacity(parser.add_subparsers(dest="command"))
    stop = threading.Event()
    rc = []
    t = threading.Thread(target=lambda: rc.append(run_audacity(
        parser.parse_args(["audacity", "watch", "--interval", "0.05", "-q"]), processor=nudge, epsilon=EPS,
        stop=stop)))
    t.start()
    time.sleep(0.3)  # the watcher is idle now; the user marks a range in the GUI
    with env.project.lock:
        env.select(1.0, 2.0, 0)
        env.project._mark()
        env.project.push()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(lab[2] == DONE for _, lab in env.project.labels_flat()):
        time.sleep(0.05)
    stop.set()
    t.join(10)
    assert rc == [0]
    assert [t.name for t in env.project.tracks if t.kind == "wave"] == ["take", "take (cloaked)"]


def test_wiring_into_the_main_cli(monkeypatch, capsys):
    from clients import cli

    assert "audacity" in [sc.name for sc in cli.SUBCOMMANDS]
    assert cli.main(["audacity", "--help"]) == 0
    assert "cloak audacity install" in capsys.readouterr().out
    assert cli.main(["audacity"]) == 2
