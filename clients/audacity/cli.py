"""`cloak audacity install | cloak-selection | watch`: the Audacity bridge on the command line.

Wiring (clients/cli/__init__.py): ``Subcommand("audacity", register_audacity, run_audacity)``. This module imports
clients.cli lazily (inside the functions), so either module may import the other at top level.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from typing import Any

from .bridge import Bridge, Processor
from .diagnose import running_audacity
from .errors import AudacityError, BridgeCancelled, BridgeError, CommandFailed, SelectionError, UnsupportedAudacity
from .lock import PipeLock
from .macro import MACRO_NAME
from .outcome import CloakOutcome
from .pipe import PipeClient
from .setup import find_profiles, install
from .watch import JobReport, Watcher

__all__ = ["AUDACITY_EPILOG", "register_audacity", "run_audacity"]

EXIT_CODES = """\
exit codes:
  0    success (watch: every job done)
  1    the bridge failed (the project was left as it was; the message says why); watch --once: a job failed
  2    usage error or bad settings; nothing was done
  3    the selection cannot be cloaked (nothing selected, empty, muted/panned/gain, wrong rate, ...)
  4    model bundle problem
  5    Audacity not reachable (not running, mod-script-pipe not enabled, no project open, a dialog blocks it,
       Audacity 4.x) or the VoiceCloak server is unavailable
  130  cancelled with Ctrl-C (nothing was changed in the project)"""

AUDACITY_EPILOG = f"""\
setup (Audacity 3.x; 4.x has no scripting pipe yet):
  1. quit Audacity, run `cloak audacity install` (enables mod-script-pipe, installs the "{MACRO_NAME}" macro)
  2. start Audacity and run `cloak audacity watch` in a terminal (leave it running)
  3. select audio in Audacity, then Tools > Apply Macro > {MACRO_NAME}: the range gets a label
     "cloak:pending ...", which becomes "cloak:done" and a new track "<name> (cloaked)" appears

examples:
  cloak audacity install                     enable the pipe and install the macro (backs up audacity.cfg)
  cloak audacity watch                       cloak every range marked with the macro, until Ctrl-C
  cloak audacity cloak-selection             cloak the current selection once (terminal or an OS hotkey)
  cloak audacity cloak-selection --replace   replace the selected audio in place (one undo step)
  cloak audacity watch --server cloak.example.org:50051 --token-file ~/.cloak-token

{EXIT_CODES}
"""

ACTION_EPILOG = f"""\
what happens: the selected range of each selected audio track is exported from Audacity as 32-bit float WAV,
cloaked (|delta| <= epsilon), and pasted back sample-exactly as a new track "<name> (cloaked)" (or over the
original audio with --replace) in a single undo step: Edit > Undo takes it back. Tracks with a gain, pan,
volume envelope, mute/solo or a rate different from the project rate are refused (export would alter them).
Anything that goes wrong leaves the project as it was.

{EXIT_CODES}
"""


def _base() -> Any:
    from clients import cli

    return cli


# ------------------------------------------------------------------------------------------ parser


def _add_processing_args(p: argparse.ArgumentParser) -> None:
    base = _base()
    p.add_argument("--replace", action="store_true",
                   help="replace the selected audio in place (one undo step) instead of adding a new track")
    p.add_argument("--suffix", default=" (cloaked)", metavar="TEXT",
                   help="name of the new track = track name + TEXT (default ' (cloaked)')")
    p.add_argument("--json", action="store_true", help="one JSON object per result on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    p.add_argument("--pipe-timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait for Audacity's answer to a short command (default 10; exports and "
                        "imports get more)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch")
    base.add_common_model_args(p)
    base.add_config_flags(p)
    base.add_remote_args(p)


def register_audacity(subparsers: Any) -> argparse.ArgumentParser:
    base = _base()
    p = subparsers.add_parser(
        "audacity", help="cloak a selection inside Audacity 3.x (mod-script-pipe bridge)",
        description="Cloak audio inside Audacity 3.x through its scripting pipe (mod-script-pipe).",
        epilog=AUDACITY_EPILOG, formatter_class=base.HelpFormatter)
    sub = p.add_subparsers(dest="audacity_command", metavar="ACTION")
    pi = sub.add_parser(
        "install", help="enable mod-script-pipe and install the 'Cloak selection' macro",
        description="Enable mod-script-pipe in Audacity's config (a backup of audacity.cfg is made first) and "
                    f"install the '{MACRO_NAME}' macro into Audacity's Macros folder. Quit Audacity first: it "
                    "rewrites its config when it exits.",
        epilog=EXIT_CODES, formatter_class=base.HelpFormatter)
    pi.add_argument("-n", "--dry-run", action="store_true", help="show the files that would be changed")
    pi.add_argument("--force", action="store_true", help="edit the config even though Audacity seems to run")
    pi.add_argument("--json", action="store_true", help="print the report as JSON")
    pc = sub.add_parser(
        "cloak-selection", help="cloak the current selection once",
        description="Cloak the current selection of the open Audacity project once (from a terminal, or bound to "
                    "an OS keyboard shortcut).", epilog=ACTION_EPILOG, formatter_class=base.HelpFormatter)
    _add_processing_args(pc)
    pw = sub.add_parser(
        "watch", help="cloak every range marked with the 'Cloak selection' macro",
        description=f"Poll Audacity for labels made by the '{MACRO_NAME}' macro (text 'cloak:pending ...'), "
                    "cloak each marked range and set the label to 'cloak:done' or 'cloak:failed: <reason>'. "
                    "Keeps running (and waits for Audacity) until Ctrl-C.",
        epilog=ACTION_EPILOG, formatter_class=base.HelpFormatter)
    pw.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between polls (default 1)")
    pw.add_argument("--once", action="store_true", help="do the pending jobs, then exit")
    _add_processing_args(pw)
    p.set_defaults(_audacity_parser=p)
    return p


# ------------------------------------------------------------------------------------------ processing


class RemoteError(Exception):
    """The VoiceCloak server failed (exit 1) or is unreachable (exit 5)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _progress_printer(quiet: bool) -> Any:
    state = {"decile": -1}

    def progress(p: Any) -> None:
        if quiet:
            return
        done = p.window * p.iterations + p.iteration
        total = max(1, p.windows * p.iterations)
        decile = int(10 * done / total)
        if decile != state["decile"] or done == total:
            state["decile"] = decile
            print(f"cloak audacity: iteration {done}/{total} ({100 * done / total:.0f}%), "
                  f"eta {p.eta_s:.0f} s", file=sys.stderr, flush=True)

    return progress


def _processor(args: argparse.Namespace, settings: Any, token: Any) -> Processor:
    """Cloak with clients.cli.make_protector's protector: the models named by the settings, loaded here, or a
    VoiceCloak server (--server / CLOAK_SERVER), asked for its info at once so that an unreachable one fails
    before any job. A server's failures become RemoteError (exit 5 when unavailable, else 1)."""
    from clients import remote

    base = _base()
    target = base.resolve_remote_target(args)  # UsageError: --token-file / --tls-ca without --server, missing file

    def say(msg: str) -> None:
        if not args.quiet:
            print(f"cloak audacity: {msg.removeprefix('cloak: ')}", file=sys.stderr, flush=True)

    def server_error(e: Exception) -> RemoteError:
        assert target is not None
        if isinstance(e, remote.ServerUnavailable):
            return RemoteError(f"server {target.server} unavailable: {e}", base.EXIT_SERVER)
        return RemoteError(f"server {target.server}: {e}", base.EXIT_INTERNAL)

    try:
        protector = base.make_protector(settings, target, say=say)
    except remote.RemoteError as e:
        raise server_error(e) from e
    cfg = settings.config
    progress = _progress_printer(args.quiet)

    def process(audio: Any, rate: int) -> Any:
        try:
            return protector.protect(audio, rate, cfg, progress=progress, cancel=token).audio
        except remote.RemoteError as e:
            raise server_error(e) from e

    return process


# ------------------------------------------------------------------------------------------ reporting


def _print_outcome(args: argparse.Namespace, outcome: CloakOutcome, prefix: str = "") -> None:
    if args.json:
        return
    for w in outcome.warnings:
        print(f"cloak audacity: warning: {w}", file=sys.stderr, flush=True)
    for s in outcome.skipped:
        print(f"cloak audacity: skipped {s}", file=sys.stderr, flush=True)
    for t in outcome.tracks:
        where = f"new track '{t.new_track}'" if t.new_track else "replaced in place"
        print(f"{prefix}'{t.track}' {t.start:.3f}-{t.end:.3f} s -> {where}  (max |delta| {t.linf:.2g}, "
              f"SNR {t.snr_db:.1f} dB, {t.seconds:.1f} s)", flush=True)


def _json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, default=str), flush=True)


def _audacity_code(e: AudacityError) -> int:
    base = _base()
    if isinstance(e, BridgeCancelled):
        return base.EXIT_CANCELLED
    if isinstance(e, SelectionError):
        return base.EXIT_AUDIO
    if isinstance(e, BridgeError | CommandFailed):
        return base.EXIT_INTERNAL
    return base.EXIT_SERVER  # pipe missing / not enabled / 4.x / timeout / no project / gone / busy


# ------------------------------------------------------------------------------------------ actions


def _run_install(args: argparse.Namespace) -> int:
    base = _base()
    running = running_audacity()
    if args.dry_run:
        for p in find_profiles():
            print(f"would enable mod-script-pipe in {p.config} (backup first) and write the macro to {p.macros}")
        return base.EXIT_OK
    if running and not args.force:
        base.print_error(f"error: Audacity is running (pid {', '.join(str(p) for p, _ in running)}); quit it first: it "
                  "rewrites its config when it exits, which would undo this (or use --force)")
        return base.EXIT_USAGE
    try:
        report = install()
    except OSError as e:
        base.print_error(f"error: {e}")
        return base.EXIT_AUDIO
    if args.json:
        _json({"ok": True, "configs": [str(c) for c in report.configs], "backups": [str(b) for b in report.backups],
               "macros": [str(m) for m in report.macros], "module": None if report.module is None else
               str(report.module), "changed": report.changed, "notes": report.notes})
        return base.EXIT_OK
    for c in report.configs:
        print(f"mod-script-pipe enabled in {c}")
    for b in report.backups:
        print(f"backup: {b}")
    for m in report.macros:
        print(f"macro '{MACRO_NAME}': {m}")
    if report.module is not None:
        print(f"module: {report.module}")
    for n in report.notes:
        print(f"note: {n}")
    print("next: start Audacity 3.x, run `cloak audacity watch`, select audio and use "
          f"Tools > Apply Macro > {MACRO_NAME}" + ("" if report.changed else " (nothing needed changing)"))
    return base.EXIT_OK


def _make_processor(args: argparse.Namespace, token: Any) -> tuple[Processor, float]:
    base = _base()
    settings = base.resolve_settings(args)
    if args.threads is not None:
        if args.threads < 1:
            raise base.UsageError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    return _processor(args, settings, token), settings.config.epsilon


def run_audacity(args: argparse.Namespace, processor: Processor | None = None, epsilon: float | None = None,
                 stop: threading.Event | None = None) -> int:
    """`cloak audacity ...`. Tests may pass `processor` (and `epsilon`) to skip model loading, and `stop`."""
    import cloak

    base = _base()
    action = getattr(args, "audacity_command", None)
    if action is None:
        args._audacity_parser.print_help(sys.stderr)
        return base.EXIT_USAGE
    if action == "install":
        return _run_install(args)
    if args.pipe_timeout <= 0:
        raise base.UsageError(f"--pipe-timeout must be > 0, got {args.pipe_timeout}")
    if action == "watch" and args.interval <= 0:
        raise base.UsageError(f"--interval must be > 0, got {args.interval}")

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"cloak audacity: {msg}", file=sys.stderr, flush=True)

    client = PipeClient(timeout=args.pipe_timeout)
    token = cloak.CancelToken()
    lock = PipeLock()
    try:
        with base.cancel_on_sigint(token):
            # one transaction at a time (see PipeLock); connect before loading models, to fail fast
            if action == "cloak-selection":
                lock.acquire(on_wait=lambda: log("waiting for `cloak audacity watch` to finish its job"),
                             cancelled=lambda: token.cancelled)
                client.connect()
            elif args.once:
                lock.acquire(cancelled=lambda: token.cancelled)
                try:
                    client.connect()
                finally:
                    client.close()
                    lock.release()
            if processor is None:
                processor, epsilon = _make_processor(args, token)
            bridge = Bridge(client, processor, epsilon=0.002 if epsilon is None else epsilon, replace=args.replace,
                            suffix=args.suffix, log=log, cancelled=lambda: token.cancelled)
            if action == "cloak-selection":
                outcome = bridge.cloak_selection()
                if args.json:
                    _json(outcome.to_dict())
                _print_outcome(args, outcome)
                return base.EXIT_OK

            def report(r: JobReport) -> None:
                if args.json:
                    _json(r.to_dict())
                elif r.ok and r.outcome is not None:
                    _print_outcome(args, r.outcome)
                else:
                    print(f"failed {r.start:.3f}-{r.end:.3f} s: {r.error}", flush=True)

            watcher = Watcher(bridge, interval=args.interval, log=log, report=report,
                              stop=stop or threading.Event(), lock=lock)
            if not args.once:
                log(f"watching Audacity for '{MACRO_NAME}' marks (Ctrl-C to stop)")
            failed = watcher.run(once=args.once)
            if token.cancelled:
                return base.EXIT_CANCELLED
            return base.EXIT_INTERNAL if (failed and args.once) else base.EXIT_OK
    except (AudacityError, RemoteError, cloak.Cancelled) as e:
        if isinstance(e, UnsupportedAudacity):
            code = base.EXIT_SERVER
        elif isinstance(e, AudacityError):
            code = _audacity_code(e)
        elif isinstance(e, RemoteError):
            code = e.code
        else:
            code = base.EXIT_CANCELLED
        msg = "cancelled; the project was left as it was" if code == base.EXIT_CANCELLED else str(e)
        base.print_error(msg if code == base.EXIT_CANCELLED else f"error: {msg}")
        if args.json:
            _json({"ok": False, "error": msg, "exit_code": code})
        return code
    finally:
        with contextlib.suppress(Exception):
            client.close()
        lock.release()
