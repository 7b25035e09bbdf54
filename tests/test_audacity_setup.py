"""`cloak audacity install`: config locations, enabling mod-script-pipe with a backup, the macro; mark parsing."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from clients.audacity import setup
from clients.audacity.cli import register_audacity, run_audacity
from clients.audacity.macro import (
    MACRO_FILENAME,
    MACRO_TEXT,
    MARK_NYQUIST,
    PROBE_NYQUIST,
    failed_text,
    nyquist_command,
    parse_mark,
)

EXISTING = """PrefsVersion=1.1.1r1
[Module]
mod-script-pipe=4
mod-other=1
[ModulePath]
mod-script-pipe=/old/path.so
[Directories]
TempDir=/somewhere

[Version]
Major=3
Minor=2
Micro=4
"""


@pytest.fixture
def module(tmp_path) -> Path:
    m = tmp_path / "modules" / "mod-script-pipe.so"
    m.parent.mkdir()
    m.write_bytes(b"\x7fELF")
    os.utime(m, (1675281411, 1675281411))
    return m


def test_fresh_linux_home_gets_the_legacy_profile(tmp_path, module):
    home = tmp_path / "home"
    report = setup.install(home=home, platform="linux", module=module, environ={})
    cfg = home / ".audacity-data" / "audacity.cfg"
    assert report.configs == [cfg] and report.backups == [] and report.changed
    assert setup.read_setting(cfg, "Module", "mod-script-pipe") == "1"
    assert setup.read_setting(cfg, "ModulePath", "mod-script-pipe") == str(module)
    assert setup.read_setting(cfg, "ModuleDateTime", "mod-script-pipe") == setup.module_file_time(module)
    assert (home / ".audacity-data" / "Macros" / MACRO_FILENAME).read_text() == MACRO_TEXT


def test_existing_config_is_backed_up_and_only_our_keys_change(tmp_path, module):
    home = tmp_path / "home"
    cfg = home / ".audacity-data" / "audacity.cfg"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(EXISTING)
    report = setup.install(home=home, platform="linux", module=module, environ={})
    assert len(report.backups) == 1 and report.backups[0].read_text() == EXISTING
    text = cfg.read_text()
    assert setup.read_setting(cfg, "Module", "mod-script-pipe") == "1"
    assert setup.read_setting(cfg, "Module", "mod-other") == "1"
    assert setup.read_setting(cfg, "Directories", "TempDir") == "/somewhere"
    assert setup.read_setting(cfg, "ModulePath", "mod-script-pipe") == str(module)
    assert text.startswith("PrefsVersion=1.1.1r1\n[Module]\n")
    again = setup.install(home=home, platform="linux", module=module, environ={})
    assert not again.changed and again.backups == []  # idempotent: no new backup


def test_xdg_profile_when_only_it_exists(tmp_path, module):
    home = tmp_path / "home"
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xc"), "XDG_DATA_HOME": str(tmp_path / "xd")}
    xcfg = tmp_path / "xc" / "audacity" / "audacity.cfg"
    xcfg.parent.mkdir(parents=True)
    xcfg.write_text("[Version]\nMajor=3\n")
    report = setup.install(home=home, platform="linux", module=module, environ=env)
    assert report.configs == [xcfg]
    assert report.macros == [tmp_path / "xd" / "audacity" / "Macros" / MACRO_FILENAME]


@pytest.mark.parametrize("platform, cfg, macros", [
    ("darwin", "Library/Application Support/audacity/audacity.cfg", "Library/Application Support/audacity/Macros"),
    ("win32", "AppData/Roaming/audacity/audacity.cfg", "AppData/Roaming/audacity/Macros"),
])
def test_macos_and_windows_locations(tmp_path, platform, cfg, macros):
    home = tmp_path / "home"
    report = setup.install(home=home, platform=platform, module=None, environ={})
    assert report.configs == [home / cfg] and report.macros == [home / macros / MACRO_FILENAME]
    assert setup.read_setting(home / cfg, "Module", "mod-script-pipe") == "1"
    assert any("Preferences > Modules" in n for n in report.notes)  # module file not found: say what to check


def test_set_settings_adds_sections_and_keys():
    out = setup.set_settings("a=1\n[X]\nk=v\n\n[Y]\n", {("X", "k"): "w", ("X", "new"): "n", ("Z", "z"): "1"})
    assert out == "a=1\n[X]\nk=w\nnew=n\n\n[Y]\n[Z]\nz=1\n"


def test_shipped_macro_file_matches_what_install_writes():
    shipped = Path(setup.__file__).parent / "macros" / MACRO_FILENAME
    assert shipped.read_text() == MACRO_TEXT
    assert MACRO_TEXT.count("\n") == 1 and len(MACRO_TEXT) < 1000  # one macro line, pipe-sized
    assert len(nyquist_command(PROBE_NYQUIST)) < 1000 and len(nyquist_command(MARK_NYQUIST)) < 1000


def test_parse_mark_and_failed_text():
    m = parse_mark("cloak:pending tracks=0,2 start=1.234568000 end=3.500000000")
    assert m is not None and m.tracks == (0, 2) and m.start == 1.234568 and m.end == 3.5
    m = parse_mark("cloak:pending")
    assert m is not None and m.tracks is None and m.start is None
    assert parse_mark("cloak:done") is None and parse_mark("verse 2") is None
    assert failed_text('bad "quote"\nline') == "cloak:failed: bad 'quote' line"
    assert len(failed_text("x" * 500)) < 200


def test_cli_install_dry_run_and_json(tmp_path, monkeypatch, capsys, module):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setattr(setup, "find_module_file", lambda platform=None: module)
    monkeypatch.setattr("clients.audacity.cli.running_audacity", lambda: [])
    parser = argparse.ArgumentParser()
    register_audacity(parser.add_subparsers(dest="command"))
    if os.name != "nt":
        assert run_audacity(parser.parse_args(["audacity", "install", "--dry-run"])) == 0
        assert "would enable mod-script-pipe" in capsys.readouterr().out
        assert run_audacity(parser.parse_args(["audacity", "install", "--json"])) == 0
        rec = json.loads(capsys.readouterr().out)
        assert rec["ok"] and rec["changed"] and rec["module"] == str(module)
    monkeypatch.setattr("clients.audacity.cli.running_audacity", lambda: [(123, "audacity")])
    assert run_audacity(parser.parse_args(["audacity", "install"])) == 2
    assert "quit it first" in capsys.readouterr().err


def test_help_texts(capsys):
    parser = argparse.ArgumentParser(prog="cloak")
    register_audacity(parser.add_subparsers(dest="command"))
    for argv in (["audacity", "--help"], ["audacity", "watch", "--help"], ["audacity", "cloak-selection", "--help"],
                 ["audacity", "install", "--help"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Tools > Apply Macro > Cloak selection" in out and "--replace" in out and "exit codes" in out
    args = parser.parse_args(["audacity"])
    assert run_audacity(args) == 2
