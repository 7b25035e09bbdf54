"""What happens to a job, in the scheduler's own terms: job and serving states, why a job ended, the events its
streams follow and the status GetJob reports. Plain Python: the servicer alone (server.events_pb) turns these
into cloak.v1 messages and gRPC status codes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cloak import ProtectConfig


class JobState(enum.IntEnum):
    # the numbers are cloak.v1.JobState's, so that a logged state reads the same as the wire's; server.events_pb
    # still maps each state explicitly
    QUEUED = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5


TERMINAL = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class ServingState(enum.Enum):
    LOADING = "loading"  # models are loading: jobs queue
    SERVING = "serving"
    DRAINING = "draining"  # shutting down: no new jobs
    FAILED = "failed"  # the models could not be loaded: no new jobs


class ErrorKind(enum.Enum):
    """Why a job did not succeed. The names are those of the gRPC status codes the servicer answers with (and
    that the logs show as `code=`)."""

    CANCELLED = "cancelled"  # by its client (Cancel, a dropped call or a passed deadline)
    UNAVAILABLE = "unavailable"  # the server stopped, drained or could not load its models
    FAILED_PRECONDITION = "failed_precondition"  # the model bundle lacks what the job needs
    INTERNAL = "internal"  # a failure while running the job


# --- events, in the order a stream sees them ---------------------------------------------------------------
@dataclass(frozen=True)
class Accepted:
    position: int  # 1 = next to start
    frames: int
    sample_rate: int
    channels: int
    estimated_seconds: float | None


@dataclass(frozen=True)
class Queued:
    """The job's place in the queue changed, or the models are still loading."""

    position: int
    models_loading: bool


@dataclass(frozen=True)
class Started:
    """The job left the queue; its windows are planned."""

    windows: int
    iterations: int  # per window
    queued_seconds: float


@dataclass(frozen=True)
class ProgressEvent:
    window: int  # 0-based
    windows: int
    iteration: int  # 1-based, within the window
    iterations: int
    losses: dict[str, float]
    elapsed_seconds: float
    eta_seconds: float
    fraction: float  # of the whole job


@dataclass(frozen=True)
class ResultMetrics:
    snr_db: float  # 0 when warning is set
    linf: float
    warning: str
    losses_start: dict[str, float]
    losses_end: dict[str, float]
    iterations: int
    windows: int
    seconds: float  # protection time (after leaving the queue)
    queued_seconds: float
    gender: str
    opposite_speaker: str
    model: str
    config: ProtectConfig  # the effective settings
    details_json: str


@dataclass(frozen=True)
class Done:
    """The summary of a delivered result."""

    sha256: str  # of the output PCM bytes
    frames: int
    encoding: str  # a server.codec encoding name
    metrics: ResultMetrics


@dataclass(frozen=True)
class Succeeded:
    """The output PCM (in the upload's encoding) and its summary."""

    pcm: bytes
    done: Done


@dataclass(frozen=True)
class Ended:
    """The job ended without a result."""

    state: JobState  # FAILED or CANCELLED
    kind: ErrorKind
    message: str


Event = Accepted | Queued | Started | ProgressEvent | Succeeded | Ended


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: JobState
    queue_position: int
    fraction: float
    error: str  # why it failed or was cancelled
    expires_in_seconds: float | None  # finished jobs: how long the result stays available
