"""Why there is no scripting pipe, in words a user can act on: Audacity 4.x? not running? module not enabled?"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

from .errors import PipeNotFound, UnsupportedAudacity

__all__ = ["AUDACITY4_HINT", "ENABLE_HINT", "diagnose_missing_pipe", "running_audacity"]

ENABLE_HINT = ("enable it with `cloak audacity install` (or in Audacity: Edit > Preferences > Modules, set "
               "mod-script-pipe to Enabled), then restart Audacity")
AUDACITY4_HINT = ("Audacity 4.x has no scripting pipe yet (mod-script-pipe and the Macro Manager are listed as not yet "
                  "available in 4.0). Use Audacity 3.x for the bridge, or do it by hand: File > Export Audio > "
                  "selected audio as 32-bit float WAV, `cloak protect that.wav`, then File > Import > Audio and "
                  "move the new clip to the selection start")


def running_audacity() -> list[tuple[int, str]]:
    """(pid, executable) of running Audacity processes where this can be found out cheaply (Linux /proc)."""
    found: list[tuple[int, str]] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            comm = (d / "comm").read_text().strip()
        except OSError:
            continue
        if "audacity" in comm.lower():
            try:
                exe = os.readlink(d / "exe")
            except OSError:
                exe = comm
            found.append((int(d.name), exe))
    return found


def diagnose_missing_pipe(detail: str, versions: Iterable[tuple[str, str]] | None = None,
                          setting: str | None = "?", running: list[tuple[int, str]] | None = None) -> PipeNotFound:
    """Turn "no pipe" into advice: Audacity 4.x? not running? module not enabled? (Arguments are for tests.)"""
    from .setup import detect_audacity_versions, script_pipe_setting

    versions = list(detect_audacity_versions() if versions is None else versions)
    running = running_audacity() if running is None else running
    setting = script_pipe_setting() if setting == "?" else setting
    major4 = [f"{v} ({src})" for src, v in versions if v.split(".")[0].isdigit() and int(v.split(".")[0]) >= 4]
    major3 = [v for _, v in versions if v.split(".")[0] == "3"]
    if major4 and not major3:
        return UnsupportedAudacity(f"no Audacity scripting pipe ({detail}); found Audacity {', '.join(major4)}. "
                                   + AUDACITY4_HINT)
    if setting is not None and setting != "1":
        state = {"0": "disabled", "2": "set to ask", "3": "failed to load", "4": "new (not yet enabled)"}
        return PipeNotFound(f"Audacity's mod-script-pipe module is {state.get(setting, 'not enabled')} "
                            f"([Module] mod-script-pipe={setting}) ({detail}): {ENABLE_HINT}")
    if sys.platform.startswith("linux") and not running:
        hint = "" if setting == "1" else f"; if the pipe is still missing then, {ENABLE_HINT}"
        return PipeNotFound(f"Audacity is not running ({detail}): start Audacity 3.x and open a project{hint}")
    extra = f" (4.x found too: {', '.join(major4)}; {AUDACITY4_HINT})" if major4 else ""
    return PipeNotFound(f"no Audacity scripting pipe ({detail}). Is Audacity 3.x running with mod-script-pipe "
                        f"enabled? If not: {ENABLE_HINT}{extra}")
