"""server.events_pb: every state and error kind of the scheduler has its cloak.v1 / gRPC counterpart, and the
events translate to the messages the wire has always carried."""

from __future__ import annotations

import json

import grpc
import pytest

from cloak import ProtectConfig
from server import events_pb, wire
from server.events import (
    Accepted,
    Done,
    Ended,
    ErrorKind,
    JobState,
    JobStatus,
    ProgressEvent,
    Queued,
    ResultMetrics,
    ServingState,
    Started,
    Succeeded,
)
from server.gen import cloak_service_pb2 as pb


def test_every_job_state_has_its_wire_state():
    assert set(events_pb.JOB_STATES) == set(JobState), "a JobState without a cloak.v1.JobState"
    for state in JobState:
        value = events_pb.job_state(state)
        assert pb.JobState.Name(value) == f"JOB_STATE_{state.name}"
        assert value == state  # numbered alike (records compare equal to the wire's states)


def test_every_serving_state_has_its_wire_state():
    assert set(events_pb.SERVING_STATES) == set(ServingState), "a ServingState without a cloak.v1.ServingState"
    assert len(set(events_pb.SERVING_STATES.values())) == len(ServingState)
    for state in ServingState:
        pb.ServingState.Name(events_pb.serving_state(state))  # a value the enum has
    assert events_pb.serving_state(ServingState.FAILED) == pb.SERVING_STATE_UNSPECIFIED


def test_every_error_kind_has_its_status_code():
    assert set(events_pb.STATUS_CODES) == set(ErrorKind), "an ErrorKind without a gRPC status code"
    for kind in ErrorKind:
        code = events_pb.status_code(kind)
        assert isinstance(code, grpc.StatusCode) and code.name == kind.name  # the logs' code= is the same


def test_events_translate_to_job_events():
    ev = events_pb.job_event("j1", Accepted(3, 16000, 16000, 2, None))
    assert ev.job_id == "j1" and ev.WhichOneof("kind") == "accepted"
    assert (ev.accepted.queue_position, ev.accepted.frames, ev.accepted.sample_rate, ev.accepted.channels) == \
        (3, 16000, 16000, 2)
    assert not ev.accepted.HasField("estimated_seconds")
    assert events_pb.job_event("j1", Accepted(1, 1, 8000, 1, 2.5)).accepted.estimated_seconds == 2.5
    assert events_pb.job_event("j1", Queued(2, True)).queued == pb.Queued(queue_position=2, models_loading=True)
    assert events_pb.job_event("j1", Started(4, 50, 1.5)).started == pb.Started(windows=4, iterations=50,
                                                                                 queued_seconds=1.5)
    p = events_pb.job_event("j1", ProgressEvent(1, 4, 7, 50, {"id": 0.5}, 3.0, 9.0, 0.3)).progress
    assert p == pb.JobProgress(window=1, windows=4, iteration=7, iterations=50, losses={"id": 0.5},
                               elapsed_seconds=3.0, eta_seconds=9.0, fraction=0.3)
    ended = Ended(JobState.CANCELLED, ErrorKind.CANCELLED, "x")
    for no_event in (ended, Succeeded(b"", _done())):
        with pytest.raises(TypeError):
            events_pb.job_event("j1", no_event)


def _done(warning: str = "") -> Done:
    cfg = ProtectConfig(seed=4)
    metrics = ResultMetrics(snr_db=30.0, linf=0.002, warning=warning, losses_start={"id": 1.0},
                            losses_end={"id": 0.5}, iterations=50, windows=1, seconds=2.0, queued_seconds=0.5,
                            gender="male", opposite_speaker="p225", model="m", config=cfg,
                            details_json=json.dumps({"linf": 0.002}))
    return Done(sha256="ab" * 32, frames=16000, encoding="int16", metrics=metrics)


def test_done_and_status_translate():
    ev = events_pb.done_event("j2", _done())
    assert ev.job_id == "j2" and ev.WhichOneof("kind") == "done"
    d = ev.done
    assert d.sha256 == "ab" * 32 and d.frames == 16000 and d.encoding == pb.SAMPLE_ENCODING_INT16
    assert d.metrics.settings == wire.config_to_settings(ProtectConfig(seed=4))
    assert d.metrics.snr_db == 30.0 and d.metrics.losses_end == {"id": 0.5} and d.metrics.opposite_speaker == "p225"
    assert json.loads(d.metrics.details_json) == {"linf": 0.002}
    st = events_pb.job_status(JobStatus("j3", JobState.FAILED, 0, 0.25, "boom", 12.0))
    assert st == pb.JobStatus(job_id="j3", state=pb.JOB_STATE_FAILED, fraction=0.25, error="boom",
                              expires_in_seconds=12.0)
    assert events_pb.job_status(JobStatus("j4", JobState.QUEUED, 2, 0.0, "", None)).expires_in_seconds == 0
