"""The cloak.v1 error contract: rich gRPC statuses (a google.rpc.Status in the `grpc-status-details-bin` trailer).

    INVALID_ARGUMENT    google.rpc.BadRequest, one field violation per bad field, `field` a path of proto field
                        names from the request message ("header.settings.epsilon", "pcm", "job_id")
    RESOURCE_EXHAUSTED  google.rpc.RetryInfo + google.rpc.ErrorInfo (domain "cloak.v1", an ErrorReason name);
                        one WITHOUT details is gRPC's own message-size limit, which must not be retried
    DEADLINE_EXCEEDED   ErrorInfo ERROR_REASON_DEADLINE_TOO_SHORT (refused up front) or ERROR_REASON_UPLOAD_IDLE

The validators (server.pcm, server.wire, cloak.ProtectConfig) raise InvalidInput whose message starts with the
field it is about, in the short form of the messages ("settings.epsilon must be ...", "header.frames: ...",
"pcm chunk 3 ..."); `field_paths` turns that into the full path. A raise that knows its path better says so
with FieldError.
"""

from __future__ import annotations

import math
import re

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from .gen import cloak_service_pb2 as pb
from .pcm import InvalidInput

DOMAIN = "cloak.v1"
# the short forms of the validators' messages, at their start: settings.x lives in the ProtectHeader
_LEADING_FIELD = re.compile(r"(header|settings|pcm|job_id|result_offset)((?:\.[a-z_][a-z0-9_]*|\[\d+\])*)")
_SPECIAL = (("sha256 mismatch", "header.sha256"), ("the stream ended after", "pcm"))


class FieldError(InvalidInput):
    """InvalidInput that names its field paths itself (full paths from the request message)."""

    def __init__(self, message: str, *paths: str) -> None:
        super().__init__(message)
        self.paths = list(paths)


def field_paths(e: Exception) -> list[str]:
    """The request fields an InvalidInput is about, as proto field paths from the Protect request message."""
    paths = getattr(e, "paths", None)
    if paths:
        return list(paths)
    message = str(e)
    for prefix, path in _SPECIAL:
        if message.startswith(prefix):
            return [path]
    m = _LEADING_FIELD.match(message)
    if m is None:
        return ["header"]  # every unprefixed message of the validators is about the header as a whole
    path = m.group(0)
    return ["header." + path if path.startswith("settings") else path]


def _status(code: grpc.StatusCode, message: str, details: list[Message]) -> grpc.Status:
    st = status_pb2.Status(code=code.value[0], message=message)
    for d in details:
        st.details.add().Pack(d)
    return rpc_status.to_status(st)


def error_info(reason: int, **metadata: object) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=pb.ErrorReason.Name(reason), domain=DOMAIN,
                                       metadata={k: str(v) for k, v in metadata.items()})


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    seconds = max(0.0, seconds) if math.isfinite(seconds) else 5.0
    whole = int(seconds)
    return error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=whole,
                                                                         nanos=int((seconds - whole) * 1e9)))


def exhausted(message: str, retry_after: float, reason: int, **metadata: object) -> grpc.Status:
    """RESOURCE_EXHAUSTED that a client retries after `retry_after` s (RetryInfo) and can tell apart (ErrorInfo)."""
    return _status(grpc.StatusCode.RESOURCE_EXHAUSTED, message,
                   [retry_info(retry_after), error_info(reason, **metadata)])


def with_reason(code: grpc.StatusCode, message: str, reason: int, **metadata: object) -> grpc.Status:
    return _status(code, message, [error_info(reason, **metadata)])


def bad_request(message: str, paths: list[str], reason: int | None = None, **metadata: object) -> grpc.Status:
    """INVALID_ARGUMENT with a google.rpc.BadRequest naming each field (the message describes them all)."""
    violations = [error_details_pb2.BadRequest.FieldViolation(field=p, description=message) for p in paths]
    details: list[Message] = [error_details_pb2.BadRequest(field_violations=violations)]
    if reason is not None:
        details.append(error_info(reason, **metadata))
    return _status(grpc.StatusCode.INVALID_ARGUMENT, message, details)


def invalid(e: Exception) -> grpc.Status:
    return bad_request(str(e), field_paths(e))
