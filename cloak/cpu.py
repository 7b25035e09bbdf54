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


def _proc_stat_cpu() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs together from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    total = sum(ticks[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return total - idle, total


def busy_cores(sample_s: float = 0.1) -> float | None:
    """How many cores other processes keep busy right now, sampled over `sample_s` seconds while this process
    sleeps; None where /proc/stat is unavailable."""
    import time

    a = _proc_stat_cpu()
    time.sleep(sample_s)
    b = _proc_stat_cpu()
    if a is None or b is None or b[1] <= a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1]) * (os.cpu_count() or 1)


def default_threads(sample_s: float = 0.1) -> int | None:
    """Threads for a CPU protection: the cores not busy with other work now, at least 1; None = keep torch's own
    default (OMP_NUM_THREADS is set, or the load cannot be read). Measured on a 2-core Xeon: idle, 2 threads were
    1.6x faster than 1; with another process keeping one core busy, 2 threads were 8-10x slower than 1 (OpenMP
    threads wait for the one that shares its core), so a busy core must not get a thread."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    busy = busy_cores(sample_s)
    if busy is None:
        return None
    return max(1, min(cpu_cores(), int(cpu_cores() - busy + 0.5)))
