"""Domain errors and their translation to gRPC status codes with ``google.rpc`` details.

Domain code raises a :class:`MawError` built with one of the helpers below; the error interceptor (or
``abort``) turns it into a status whose trailing ``grpc-status-details-bin`` carries the details, so
clients in any language can read which field was wrong, which precondition failed, which resource
was missing, or how long to wait before retrying.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass
class MawError(Exception):
    """An error meant for the caller: a status code, a message and structured details."""

    code: grpc.StatusCode
    message: str
    details: Sequence[Message] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def to_status(self) -> status_pb2.Status:
        """The ``google.rpc.Status`` carried in the trailers."""
        packed = []
        for detail in self.details:
            any_msg = any_pb2.Any()
            any_msg.Pack(detail)
            packed.append(any_msg)
        return status_pb2.Status(code=status_code_number(self.code), message=self.message, details=packed)

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        """Metadata to send with the status so clients can unpack the details."""
        return ((STATUS_DETAILS_KEY, self.to_status().SerializeToString()),)


def invalid_argument(violations: Iterable[tuple[str, str]], message: str = "") -> MawError:
    """INVALID_ARGUMENT naming each bad field (``field.path``, what is wrong with it)."""
    items = list(violations)
    bad_request = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in items]
    )
    text = message or "; ".join(f"{f}: {d}" for f, d in items) or "invalid argument"
    return MawError(grpc.StatusCode.INVALID_ARGUMENT, text, (bad_request,))


def not_found(resource_type: str, name: str) -> MawError:
    """NOT_FOUND for one resource, with ResourceInfo."""
    info = error_details_pb2.ResourceInfo(resource_type=resource_type, resource_name=name)
    return MawError(grpc.StatusCode.NOT_FOUND, f"{resource_type} {name!r} not found", (info,))


def already_exists(resource_type: str, name: str) -> MawError:
    """ALREADY_EXISTS for one resource, with ResourceInfo."""
    info = error_details_pb2.ResourceInfo(resource_type=resource_type, resource_name=name)
    return MawError(grpc.StatusCode.ALREADY_EXISTS, f"{resource_type} {name!r} already exists", (info,))


def failed_precondition(violation_type: str, subject: str, description: str) -> MawError:
    """FAILED_PRECONDITION with one PreconditionFailure violation (e.g. type STALE_ATTEMPT)."""
    failure = error_details_pb2.PreconditionFailure(
        violations=[
            error_details_pb2.PreconditionFailure.Violation(
                type=violation_type, subject=subject, description=description
            )
        ]
    )
    return MawError(grpc.StatusCode.FAILED_PRECONDITION, description, (failure,))


def permission_denied(message: str, reason: str = "", domain: str = "maw") -> MawError:
    """PERMISSION_DENIED; ``reason`` is a stable machine-readable word for clients."""
    details: tuple[Message, ...] = ()
    if reason:
        details = (error_details_pb2.ErrorInfo(reason=reason, domain=domain),)
    return MawError(grpc.StatusCode.PERMISSION_DENIED, message, details)


def unauthenticated(message: str, reason: str = "") -> MawError:
    """UNAUTHENTICATED: no credential, or one that is not (or no longer) valid."""
    details: tuple[Message, ...] = ()
    if reason:
        details = (error_details_pb2.ErrorInfo(reason=reason, domain="maw"),)
    return MawError(grpc.StatusCode.UNAUTHENTICATED, message, details)


def resource_exhausted(message: str, retry_after_s: float) -> MawError:
    """RESOURCE_EXHAUSTED with RetryInfo telling the caller when to try again."""
    seconds = max(retry_after_s, 0.0)
    delay = duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))
    return MawError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, (error_details_pb2.RetryInfo(retry_delay=delay),))


def unavailable(message: str, retry_after_s: float = 1.0) -> MawError:
    """UNAVAILABLE (a dependency is down) with RetryInfo."""
    err = resource_exhausted(message, retry_after_s)
    return MawError(grpc.StatusCode.UNAVAILABLE, message, err.details)


def status_code_number(code: grpc.StatusCode) -> int:
    """The numeric value of a status code, as used in ``google.rpc.Status.code``."""
    number: int = code.value[0]
    return number


def details_from_trailers(metadata: Iterable[tuple[str, str | bytes]] | None) -> status_pb2.Status | None:
    """Parse the rich status from trailing metadata, if present (used by tests and clients)."""
    for key, value in metadata or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


__all__ = [
    "MawError",
    "already_exists",
    "details_from_trailers",
    "failed_precondition",
    "invalid_argument",
    "not_found",
    "permission_denied",
    "resource_exhausted",
    "status_code_number",
    "unauthenticated",
    "unavailable",
]
