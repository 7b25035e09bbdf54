"""The fair bounded queue's order: round-robin between clients (identities), each client's jobs first in, first
out, and the fair share of the running slots."""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

from .jobs import JobRecord


class FairQueue:
    """Round-robin between clients: each client's jobs are FIFO; the client served last goes to the back."""

    def __init__(self) -> None:
        self._q: OrderedDict[str, deque[JobRecord]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(d) for d in self._q.values())

    def push(self, rec: JobRecord) -> None:
        self._q.setdefault(rec.client, deque()).append(rec)

    def clients(self) -> list[str]:
        return list(self._q)

    def pop(self, prefer: Callable[[str], bool] | None = None) -> JobRecord | None:
        """The next job: from the first client in turn for whom `prefer` holds, else from the first in turn."""
        if not self._q:
            return None
        client = next((c for c in self._q if prefer(c)), None) if prefer is not None else None
        if client is None:
            client = next(iter(self._q))
        dq = self._q[client]
        rec = dq.popleft()
        del self._q[client]
        if dq:
            self._q[client] = dq
        return rec

    def remove(self, rec: JobRecord) -> bool:
        dq = self._q.get(rec.client)
        if dq is None or rec not in dq:
            return False
        dq.remove(rec)
        if not dq:
            del self._q[rec.client]
        return True

    def order(self) -> list[JobRecord]:
        """Jobs in the order they will start."""
        lanes = [list(d) for d in self._q.values()]
        out: list[JobRecord] = []
        for i in range(max((len(lane) for lane in lanes), default=0)):
            out += [lane[i] for lane in lanes if i < len(lane)]
        return out

    def drain(self) -> list[JobRecord]:
        out = self.order()
        self._q.clear()
        return out


def fair_share(running: Iterable[JobRecord], waiting: Iterable[str], paused: Iterable[JobRecord],
               max_batch: int) -> tuple[dict[str, int], int]:
    """(running slots per identity, the fair share): ceil(max_batch / identities with running, paused or waiting
    jobs)."""
    counts: dict[str, int] = {}
    for r in running:
        counts[r.client] = counts.get(r.client, 0) + 1
    identities = set(counts) | set(waiting) | {r.client for r in paused}
    return counts, math.ceil(max_batch / max(1, len(identities)))
