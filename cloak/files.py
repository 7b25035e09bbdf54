"""Writing files so that a reader never sees a torn one, and the JSON conventions of the project's outputs.

Every file the project writes for keeps (audio, reports, caches, checkpoints, configuration) goes through
`replace_atomically`: the data goes to a hidden partial file in the target's directory, is flushed to disk, then
moved over the target with `os.replace`; on any failure the partial file is removed and an existing target is
left untouched."""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def create_partial(parent: Path, base: str) -> Path:
    """Create (exclusively, permissions as for a normal new file) an empty hidden temp file in ``parent``."""
    for _ in range(100):
        tmp = parent / f".{base}.{secrets.token_hex(4)}.partial"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{parent / base}: could not create a temporary file in {parent}")


def fsync_dir(directory: Path) -> None:
    """Make a rename durable where the OS allows it (best effort)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(partial)` on a hidden partial file beside `target`, flush it, move it over `target`."""
    parent = target.parent
    tmp = create_partial(parent, target.name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(parent)
    return target


def write_text_atomic(path: Path, text: str, errors: str = "strict") -> Path:
    """Write UTF-8 text atomically, creating the directory when needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors=errors))


def jsonable(o: Any) -> Any:
    """`json.dumps(default=...)` for the values the project's reports hold (paths, numpy scalars and arrays,
    tuples and sets); anything else is a TypeError, as json's own."""
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple | set):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def finite_json(o: Any) -> Any:
    """NaN / inf -> None, recursively (strict JSON has neither)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: finite_json(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [finite_json(v) for v in o]
    return o


def write_json(path: Path, obj: Any) -> Path:
    """Strict, indented JSON, written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=1, default=jsonable, allow_nan=False))


def read_json(path: Path) -> Any | None:
    """The JSON in `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
