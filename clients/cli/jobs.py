"""The jobs of a `cloak protect` run: which audio files the inputs name, where each protected copy goes and in which
container and sample format, and the problems that stop the run before anything is computed."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cloak.audio import output_problem, output_subtype

from .common import UsageError, print_error

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
_EXT_FORMAT = {".wav": "WAV", ".flac": "FLAC", ".aiff": "AIFF", ".aif": "AIFF", ".ogg": "OGG", ".mp3": "MP3"}
_FORMAT_EXT = {"WAV": ".wav", "FLAC": ".flac", "AIFF": ".aiff"}
LOSSLESS_FORMATS = frozenset({"WAV", "FLAC", "AIFF"})
LOSSY_FORMATS = frozenset({"OGG", "MP3", "MPEG"})
CLOAKED_TAG = ".cloaked"


@dataclass
class Job:
    input: Path
    output: Path | None = None
    out_format: str = "WAV"
    out_subtype: str | None = "FLOAT"
    in_format: str | None = None
    in_subtype: str | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    create_dirs: bool = False  # -o DIR: missing directories are created
    passthrough: str | None = None  # why the input is written unchanged (too short, silent, --iterations 0)
    reported: bool = False  # its error was already reported (before the models loaded)


def _is_own_output(p: Path) -> bool:
    return p.stem.endswith(CLOAKED_TAG)


def _audio_files_in(directory: Path, recursive: bool) -> list[Path]:
    it = directory.rglob("*") if recursive else directory.iterdir()
    out = []
    for p in it:
        rel = p.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file() and not _is_own_output(p):
            out.append(p)
    return sorted(out)


def expand_inputs(items: Sequence[str], recursive: bool) -> tuple[list[tuple[Path, Path | None]], list[Job]]:
    """(file, base directory it was found under or None) for every input, and failed Jobs for missing ones."""
    found: list[tuple[Path, Path | None]] = []
    failed: list[Job] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_file():
            found.append((path, None))
        elif path.is_dir():
            files = _audio_files_in(path, recursive)
            if not files:
                hint = "" if recursive else " (use -r to include sub-directories)"
                print_error(f"warning: {item}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) found{hint}")
            found.extend((f, path) for f in files)
        elif any(c in item for c in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=recursive))
            hits = 0
            for m in map(Path, matches):
                if m.is_dir():
                    files = _audio_files_in(m, recursive)
                    found.extend((f, m) for f in files)
                    hits += len(files)
                elif m.is_file() and m.suffix.lower() in AUDIO_EXTENSIONS and not _is_own_output(m):
                    found.append((m, None))
                    hits += 1
            if not hits:
                failed.append(Job(path, error=f"{item}: no audio files match this pattern"))
        else:
            failed.append(Job(path, error=f"{item}: no such file or directory"))
    seen: set[Path] = set()
    unique = []
    for f, base in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((f, base))
    return unique, failed


def choose_format(in_path: Path, in_format: str | None, in_subtype: str | None, explicit: Path | None,
                  epsilon: float = 0.002) -> tuple[str, str | None, str, list[str]]:
    """(container, subtype, extension, warnings) of the protected copy of one input.

    Lossless containers (WAV, FLAC, AIFF) are kept with the input's own subtype: 16/24/32-bit PCM stays that
    bit depth, float stays float (see cloak.audio.output_subtype for the few exceptions, each with a warning).
    Lossy inputs (OGG, MP3, or a lossy codec inside WAV/AIFF) are written losslessly as what their decoder
    gives. An explicit -o decides the container; a lossy one (.ogg, .mp3) is honoured with a warning."""
    warnings: list[str] = []
    if explicit is not None:
        ext = explicit.suffix
        fmt = _EXT_FORMAT[ext.lower()]
        if fmt in LOSSY_FORMATS:
            warnings.append(f"{explicit}: lossy {fmt} encoding weakens the protection; "
                            "a lossless output (.wav, .flac) is strongly recommended")
            return fmt, None, ext, warnings
    elif in_format in LOSSLESS_FORMATS:
        fmt = in_format
        ext = in_path.suffix if _EXT_FORMAT.get(in_path.suffix.lower()) == in_format else _FORMAT_EXT[in_format]
    else:
        fmt, ext = "WAV", ".wav"
        if in_format in LOSSY_FORMATS:
            warnings.append(f"{in_path}: input is lossy ({in_format}/{in_subtype}); the protected copy is written as "
                            "WAV, because re-encoding it to a lossy format would weaken the protection")
        else:
            warnings.append(f"{in_path}: {in_format} container is written as WAV")
    subtype, note = output_subtype(fmt, in_subtype, epsilon)
    if note is not None and in_format not in LOSSY_FORMATS:
        warnings.append(f"{in_path}: {note}")
    return fmt, subtype, ext, warnings


def plan_jobs(files: list[tuple[Path, Path | None]], output: str | None, epsilon: float = 0.002) -> list[Job]:
    """Decide every output path and format (reads file headers only). UsageError for an impossible -o."""
    import soundfile as sf

    mode, target = "beside", None
    if output is not None:
        target = Path(output).expanduser()
        if target.is_dir() or output.endswith(("/", os.sep)):
            mode = "dir"
        elif target.exists() or target.suffix.lower() in AUDIO_EXTENSIONS:
            if target.suffix.lower() not in AUDIO_EXTENSIONS:
                raise UsageError(f"-o {output}: exists and is not an audio file name or a directory")
            if len(files) > 1:
                raise UsageError(f"-o {output}: {len(files)} inputs need an output directory, not a file name")
            mode = "file"
        elif target.suffix == "":
            mode = "dir"
        else:
            raise UsageError(f"-o {output}: unknown audio extension {target.suffix!r} "
                             f"(use one of {' '.join(AUDIO_EXTENSIONS)}, or a directory)")
    jobs = []
    for path, base in files:
        job = Job(path)
        try:
            info = sf.info(str(path))
            job.in_format, job.in_subtype = str(info.format), str(info.subtype)
        except Exception as e:  # noqa: BLE001 - soundfile raises several types for non-audio files
            job.error = f"{path}: not readable as audio: {e}"
            jobs.append(job)
            continue
        explicit = target if mode == "file" else None
        job.out_format, job.out_subtype, ext, job.warnings = choose_format(path, job.in_format, job.in_subtype,
                                                                           explicit, epsilon)
        job.create_dirs = mode == "dir"
        name = f"{path.stem}{CLOAKED_TAG}{ext}"
        if mode == "file":
            assert target is not None
            job.output = target
        elif mode == "dir":
            assert target is not None
            rel = path.parent.relative_to(base) if base is not None else Path()
            job.output = target / rel / name
        else:
            job.output = path.with_name(name)
        jobs.append(job)
    return jobs


def preflight(jobs: list[Job], force: bool) -> list[str]:
    """Problems that stop the whole run before anything is computed (exit 2)."""
    problems = []
    inputs = {j.input.resolve() for j in jobs}
    claimed: dict[Path, Path] = {}
    for j in jobs:
        if j.output is None:
            continue
        out = j.output.resolve()
        if out in inputs:
            problems.append(f"{j.output}: is an input; the original recording is never overwritten")
        elif out in claimed:
            problems.append(f"{claimed[out]} and {j.input} would both be written to {j.output}")
        elif j.output.is_dir():
            problems.append(f"{j.output}: is a directory")
        elif j.output.exists() and not force:
            problems.append(f"{j.output}: already exists (use --force to replace it)")
        elif (why := output_problem(j.output, create_dirs=j.create_dirs)) is not None:
            problems.append(f"cannot write {j.output}: {why}")
        claimed[out] = j.input
    return problems
