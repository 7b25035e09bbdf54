"""Prometheus metrics of one server (a private registry, so several servers can live in one process).

    cloak_queue_depth              jobs waiting (uploading or queued)
    cloak_active_jobs              jobs being protected
    cloak_jobs_total{outcome}      finished jobs: succeeded, failed, cancelled, rejected_invalid, rejected_busy, ...
    cloak_identity_jobs_total{identity,outcome}  the same per --tokens-file name
    cloak_memory_reserved_bytes    memory budget held by uploads and running jobs (of cloak_memory_budget_bytes)
    cloak_job_seconds{outcome}     accept -> end latency
    cloak_queue_wait_seconds       accept -> start
    cloak_pgd_iterations_total     job-iterations done (rate() = iterations/s over all jobs)
    cloak_pgd_steps_total          batched U-Net steps (iterations_total / steps_total = mean batch)
    cloak_batch_size               jobs per batched step
    cloak_device_memory_bytes      torch CUDA memory allocated, or the process's resident memory on CPU
"""

from __future__ import annotations

import os
from typing import Any

try:
    import prometheus_client as prom
except ImportError:  # optional: metrics are then counted nowhere
    prom = None  # type: ignore[assignment]

OUTCOMES = ("succeeded", "failed", "cancelled", "rejected_invalid", "rejected_busy", "rejected_deadline",
            "rejected_draining", "rejected_idle", "rejected_memory", "shutdown")


class _Null:
    def labels(self, *a: Any, **k: Any) -> _Null:
        return self

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def _rss_bytes() -> float:
    try:
        with open("/proc/self/statm") as f:
            return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return 0.0


class Metrics:
    def __init__(self, device: str = "cpu") -> None:
        self.available = prom is not None
        self.http: Any = None
        if prom is None:
            self.registry = None
            for name in ("queue_depth", "active_jobs", "jobs", "job_seconds", "queue_wait", "iterations", "steps",
                         "batch_size", "device_memory", "identity_jobs", "memory_reserved", "memory_budget"):
                setattr(self, name, _Null())
            return
        r = self.registry = prom.CollectorRegistry()
        self.queue_depth = prom.Gauge("cloak_queue_depth", "Jobs waiting (uploading or queued)", registry=r)
        self.active_jobs = prom.Gauge("cloak_active_jobs", "Jobs being protected", registry=r)
        self.jobs = prom.Counter("cloak_jobs", "Finished or rejected jobs by outcome", ["outcome"], registry=r)
        for o in OUTCOMES:
            self.jobs.labels(o)
        self.identity_jobs = prom.Counter("cloak_identity_jobs", "Finished jobs by identity (--tokens-file name) "
                                          "and outcome", ["identity", "outcome"], registry=r)
        self.memory_reserved = prom.Gauge("cloak_memory_reserved_bytes", "Memory budget held by uploads and "
                                          "running jobs", registry=r)
        self.memory_budget = prom.Gauge("cloak_memory_budget_bytes", "--memory-budget", registry=r)
        buckets = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
        self.job_seconds = prom.Histogram("cloak_job_seconds", "Job latency from accept to end", ["outcome"],
                                          buckets=buckets, registry=r)
        self.queue_wait = prom.Histogram("cloak_queue_wait_seconds", "Time from accept to start", buckets=buckets,
                                         registry=r)
        self.iterations = prom.Counter("cloak_pgd_iterations", "Job-iterations of PGD done", registry=r)
        self.steps = prom.Counter("cloak_pgd_steps", "Batched PGD steps (U-Net calls)", registry=r)
        self.batch_size = prom.Histogram("cloak_batch_size", "Jobs per batched PGD step",
                                         buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.device_memory = prom.Gauge("cloak_device_memory_bytes", "CUDA memory allocated by torch (GPU) or "
                                        "resident set size (CPU)", ["device"], registry=r)
        dev = str(device)
        if dev.startswith("cuda"):
            import torch

            self.device_memory.labels(dev).set_function(lambda: float(torch.cuda.memory_allocated(dev)))
        else:
            self.device_memory.labels(dev).set_function(_rss_bytes)

    def serve_http(self, port: int, addr: str = "127.0.0.1", certfile: str | None = None,
                   keyfile: str | None = None) -> int:
        """Expose /metrics over HTTP (HTTPS with certfile/keyfile); returns the bound port."""
        if prom is None:
            raise RuntimeError("--metrics-port needs prometheus-client (pip install 'voicecloak[server]')")
        httpd, _ = prom.start_http_server(port, addr=addr, registry=self.registry, certfile=certfile,
                                          keyfile=keyfile)
        self.http = httpd
        return int(httpd.server_address[1])

    def close(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None

    def text(self) -> str:
        return "" if prom is None else prom.generate_latest(self.registry).decode()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """A sample's current value (for tests and the benchmark)."""
        if self.registry is None:
            return None
        return self.registry.get_sample_value(name, labels or {})
