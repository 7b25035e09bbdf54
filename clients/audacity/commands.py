"""The text of mod-script-pipe commands and replies: ``Command: Key=Value Key2="with spaces"`` (booleans 1/0, one
command per write, under ~1000 bytes) and the ``Format=JSON`` answers of GetInfo.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .errors import AudacityError

__all__ = ["Reply", "as_bool", "format_command", "format_number", "parse_json"]


@dataclass(frozen=True)
class Reply:
    command: str
    output: str  # the lines before the terminator, one leading newline removed
    status: str  # "OK", "Failed!", ...

    @property
    def ok(self) -> bool:
        return self.status == "OK"


def format_number(value: float) -> str:
    """Plain decimal text (no exponent: 2.3e-05 is not understood everywhere), enough digits for sample times."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    text = f"{float(value):.15f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def format_command(name: str, **params: Any) -> str:
    """``Name: Key=Value ...``; strings are double-quoted (they may not contain double quotes or newlines)."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
        raise ValueError(f"bad command name {name!r}")
    parts = [f"{name}:"]
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, bool | int | float):
            text = format_number(value)
        else:
            s = str(value)
            if '"' in s or "\n" in s or "\r" in s or "\0" in s:
                raise ValueError(f"{name} {key}: text may not contain double quotes or line breaks: {s!r}")
            text = f'"{s}"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def as_bool(value: Any) -> bool:
    """GetInfo booleans arrive as 1/0, true/false or quoted strings ("1", "true") depending on the version."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def parse_json(output: str, what: str = "GetInfo") -> Any:
    """The JSON of a ``Format=JSON`` reply (Audacity prints it after a newline)."""
    text = output.strip()
    if not text:
        return []
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AudacityError(f"{what}: Audacity answered something that is not JSON ({e}): {text[:200]!r}") from e
