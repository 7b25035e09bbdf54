"""What the CPU can do fast: native bf16 (the precision choice) and its name and cores (benchmarks).

Native bf16 means Intel AMX (amx_bf16) or AVX512-BF16: oneDNN then runs bf16 matrix products and convolutions in
hardware, and bf16 autocast speeds the U-Net up (measured 1.3-1.45x per PGD iteration on a 2-core Xeon with both).
Without either, torch emulates bf16 in fp32 arithmetic plus conversions, about 20x slower than fp32 on the EPYC
we measured, so fp32 is the only sensible choice there. ARM's bf16 extension is not counted (unmeasured).
Deliberately light: no torch import at module level, so `cloak info` and the CLI can ask before torch loads.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _torch_bf16_flags() -> list[str]:
    """The flags torch itself detects (cpuinfo-independent: macOS, Windows); [] if torch cannot tell."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return []
    cpu = torch.cpu
    found = []
    for flag, probe in (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        fn = getattr(cpu, probe, None)  # private torch helpers; absent in some versions
        try:
            if fn is not None and fn():
                found.append(flag)
        except Exception:  # noqa: BLE001 - a probe that fails means "cannot tell"
            pass
    return found


@lru_cache(maxsize=1)
def cpu_bf16_flags() -> tuple[str, ...]:
    """The native-bf16 features of this CPU among BF16_FLAGS (from /proc/cpuinfo, else torch's own probes)."""
    info = _cpuinfo()
    if info:
        flags = set()
        for line in info.splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[-1].split())
        return tuple(f for f in BF16_FLAGS if f in flags)
    return tuple(_torch_bf16_flags())


def cpu_has_native_bf16() -> bool:
    """True when the CPU runs bf16 matrix arithmetic natively (AMX or AVX512-BF16)."""
    return bool(cpu_bf16_flags())


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's marketing name ("Intel(R) Xeon(R) Processor"), or platform's best guess."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_cores() -> int:
    """CPUs this process may run on (affinity-aware where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
