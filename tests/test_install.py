"""What a new user meets first: the README's install and run lines, the shipped sample, where the GE2E weights come
from, and tests that run from any directory (no absolute paths to the project's shared data)."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE

README = REPO / "README.md"


def _install_block() -> str:
    text = README.read_text()
    section = text.split("## Install and run", 1)[1].split("\n## ", 1)[0]
    return section


def test_readme_installs_the_cpu_torch_wheel_and_names_the_cuda_one() -> None:
    block = _install_block()
    cpu = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    assert cpu in block
    assert re.search(r"pip install torch==2\.13\.0 --index-url https://download\.pytorch\.org/whl/cu\d+", block)
    pinned = re.search(r'"torch>=([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    assert pinned and tuple(map(int, pinned.group(1).split("."))) <= (2, 13)  # the README's torch satisfies it


def test_readme_main_command_protects_the_shipped_sample() -> None:
    block = _install_block()
    assert "cloak protect --sample" in block and "python -m pytest -q" in block
    assert SAMPLE.is_file() and SAMPLE.stat().st_size <= 1_000_000
    sources = (SAMPLE.parent / "SOURCES.md").read_text()
    assert SAMPLE.name in sources and "CC BY 4.0" in sources
    pyproject = (REPO / "pyproject.toml").read_text()
    data = re.search(r"\[tool\.setuptools\.package-data\]\s*cloak = \[([^\]]*)\]", pyproject)
    assert data and '"data/**/*"' in data.group(1)  # the sample is package data, so installs carry it


def test_tests_use_no_absolute_paths_to_the_shared_data() -> None:
    offenders = [f"{p.name}:{i}" for p in sorted((REPO / "tests").glob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"['\"]/work/", line)]
    assert offenders == []


def test_ge2e_weights_are_found_without_importing_resemblyzer() -> None:
    code = ("import sys; from cloak.models.ge2e import GE2E, resemblyzer_weights; m = GE2E.load(); "
            "bad = [n for n in ('resemblyzer', 'webrtcvad', 'librosa') if n in sys.modules]; "
            "print(resemblyzer_weights(), m.checksum, bad)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    path, checksum, bad = r.stdout.split(" ", 2)
    assert path.endswith("resemblyzer/pretrained.pt") and len(checksum) == 64
    assert bad.strip() == "[]"


def test_ge2e_weights_found_through_the_import_spec_when_metadata_lists_no_files(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from cloak.models import ge2e

    expected = ge2e.resemblyzer_weights()

    def no_files(name: str) -> metadata.Distribution:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(ge2e.metadata, "distribution", no_files)
    assert ge2e.resemblyzer_weights() == expected
    assert "resemblyzer" not in sys.modules

    monkeypatch.setattr(ge2e.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install resemblyzer"):
        ge2e.resemblyzer_weights()


def test_cli_runs_from_any_directory(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "clients.cli", "sample", "--path"], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == SAMPLE.resolve()


def test_missing_shared_data_skips_locally_and_fails_under_ci(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text("from conftest import corpus_clip\n\n\ndef test_needs_corpus():\n    corpus_clip('vctk_p225')\n")
    base = {"PATH": "/usr/bin:/bin", "VOICECLOAK_SHARED": str(tmp_path / "nowhere"), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--rootdir", str(REPO),
           "--confcutdir", str(REPO / "tests"), "-o", "addopts=", str(probe)]
    local = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO / "tests", env=base)
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout + local.stderr
    assert str(tmp_path / "nowhere" / "corpus" / "vctk_p225") in local.stdout
    ci = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO / "tests", env={**base, "CI": "1"})
    assert ci.returncode == 1 and "1 failed" in ci.stdout and "CI is set" in ci.stdout, ci.stdout + ci.stderr
