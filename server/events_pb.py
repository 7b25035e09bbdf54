"""The scheduler's plain events and states (server.events) as cloak.v1 messages and gRPC status codes: the only
place they are translated. Each table covers its whole enum (the tests check that none is missing)."""

from __future__ import annotations

import grpc

from . import events, wire
from .events import ErrorKind, JobState, ServingState
from .gen import cloak_service_pb2 as pb

JOB_STATES: dict[JobState, int] = {
    JobState.QUEUED: pb.JOB_STATE_QUEUED,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
}
SERVING_STATES: dict[ServingState, int] = {
    ServingState.LOADING: pb.SERVING_STATE_LOADING,
    ServingState.SERVING: pb.SERVING_STATE_SERVING,
    ServingState.DRAINING: pb.SERVING_STATE_DRAINING,
    ServingState.FAILED: pb.SERVING_STATE_UNSPECIFIED,  # the models could not be loaded
}
STATUS_CODES: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def job_state(state: JobState) -> int:
    """A cloak.v1.JobState value."""
    return JOB_STATES[state]


def serving_state(state: ServingState) -> int:
    """A cloak.v1.ServingState value."""
    return SERVING_STATES[state]


def status_code(kind: ErrorKind) -> grpc.StatusCode:
    return STATUS_CODES[kind]


def job_event(job_id: str, event: events.Event) -> pb.JobEvent:
    """The JobEvent of an accepted, queued, started or progress event."""
    if isinstance(event, events.Accepted):
        return pb.JobEvent(job_id=job_id, accepted=pb.Accepted(
            queue_position=event.position, frames=event.frames, sample_rate=event.sample_rate,
            channels=event.channels, estimated_seconds=event.estimated_seconds))
    if isinstance(event, events.Queued):
        return pb.JobEvent(job_id=job_id, queued=pb.Queued(queue_position=event.position,
                                                           models_loading=event.models_loading))
    if isinstance(event, events.Started):
        return pb.JobEvent(job_id=job_id, started=pb.Started(windows=event.windows, iterations=event.iterations,
                                                             queued_seconds=event.queued_seconds))
    if isinstance(event, events.ProgressEvent):
        return pb.JobEvent(job_id=job_id, progress=pb.JobProgress(
            window=event.window, windows=event.windows, iteration=event.iteration, iterations=event.iterations,
            losses=event.losses, elapsed_seconds=event.elapsed_seconds, eta_seconds=event.eta_seconds,
            fraction=event.fraction))
    raise TypeError(f"{type(event).__name__} is no JobEvent of its own (the result and the error are streamed "
                    "as chunks and a done event, or as the call's status)")


def done_event(job_id: str, done: events.Done) -> pb.JobEvent:
    m = done.metrics
    metrics = pb.JobMetrics(
        snr_db=m.snr_db, linf=m.linf, warning=m.warning, losses_start=m.losses_start, losses_end=m.losses_end,
        iterations=m.iterations, windows=m.windows, seconds=m.seconds, queued_seconds=m.queued_seconds,
        gender=m.gender, opposite_speaker=m.opposite_speaker, model=m.model,
        settings=wire.config_to_settings(m.config), details_json=m.details_json)
    return pb.JobEvent(job_id=job_id, done=pb.Done(sha256=done.sha256, frames=done.frames,
                                                   encoding=wire.ENCODING_ENUM[done.encoding], metrics=metrics))


def job_status(status: events.JobStatus) -> pb.JobStatus:
    st = pb.JobStatus(job_id=status.job_id, state=job_state(status.state), queue_position=status.queue_position,
                      fraction=status.fraction, error=status.error)
    if status.expires_in_seconds is not None:
        st.expires_in_seconds = status.expires_in_seconds
    return st
