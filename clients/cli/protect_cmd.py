"""`cloak protect`: cloak recordings against diffusion voice cloning, locally or on a server."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import traceback
from typing import Any

import numpy as np

from cloak import AudioError, BundleError, Cancelled, CancelToken, ConfigError, ProtectConfig, read_audio, write_audio
from cloak.audio import fit_to_budget, passthrough_reason, read_exact
from cloak.files import jsonable
from cloak.sample import sample_path

from ..remote import ServerUnavailable
from .common import (
    ENV_MODELS,
    EXIT_AUDIO,
    EXIT_BUNDLE,
    EXIT_CANCELLED,
    EXIT_CODES_HELP,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_USAGE,
    HelpFormatter,
    UsageError,
    debug_enabled,
    json_line,
    print_error,
)
from .jobs import AUDIO_EXTENSIONS, Job, expand_inputs, plan_jobs, preflight
from .progress import Reporter, cancel_on_sigint
from .protector import Protector, add_remote_args, make_protector
from .settings import Settings, add_common_model_args, add_config_flags, resolve_remote_target, resolve_settings

_WIDE_SUBTYPES = frozenset({"PCM_32", "DOUBLE"})  # samples float32 cannot hold: budget and copies use float64
SAMPLE_OUTPUT = "sample.cloaked.flac"  # where `cloak protect --sample` writes without -o (the current directory)


PROTECT_EPILOG = f"""\
examples:
  cloak protect talk.wav                      writes talk.cloaked.wav next to it
  cloak protect --sample                      the shipped speech sample, into ./sample.cloaked.flac
  cloak protect talk.flac -o safe/talk.flac   explicit output file (FLAC keeps its sample format)
  cloak protect interview.mp3                 writes interview.cloaked.wav (float32 WAV; see below)
  cloak protect -r recordings/ -o cloaked/    a whole tree, mirrored under cloaked/
  cloak protect 'takes/*.wav' --json > report.jsonl
  cloak protect voice.wav --epsilon 0.004 --iterations 100 --gender female --device cuda
  cloak protect voice.wav --config my-settings.toml --force

inputs: files, directories (audio files directly inside; with -r the whole tree) and glob patterns
({' '.join(AUDIO_EXTENSIONS)}). Files named *.cloaked.* are skipped when expanding directories and globs.

outputs: <stem>.cloaked<ext> next to each input unless -o is given; with several inputs -o must be a
directory (created if needed). Rate, channels and length are kept. WAV/FLAC/AIFF inputs keep their container
and sample format: 16/24/32-bit PCM stays 16/24/32-bit (quantised so that the stored samples still differ from
the input's by at most --epsilon; no dither), float stays float. Lossy inputs (MP3, OGG, u-law, ADPCM, ...) are
written as WAV holding what their decoder gives (float or 16-bit), because re-encoding to a lossy codec weakens
the protection. Same input, settings and seed: byte-identical output. Existing files are never replaced
without --force, the input itself never; writes are atomic. Unusable inputs and unwritable outputs are
reported before any model loads. A clip shorter than 0.5 s or silent (nothing above -60 dBFS), and any
input with --iterations 0, is written unchanged with a warning.

settings: flags > environment ({ENV_MODELS}) > config file > defaults. Config file keys are the long flag names
(epsilon, step_size, iterations, ..., plus models and device), e.g. in TOML:
    epsilon = 0.003
    iterations = 100
    weights = [1.0, 4.5, 10.0, 0.85, 10.0]
    id_encoders = ["ge2e"]

progress: bars on a terminal, plain log lines on stderr otherwise; --json prints one JSON object per file on
stdout (input, output, seconds, snr_db, linf, losses_start, losses_end, iterations, windows, gender,
masking_exponents and predicted_pesq (each window's shaping), models, config) and nothing else. Ctrl-C
abandons the current file and exits 130.

{EXIT_CODES_HELP}
"""


def register_protect(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "protect", help="cloak recordings against diffusion voice cloning",
        description="Add an inaudible adversarial perturbation (|delta| <= epsilon) to voice recordings so that "
                    "diffusion voice conversion cannot clone the voice from them.",
        epilog=PROTECT_EPILOG, formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="IN", help="audio file, directory or glob pattern")
    p.add_argument("--sample", action="store_true",
                   help="protect the speech sample shipped with VoiceCloak (written to ./" + SAMPLE_OUTPUT +
                        " unless -o is given; see `cloak sample`)")
    p.add_argument("-o", "--output", metavar="OUT|DIR",
                   help="output file (one input only) or directory (default: <stem>.cloaked<ext> beside each input)")
    p.add_argument("-r", "--recursive", action="store_true", help="descend into sub-directories of directory inputs")
    p.add_argument("-f", "--force", action="store_true", help="replace existing output files")
    p.add_argument("--json", action="store_true", help="print one JSON object per file on stdout, nothing else")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output (errors and warnings still shown)")
    p.add_argument("-n", "--dry-run", action="store_true",
                   help="show what would be written and the effective settings; load no models, write nothing")
    add_common_model_args(p)
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default in fp32: the cores other processes leave free now, at least "
                        "1; in bf16, whose results depend on the thread count: all cores; $OMP_NUM_THREADS when set; "
                        "on 2 cores, 2 threads were 1.6x faster than 1 when idle and 8-10x slower when another "
                        "process kept one core busy: pass --threads 1 on a busy machine, or where identical files "
                        "matter: only one-thread runs are bit-reproducible for certain)")
    add_config_flags(p)
    add_remote_args(p)
    return p


def check_inputs(jobs: list[Job], cfg: ProtectConfig, args: argparse.Namespace, reporter: Reporter) -> list[int]:
    """Read every input once before any model loads: report the unusable ones at once (exit 3, the others are
    still processed) and mark those to be written unchanged (shorter than 0.5 s, silent, --iterations 0)."""
    codes = []
    for job in jobs:
        if job.error is None:
            try:
                audio = read_audio(job.input)
            except AudioError as e:
                job.error = str(e)
            else:
                if cfg.iterations == 0:
                    job.passthrough = "--iterations 0: no perturbation computed"
                else:
                    job.passthrough = passthrough_reason(audio.samples, audio.sample_rate)
                del audio
        if job.error is not None:
            codes.append(_failure(args, job, job.error, EXIT_AUDIO, reporter))
            job.reported = True
    return codes


def _failure(args: argparse.Namespace, job: Job, msg: str, code: int, reporter: Reporter) -> int:
    reporter.message(f"cloak: error: {msg}")
    if args.json:
        reporter.result(json.dumps({"input": str(job.input), "output": None if job.output is None else str(job.output),
                                    "ok": False, "error": msg, "exit_code": code}))
    return code


def run_protect(args: argparse.Namespace) -> int:
    remote = resolve_remote_target(args)
    settings = resolve_settings(args)
    cfg = settings.config
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    inputs = list(args.inputs)
    output = args.output
    if args.sample:
        if inputs:
            raise UsageError("--sample protects the shipped sample only: give no other inputs")
        inputs = [str(sample_path())]
        if output is None:  # not beside the sample, inside the installed package
            output = SAMPLE_OUTPUT
    elif not inputs:
        raise UsageError("no inputs: give audio files, directories or glob patterns (or --sample)")
    files, missing = expand_inputs(inputs, args.recursive)
    jobs = plan_jobs(files, output, cfg.epsilon) if files else []
    jobs = missing + jobs
    if not jobs:
        raise UsageError("no audio files to process")
    problems = preflight(jobs, args.force)
    if problems:
        for msg in problems:
            print_error(f"error: {msg}")
        print_error("nothing was written")
        return EXIT_USAGE

    if args.dry_run:
        for j in jobs:
            for w in j.warnings:
                print_error(f"warning: {w}")
            if args.json:
                json_line({"input": str(j.input), "output": None if j.output is None else str(j.output),
                           "format": j.out_format, "subtype": j.out_subtype, "error": j.error,
                           "models_dir": settings.models, "device": settings.device, "config": cfg.to_dict()})
            else:
                print(f"{j.input} -> {j.output}" if j.error is None else f"{j.input}: {j.error}")
        if not args.json:
            print(f"models: {settings.models or 'embedded'} ({settings.models_source}), device: {settings.device}, "
                  f"config file: {settings.config_file or 'none'}")
            print("settings: " + json.dumps(cfg.to_dict(), default=jsonable))
        return EXIT_OK

    threads = args.threads
    if threads is None and settings.device == "cpu" and remote is None:
        import torch

        from cloak.bundle import resolve_precision
        from cloak.cpu import default_threads

        # fp32 results depend on the thread count only in the last bits (and with two threads runs were measured to
        # differ that much now and then: only --threads 1 is bit-reproducible for certain), so a busy core need not
        # get a thread (see --help); bf16 autocast results depend on it more (oneDNN splits its bf16 reductions by
        # thread), so there the count stays fixed (all cores)
        if resolve_precision(settings.precision, torch.device("cpu")) == "fp32":
            threads = default_threads()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    token = CancelToken()
    reporter = Reporter(len(jobs), cfg, args.quiet)
    codes = check_inputs(jobs, cfg, args, reporter)  # fail fast: before any model loads
    need_models = any(j.error is None and j.passthrough is None for j in jobs)
    cancelled = False
    model_ids: list[dict[str, Any]] = []
    protector: Protector | None = None
    try:
        with cancel_on_sigint(token, reporter):
            if need_models:  # local models or a server: the one place that decides is make_protector
                protector = make_protector(settings, remote, say=reporter.info)
                model_ids = protector.model_ids
                settings = dataclasses.replace(settings, device=protector.device)
            for index, job in enumerate(jobs):
                if token.cancelled:
                    cancelled = True
                    break
                if job.reported:
                    reporter.end_file()
                    continue
                if job.error is not None:
                    codes.append(_failure(args, job, job.error, EXIT_AUDIO, reporter))
                    reporter.end_file()
                    continue
                assert job.output is not None
                for w in job.warnings:
                    reporter.message(f"cloak: warning: {w}")
                try:
                    audio = read_audio(job.input)
                    # float32 holds every sample of up to 24-bit PCM and of FLOAT exactly, not of PCM_32 / DOUBLE
                    exact = read_exact(job.input) if job.in_subtype in _WIDE_SUBTYPES else audio.samples
                except AudioError as e:
                    codes.append(_failure(args, job, str(e), EXIT_AUDIO, reporter))
                    reporter.end_file()
                    continue
                metrics: dict[str, Any]
                if job.passthrough is not None:
                    reporter.message(f"cloak: warning: {job.input}: {job.passthrough}; the output is the input "
                                     "unchanged")
                    stored = fit_to_budget(exact, exact, cfg.epsilon, job.out_subtype)
                    metrics = {"seconds": 0.0, "iterations": 0, "windows": 0, "config": cfg.to_dict(),
                               "warning": f"{job.passthrough}; the output is the input unchanged"}
                else:
                    reporter.start_file(index, job.input)
                    assert protector is not None  # need_models was true for this job
                    try:
                        result = protector.protect(audio.samples, audio.sample_rate, cfg, progress=reporter,
                                                   cancel=token)
                    except Cancelled:
                        cancelled = True
                        break
                    except AudioError as e:
                        codes.append(_failure(args, job, f"{job.input}: {e}", EXIT_AUDIO, reporter))
                        reporter.end_file()
                        continue
                    except (BundleError, KeyboardInterrupt, ServerUnavailable, ConfigError):
                        raise
                    except Exception as e:  # noqa: BLE001 - e.g. out of memory on one long file: go on with the rest
                        if debug_enabled():
                            traceback.print_exc()
                        codes.append(_failure(args, job, f"{job.input}: internal error: {type(e).__name__}: {e}",
                                              EXIT_INTERNAL, reporter))
                        reporter.end_file()
                        continue
                    if token.cancelled:
                        cancelled = True
                        break
                    metrics = result.metrics
                    stored = fit_to_budget(result.audio, exact, cfg.epsilon, job.out_subtype)
                try:
                    if job.create_dirs:
                        job.output.parent.mkdir(parents=True, exist_ok=True)
                    write_audio(job.output, stored, audio.sample_rate, subtype=job.out_subtype,
                                format=job.out_format, overwrite=args.force, protect_original=job.input)
                except (AudioError, OSError) as e:
                    codes.append(_failure(args, job, f"cannot write {job.output}: {e}", EXIT_AUDIO, reporter))
                    reporter.end_file()
                    continue
                reporter.end_file()
                codes.append(EXIT_OK)
                _report_file(args, job, audio.sample_rate, exact, stored, metrics, model_ids, settings, reporter)
    finally:
        reporter.close()
    if cancelled:
        print_error("cancelled; the file in progress was abandoned (nothing partial written)")
        return EXIT_CANCELLED
    failed = sum(c != EXIT_OK for c in codes)
    if len(jobs) > 1 and not args.quiet:
        print_error(f"{len(jobs) - failed} of {len(jobs)} file(s) protected" + (f", {failed} failed" if failed else ""))
    for code in (EXIT_BUNDLE, EXIT_INTERNAL, EXIT_AUDIO):
        if code in codes:
            return code
    return EXIT_OK


def _report_file(args: argparse.Namespace, job: Job, sample_rate: int, exact: np.ndarray, stored: np.ndarray,
                 metrics: dict[str, Any], model_ids: list[dict[str, Any]], settings: Settings,
                 reporter: Reporter) -> None:
    x = exact.astype(np.float64)
    diff = stored.astype(np.float64) - x
    noise = float(np.sum(diff**2))
    snr: float | None = None
    if noise > 0:
        snr = 10 * math.log10(max(float(np.sum(x**2)), 1e-20) / noise)
    linf = float(np.max(np.abs(diff))) if diff.size else 0.0
    channels = 1 if x.ndim == 1 else int(x.shape[1])
    if args.json:
        reporter.result(json.dumps({
            "input": str(job.input), "output": str(job.output), "ok": True,
            "seconds": metrics.get("seconds"), "snr_db": snr, "linf": linf,
            "losses_start": metrics.get("losses_start"), "losses_end": metrics.get("losses_end"),
            "iterations": metrics.get("iterations"), "windows": metrics.get("windows"),
            "gender": metrics.get("gender"), "opposite_speaker": metrics.get("opposite_speaker"),
            "masking_exponents": metrics.get("masking_exponents"), "predicted_pesq": metrics.get("predicted_pesq"),
            "models": model_ids, "device": settings.device, "config": metrics.get("config"),
            "sample_rate": sample_rate, "channels": channels, "frames": int(x.shape[0]),
            "format": job.out_format, "subtype": job.out_subtype, "warning": metrics.get("warning"),
        }, default=jsonable))
    elif linf == 0:
        reporter.result(f"{job.input} -> {job.output}  (unchanged: {metrics.get('warning') or 'no perturbation'})")
    else:
        reporter.result(f"{job.input} -> {job.output}  (SNR {snr:.1f} dB, max |delta| {linf:.2g}, "
                        f"{metrics.get('seconds', 0.0):.1f} s)")
