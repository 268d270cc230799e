"""Domain errors that become clear gRPC statuses, with google.rpc rich details.

Handlers raise these; the server bootstrap's interceptor turns them into
INVALID_ARGUMENT (with BadRequest field violations), NOT_FOUND, ALREADY_EXISTS,
FAILED_PRECONDITION, UNAUTHENTICATED, PERMISSION_DENIED, UNAVAILABLE or
RESOURCE_EXHAUSTED (with RetryInfo). Anything else is logged and becomes INTERNAL.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


# google.rpc.ErrorInfo.domain of every error this project raises (AIP-193).
ERROR_DOMAIN = "coursesignup"


class ServiceError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    # The ErrorInfo reason when a raise site names none (each site should name its own).
    default_reason = "INTERNAL_ERROR"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        # UPPER_SNAKE_CASE, stable: what a client program switches on (google.rpc.ErrorInfo).
        self.reason = reason or self.default_reason
        self.metadata = metadata or {}

    def details(self) -> list[any_pb2.Any]:
        return []

    def to_status_proto(self) -> status_pb2.Status:
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata))
        details = [*self.details(), packed]  # after the specific ones: clients reading the first keep working
        return status_pb2.Status(
            code=getattr(code_pb2, self.code.name),
            message=self.message,
            details=details,
        )


class RelayedError(ServiceError):
    """An error another service of the mesh answered, passed on to the caller as it came
    (status, message and details: a BadRequest naming the field, the ErrorInfo reason)."""

    def __init__(self, status: status_pb2.Status) -> None:
        reason = ""
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason = info.reason
        super().__init__(status.message, reason=reason or None)
        self.status = status
        self.code = grpc.StatusCode[code_pb2.Code.Name(status.code)]

    def to_status_proto(self) -> status_pb2.Status:
        return self.status


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: list[FieldViolation]) -> None:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        fields = [v.field for v in violations]
        # A filter or a page token a program can tell apart from any other bad field.
        reason = ("INVALID_FILTER" if fields == ["filter"] else "INVALID_PAGE_TOKEN" if fields == ["page_token"]
                  else "FIELD_INVALID")
        super().__init__(f"invalid argument: {summary}", reason=reason, metadata={"fields": ",".join(fields)})
        self.violations = violations

    @classmethod
    def single(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)])

    def details(self) -> list[any_pb2.Any]:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        return [packed]


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "RESOURCE_NOT_FOUND"


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "RESOURCE_ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Unauthenticated(ServiceError):
    """The call carries no credentials where it needs some."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "ADMIN_TOKEN_REQUIRED"


class PermissionDenied(ServiceError):
    """The call's credentials do not allow it."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


def _retry_info(seconds: float) -> any_pb2.Any:
    retry_info = error_details_pb2.RetryInfo()
    retry_info.retry_delay.FromMilliseconds(round(seconds * 1000))
    packed = any_pb2.Any()
    packed.Pack(retry_info)
    return packed


class Unavailable(ServiceError):
    """Not now, nothing done: the client should retry after `retry_delay_seconds` (RetryInfo)."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "SERVICE_UNAVAILABLE"

    def __init__(self, message: str, retry_delay_seconds: float = 1.0, *, reason: str | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_delay_seconds = retry_delay_seconds

    def details(self) -> list[any_pb2.Any]:
        return [_retry_info(self.retry_delay_seconds)]


class ResourceExhausted(ServiceError):
    """Too much load right now: the client should retry after `retry_delay_seconds` (RetryInfo)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "OVERLOADED"

    def __init__(self, message: str, retry_delay_seconds: float, *, reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.retry_delay_seconds = retry_delay_seconds

    def details(self) -> list[any_pb2.Any]:
        return [_retry_info(self.retry_delay_seconds)]


class DeadlineExceeded(ServiceError):
    """The outcome is unknown: the work may or may not have been done by the caller's
    deadline. Retrying with the same idempotency key is safe."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "OUTCOME_UNKNOWN"


def status_for(code: grpc.StatusCode, message: str, reason: str) -> status_pb2.Status:
    """A status for an error that is not a ServiceError (raised by the server itself),
    with its ErrorInfo like every other."""
    packed = any_pb2.Any()
    packed.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))
    return status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[packed])


class Validator:
    """Collects field violations so one response names every bad field."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.violations.append(FieldViolation(field, description))

    def check(self) -> None:
        if self.violations:
            raise InvalidArgument(self.violations)
