"""Domain errors become gRPC statuses whose google.rpc details clients can read."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2

from services.runtime import errors


def _unpack(err: errors.MawError, detail_type: type) -> list:  # type: ignore[type-arg]
    status = errors.details_from_trailers(err.trailing_metadata())
    assert status is not None
    assert status.code == err.code.value[0]
    out = []
    for any_msg in status.details:
        msg = detail_type()
        if any_msg.Unpack(msg):
            out.append(msg)
    return out


def test_invalid_argument_names_every_bad_field() -> None:
    err = errors.invalid_argument([("task.description", "must not be empty"), ("task.priority", "unknown value 9")])
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    [bad] = _unpack(err, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("task.description", "must not be empty"),
        ("task.priority", "unknown value 9"),
    ]
    assert "task.description" in err.message


def test_not_found_carries_the_resource() -> None:
    err = errors.not_found("maw.scheduler.v1.Task", "tasks/42")
    [info] = _unpack(err, error_details_pb2.ResourceInfo)
    assert (info.resource_type, info.resource_name) == ("maw.scheduler.v1.Task", "tasks/42")
    assert err.code == grpc.StatusCode.NOT_FOUND


def test_failed_precondition_carries_a_typed_violation() -> None:
    err = errors.failed_precondition("STALE_ATTEMPT", "tasks/1/subtasks/2", "attempt 1 was superseded by attempt 2")
    [failure] = _unpack(err, error_details_pb2.PreconditionFailure)
    assert failure.violations[0].type == "STALE_ATTEMPT"
    assert failure.violations[0].subject == "tasks/1/subtasks/2"


def test_resource_exhausted_says_when_to_retry() -> None:
    err = errors.resource_exhausted("slow down", 2.5)
    [retry] = _unpack(err, error_details_pb2.RetryInfo)
    assert (retry.retry_delay.seconds, retry.retry_delay.nanos) == (2, 500_000_000)


def test_unavailable_keeps_its_own_code_and_retry_info() -> None:
    err = errors.unavailable("postgres is down", 1.0)
    assert err.code == grpc.StatusCode.UNAVAILABLE
    [retry] = _unpack(err, error_details_pb2.RetryInfo)
    assert retry.retry_delay.seconds == 1


def test_trailers_without_details_parse_to_none() -> None:
    assert errors.details_from_trailers([("other", b"x")]) is None
    assert errors.details_from_trailers(None) is None
