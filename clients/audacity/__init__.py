"""The Audacity "Cloak selection" bridge (Audacity 3.x, mod-script-pipe).

* :mod:`.pipe`      - the scripting-pipe client (timeouts, clear errors); its transports (FIFOs / Windows named
                      pipes) in :mod:`.transport`, the command text in :mod:`.commands`
* :mod:`.errors`    - every failure, one exception family (AudacityError)
* :mod:`.diagnose`  - why there is no pipe, in words a user can act on
* :mod:`.lock`      - one bridge transaction at a time (PipeLock)
* :mod:`.bridge`    - the workflow: selection -> float WAV -> cloak -> back into the project in one undo step
* :mod:`.project`   - the open project through the pipe: tracks, labels, selection, checked Undo, the exact selection
* :mod:`.selection` - what is selected and whether it can be cloaked as it is (the plan of ranges)
* :mod:`.placing`   - cloaked audio back into the project as one undo step
* :mod:`.outcome`   - what a run reports
* :mod:`.macro`     - the "Cloak selection" macro and the label protocol it shares with watch mode
* :mod:`.watch`     - `cloak audacity watch`: cloak the ranges the macro marked
* :mod:`.setup`     - `cloak audacity install`: enable mod-script-pipe (backup first), install the macro
* :mod:`.cli`       - ``register_audacity(subparsers)`` / ``run_audacity(args)`` for the ``clients.cli`` package
"""

from .bridge import Bridge, Processor
from .errors import (
    AudacityError,
    AudacityGone,
    BridgeCancelled,
    BridgeError,
    CommandFailed,
    NoProject,
    PipeBusy,
    PipeNotFound,
    PipeTimeout,
    SelectionError,
    UnsupportedAudacity,
)
from .lock import PipeLock
from .outcome import CloakOutcome
from .pipe import PipeClient
from .watch import Watcher

__all__ = ["AudacityError", "AudacityGone", "Bridge", "BridgeCancelled", "BridgeError", "CloakOutcome",
           "CommandFailed", "NoProject", "PipeBusy", "PipeClient", "PipeLock", "PipeNotFound", "PipeTimeout",
           "Processor", "SelectionError", "UnsupportedAudacity", "Watcher"]
