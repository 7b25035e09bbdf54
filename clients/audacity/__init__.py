"""The Audacity "Cloak selection" bridge (Audacity 3.x, mod-script-pipe).

* :mod:`.pipe`   - the scripting-pipe client (FIFOs / Windows named pipes, timeouts, clear errors)
* :mod:`.bridge` - the workflow: selection -> float WAV -> cloak -> back into the project in one undo step
* :mod:`.macro`  - the "Cloak selection" macro and the label protocol it shares with watch mode
* :mod:`.watch`  - `cloak audacity watch`: cloak the ranges the macro marked
* :mod:`.setup`  - `cloak audacity install`: enable mod-script-pipe (backup first), install the macro
* :mod:`.cli`    - ``register_audacity(subparsers)`` / ``run_audacity(args)`` for the ``clients.cli`` package
"""

from .bridge import Bridge, BridgeCancelled, BridgeError, CloakOutcome, Processor, SelectionError
from .pipe import (
    AudacityError,
    AudacityGone,
    CommandFailed,
    NoProject,
    PipeBusy,
    PipeClient,
    PipeNotFound,
    PipeTimeout,
    UnsupportedAudacity,
)
from .watch import Watcher

__all__ = ["AudacityError", "AudacityGone", "Bridge", "BridgeCancelled", "BridgeError", "CloakOutcome",
           "CommandFailed", "NoProject", "PipeBusy", "PipeClient", "PipeNotFound", "PipeTimeout", "Processor",
           "SelectionError", "UnsupportedAudacity", "Watcher"]
