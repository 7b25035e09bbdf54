"""The scheduler's side on its own: the fair queue, and a Scheduler running jobs on the tiny test models, followed
through its plain events (server.events). Nothing here, and nothing the scheduler's modules import, knows gRPC or
protobuf: a static check of their imports says so."""

from __future__ import annotations

import ast
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import corpus_clip
from test_server_helpers import one_torch_thread  # noqa: F401 - autouse: bit-identity holds with one thread

from cloak import ProtectConfig, protect
from server import codec
from server.config import ServerConfig
from server.events import (
    Accepted,
    Ended,
    ErrorKind,
    Event,
    JobState,
    ProgressEvent,
    Queued,
    ServingState,
    Started,
    Succeeded,
)
from server.fairqueue import FairQueue, fair_share
from server.jobs import JobRecord, Subscription
from server.metrics import Metrics
from server.scheduler import NotAccepting, Scheduler
from server.upload import Upload

SERVER = Path(__file__).resolve().parents[1] / "server"
# the queue, the job records, the scheduler and everything they use
SCHEDULER_SIDE = ("server.scheduler", "server.jobs", "server.fairqueue", "server.worker", "server.events",
                  "server.upload", "server.codec", "server.memory")
FORBIDDEN = ("grpc", "grpc_status", "grpc_health", "grpc_reflection", "google.protobuf", "google.rpc", "server.gen")
FAST = dict(iterations=2, repeats=1, t_adv=2, source_frames=32, gender="male")


# ------------------------------------------------------------------------------------------ import check
def _source(module: str) -> Path | None:
    """The file of a server module (None for a name that is no module of server/, e.g. a class)."""
    rel = module.split(".")[1:]
    if not rel:
        return SERVER / "__init__.py"
    for path in (SERVER.joinpath(*rel).with_suffix(".py"), SERVER.joinpath(*rel, "__init__.py")):
        if path.is_file():
            return path
    return None


def _imports(path: Path) -> set[str]:
    """Every name an import statement in `path` (anywhere in it) names, relative ones made absolute; for
    `from X import a` both X and X.a (a may be a submodule)."""
    package = ".".join(("server", *path.relative_to(SERVER).parent.parts))
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def reached_imports(modules: tuple[str, ...]) -> dict[str, str]:
    """{imported name: the server module importing it} over `modules` and, transitively, the server modules
    they import (server/__init__ included: importing a submodule runs it)."""
    seen: dict[str, str] = {}
    todo = [*modules, "server"]
    done: set[str] = set()
    while todo:
        module = todo.pop()
        path = _source(module)
        if module in done or path is None:
            continue
        done.add(module)
        for name in _imports(path):
            seen.setdefault(name, module)
            if name == "server" or name.startswith("server."):
                todo.append(name)
    return seen


def _forbidden(seen: dict[str, str]) -> dict[str, str]:
    return {name: by for name, by in seen.items() if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)}


def test_the_scheduler_side_imports_no_grpc_and_no_protobuf():
    bad = _forbidden(reached_imports(SCHEDULER_SIDE))
    assert not bad, f"imported on the scheduler's side (name: by module): {bad}"


def test_the_import_check_sees_the_servicer_side():
    """The check above is no empty one: from the servicer it reaches grpc and the generated code."""
    bad = _forbidden(reached_imports(("server.service",)))
    assert {"grpc", "server.gen"} <= set(bad), bad


# ------------------------------------------------------------------------------------------------ queue
class _Rec:
    def __init__(self, client: str, n: int) -> None:
        self.client, self.n = client, n


def test_fair_queue_round_robin_between_clients():
    q = FairQueue()
    for r in [_Rec("a", 1), _Rec("a", 2), _Rec("a", 3), _Rec("b", 1), _Rec("c", 1), _Rec("b", 2)]:
        q.push(r)  # type: ignore[arg-type]
    assert [(r.client, r.n) for r in q.order()] == [("a", 1), ("b", 1), ("c", 1), ("a", 2), ("b", 2), ("a", 3)]
    popped = [q.pop() for _ in range(6)]
    assert [(r.client, r.n) for r in popped] == [("a", 1), ("b", 1), ("c", 1), ("a", 2), ("b", 2), ("a", 3)]
    assert q.pop() is None and len(q) == 0


def test_fair_queue_prefers_and_removes():
    q = FairQueue()
    recs = [_Rec("a", 1), _Rec("a", 2), _Rec("b", 1)]
    for r in recs:
        q.push(r)  # type: ignore[arg-type]
    assert q.clients() == ["a", "b"]
    assert q.pop(lambda c: c == "b") is recs[2]  # b is below its share: it goes first
    assert q.remove(recs[1]) and not q.remove(recs[1])  # type: ignore[arg-type]
    assert q.drain() == [recs[0]] and len(q) == 0


def test_fair_share_of_the_running_slots():
    running = [_Rec("a", 1), _Rec("a", 2), _Rec("a", 3)]
    assert fair_share(running, [], [], 4) == ({"a": 3}, 4)  # alone: every slot
    assert fair_share(running, ["b"], [], 4) == ({"a": 3}, 2)
    assert fair_share(running[:1], ["b"], [_Rec("c", 1)], 4) == ({"a": 1}, 2)  # ceil(4 / 3)
    assert fair_share([], [], [], 4) == ({}, 4)


# ------------------------------------------------------------------------------------------- scheduler
@pytest.fixture(scope="module")
def clip() -> tuple[np.ndarray, int]:
    x, sr = corpus_clip(seconds=0.5)
    return x.astype(np.float32), sr


@contextmanager
def scheduler(models, **cfg) -> Iterator[Scheduler]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    sched = Scheduler(ServerConfig(**cfg), Metrics(), models)
    sched.start()
    try:
        yield sched
    finally:
        sched.stop()
        torch.set_num_threads(before)


def submit(sched: Scheduler, audio: np.ndarray, sr: int, client: str = "a", **kw) -> tuple[JobRecord, Subscription]:
    cfg = ProtectConfig(**{**FAST, **kw})
    up = Upload(sr, 1, audio.shape[0], "float32", codec.sha256_hex(codec.encode(audio, "float32")), cfg)
    rec = JobRecord(up, audio, client)
    sub = rec.subscribe()  # before submit, as the servicer does: every event is seen
    sched.reserve()
    sched.submit(rec)
    return rec, sub


def follow(sub: Subscription, timeout: float = 120.0, until: type | None = None) -> list[Event]:
    """Events until the job ends (or one of type `until` arrives)."""
    out: list[Event] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ev = sub.get(0.2)
        if ev is None:
            continue
        out.append(ev)
        if isinstance(ev, Succeeded | Ended) or (until is not None and isinstance(ev, until)):
            return out
    pytest.fail(f"no end within {timeout} s: {out}")


def test_a_job_runs_to_a_result_identical_to_local_protection(tiny_models, clip):
    audio, sr = clip
    with scheduler(tiny_models, max_batch=1) as sched:
        rec, sub = submit(sched, audio, sr, seed=3)
        events = follow(sub)
        status = rec.status(sched.cfg.result_ttl)
        assert sched.stats["succeeded"] == 1 and sched.sec_per_unit is not None
        assert sched.metrics.value("cloak_jobs_total", {"outcome": "succeeded"}) in (None, 1)
    kinds = [type(e) for e in events]
    assert kinds[:2] == [Accepted, Started] and kinds[-1] is Succeeded
    assert set(kinds[2:-1]) == {ProgressEvent}
    accepted, started = events[0], events[1]
    assert accepted == Accepted(1, audio.shape[0], sr, 1, None)
    assert started.windows == 1 and started.iterations == 2 and started.queued_seconds >= 0
    assert events[-2].fraction == 1.0 and set(events[-2].losses) == {"id", "ctx", "score", "sem"}
    result = events[-1]
    assert isinstance(result, Succeeded) and result.pcm == rec.result_pcm
    cfg = ProtectConfig(**{**FAST, "seed": 3})
    local = protect(audio, sr, tiny_models, cfg)
    assert np.array_equal(codec.decode(result.pcm, "float32", 1), local.audio)  # max_batch 1: bit-identical
    done = result.done
    assert done.sha256 == codec.sha256_hex(result.pcm) and done.frames == audio.shape[0] and done.encoding == "float32"
    m = done.metrics
    assert m.config == cfg and m.iterations == 2 and m.windows == 1 and not m.warning
    assert 0 < m.linf <= cfg.epsilon + 1e-7 and m.snr_db == pytest.approx(local.metrics["snr_db"])
    details = json.loads(m.details_json)
    assert set(details) == {"history", "config", "snr_db", "linf", "masking_exponents", "predicted_pesq"}
    assert details["masking_exponents"] == local.metrics["masking_exponents"]  # each window's shaping, as local
    assert rec.state == JobState.SUCCEEDED and status.state == JobState.SUCCEEDED and status.fraction == 1.0
    assert status.error == "" and status.expires_in_seconds is not None and status.expires_in_seconds > 0
    # a late subscriber gets the lifecycle again, the result last
    assert [type(e) for e in follow(rec.subscribe())] == [Accepted, Started, ProgressEvent, Succeeded]


def test_cancel_queued_and_running_jobs_and_stop(tiny_models, clip):
    audio, sr = clip
    with scheduler(tiny_models, max_batch=1) as sched:
        first, first_sub = submit(sched, audio, sr, iterations=5000)
        follow(first_sub, until=ProgressEvent)
        queued, queued_sub = submit(sched, audio, sr, client="b")
        second, second_sub = submit(sched, audio, sr, client="c", iterations=5000)
        assert sched.snapshot() == {"queue_depth": 2, "active_jobs": 1}
        # a queued job ends at once; the one behind it moves up and is told so
        assert sched.cancel(queued.id, "not wanted") == JobState.CANCELLED
        assert follow(queued_sub) == [Accepted(1, audio.shape[0], sr, 1, None),
                                      Ended(JobState.CANCELLED, ErrorKind.CANCELLED, "not wanted")]
        assert follow(second_sub, until=Queued)[-1] == Queued(1, False)
        # a running one at its next check; then the next job starts
        assert sched.cancel_record(first, "bye", wait=30) == JobState.CANCELLED
        assert follow(first_sub)[-1] == Ended(JobState.CANCELLED, ErrorKind.CANCELLED, "bye")
        assert first.job is None and first.samples is None and first.error is not None
        assert first.status(60).error == "bye"
        follow(second_sub, until=Started)
        last, last_sub = submit(sched, audio, sr, client="d")
        with pytest.raises(KeyError):
            sched.cancel("no-such-job", "x")
    # stop() ends the running job and the queued one alike
    for sub in (second_sub, last_sub):
        assert follow(sub)[-1] == Ended(JobState.FAILED, ErrorKind.UNAVAILABLE, "the server stopped")
    assert second.state == last.state == JobState.FAILED and not sched.accepting
    if sched.metrics.available:
        assert sched.metrics.value("cloak_jobs_total", {"outcome": "cancelled"}) == 2
        assert sched.metrics.value("cloak_jobs_total", {"outcome": "shutdown"}) == 2


def wait_until(pred, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.02)


def test_models_that_fail_to_load_end_the_queued_jobs(clip):
    audio, sr = clip
    states: list[ServingState] = []
    sched = Scheduler(ServerConfig(), Metrics())
    sched.on_state = states.append
    assert sched.serving_state == ServingState.LOADING and sched.accepting
    sched.start()
    try:
        rec, sub = submit(sched, audio, sr)
        assert follow(sub, until=Queued) == [Accepted(1, audio.shape[0], sr, 1, None), Queued(1, True)]

        def loader():
            raise OSError("no bundle here")

        sched.load(loader).join(10)
        assert follow(sub) == [Ended(JobState.FAILED, ErrorKind.UNAVAILABLE,
                                     "the server could not load its models: OSError: no bundle here")]
        wait_until(lambda: states == [ServingState.FAILED])
        assert sched.serving_state == ServingState.FAILED and not sched.accepting
        with pytest.raises(NotAccepting, match="could not load its models"):
            sched.reserve()
    finally:
        sched.stop()
