"""What the servicer's streams share: who a peer is, the caps on open streams, and a request stream read in its own
thread (so that a handler can wait for the next message with a timeout)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc


def peer_host(peer: str) -> str:
    """'ipv4:127.0.0.1:5555' -> '127.0.0.1' (the client identity for fair queueing when none is named)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer or "unknown"


class Gone(Exception):
    """The client cancelled the call or went away."""


class Once:
    """Call `fn` at most once (from a handler's finally and a gRPC termination callback alike)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn: Callable[[], Any] | None = fn
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            fn, self._fn = self._fn, None
        if fn is not None:
            fn()


class Reader:
    """Reads a request stream in its own thread, so that the handler can wait for the next message with a
    timeout (a blocking request iterator has none). At most `depth` messages (<= 1 MiB each) wait in between."""

    def __init__(self, requests: Iterator[Any], depth: int = 4) -> None:
        self._q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._requests = requests
        self._thread = threading.Thread(target=self._run, name="cloak-upload-reader", daemon=True)
        self._thread.start()

    def _put(self, item: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for msg in self._requests:
                if not self._put(("msg", msg)):
                    return
            self._put(("end", None))
        except grpc.RpcError:
            self._put(("gone", None))
        except Exception as e:  # noqa: BLE001 - handed to the handler thread
            self._put(("error", e))

    def get(self, timeout: float) -> tuple[str, Any]:
        try:
            return self._q.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return "wait", None

    def stop(self) -> None:
        self._stop.set()


class StreamCaps:
    """Counts open streams: Protect in all, Attach in all, per job and per identity. Every open stream holds a
    thread of the stream pool, so these caps (and a pool sized to them) keep threads free for everything else."""

    def __init__(self, max_protect: int, max_attach: int, per_job: int, per_client: int,
                 protect_per_client: int | None = None) -> None:
        self.max_protect, self.max_attach, self.per_job, self.per_client = max_protect, max_attach, per_job, per_client
        # one identity may hold about half of the Protect streams, so another one can always upload
        self.protect_per_client = protect_per_client or max(4, max_protect // 2)
        self._lock = threading.Lock()
        self.protect = 0
        self.protect_by_client: dict[str, int] = {}
        self.attach = 0
        self.by_job: dict[str, int] = {}
        self.by_client: dict[str, int] = {}

    def enter_protect(self, client: str) -> str:
        """'' when admitted, else why not."""
        with self._lock:
            if self.protect_by_client.get(client, 0) >= self.protect_per_client:
                return f"{client} already has {self.protect_per_client} open Protect streams"
            if self.protect >= self.max_protect:
                return f"the server has {self.max_protect} open Protect streams"
            self.protect += 1
            self.protect_by_client[client] = self.protect_by_client.get(client, 0) + 1
            return ""

    def leave_protect(self, client: str) -> None:
        with self._lock:
            self.protect -= 1
            self.protect_by_client[client] -= 1
            if not self.protect_by_client[client]:
                del self.protect_by_client[client]

    def enter_attach(self, job_id: str, client: str) -> str:
        """'' when admitted, else why not."""
        with self._lock:
            if self.by_job.get(job_id, 0) >= self.per_job:
                return f"this job already has {self.per_job} open Attach streams (--max-attach-per-job)"
            if self.by_client.get(client, 0) >= self.per_client:
                return f"{client} already has {self.per_client} open Attach streams (--max-attach-per-client)"
            if self.attach >= self.max_attach:
                return f"the server has {self.max_attach} open Attach streams (--max-attach)"
            self.attach += 1
            self.by_job[job_id] = self.by_job.get(job_id, 0) + 1
            self.by_client[client] = self.by_client.get(client, 0) + 1
            return ""

    def leave_attach(self, job_id: str, client: str) -> None:
        with self._lock:
            self.attach -= 1
            for d, k in ((self.by_job, job_id), (self.by_client, client)):
                d[k] -= 1
                if not d[k]:
                    del d[k]

    @property
    def threads(self) -> int:
        """Stream-pool threads: one per stream the caps allow, and spares that turn the rest away at once."""
        return self.max_protect + self.max_attach + 8
