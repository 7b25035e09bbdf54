"""Every way the Audacity bridge can fail, as one exception family (AudacityError); each message says what to do.

The pipe (:mod:`.pipe`, :mod:`.transport`) raises PipeNotFound / UnsupportedAudacity / PipeBusy / PipeTimeout /
NoProject / AudacityGone / CommandFailed; the workflow (:mod:`.bridge`) raises BridgeError and its kinds.
"""

from __future__ import annotations

__all__ = [
    "AudacityError",
    "AudacityGone",
    "BridgeCancelled",
    "BridgeError",
    "CommandFailed",
    "NoProject",
    "PipeBusy",
    "PipeNotFound",
    "PipeTimeout",
    "SelectionError",
    "UnsupportedAudacity",
]


class AudacityError(Exception):
    """Base class of every bridge error; the message says what to do."""


class PipeNotFound(AudacityError):
    """No scripting pipe: Audacity is not running, mod-script-pipe is not enabled, or the FIFO is stale."""


class UnsupportedAudacity(PipeNotFound):
    """The running / installed Audacity has no scripting pipe (4.x)."""


class PipeBusy(AudacityError):
    """Windows: another client holds the pipe ("All pipe instances are busy")."""


class PipeTimeout(AudacityError):
    """Audacity did not finish answering within the timeout (typically a modal dialog is open)."""


class NoProject(AudacityError):
    """Audacity answered a bare newline without terminator: no project window is open."""


class AudacityGone(AudacityError):
    """Audacity closed the pipe (it quit or crashed)."""


class CommandFailed(AudacityError):
    """The command ran and Audacity answered ``BatchCommand finished: Failed!``."""

    def __init__(self, command: str, output: str, status: str = "Failed!") -> None:
        self.command, self.output, self.status = command, output, status
        detail = output.strip().replace("\n", " | ")
        super().__init__(f"Audacity refused {command!r}: {detail or status}")


class BridgeError(AudacityError):
    """The workflow could not be completed; the project was left as it was."""


class SelectionError(BridgeError):
    """Nothing (usable) is selected, or a selected track cannot be cloaked as it is."""


class BridgeCancelled(BridgeError):
    """The run was cancelled; the project was left as it was."""
