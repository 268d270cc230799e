"""A failed call told as a person reads it: the status, the message, the reason from the
`google.rpc.ErrorInfo` (with its metadata), each `BadRequest` field violation and the
`RetryInfo` delay; never a traceback."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

TOKEN_HINT = (
    "admin calls need the token: --token / ADMIN_TOKEN, or --token-file / ADMIN_TOKEN_FILE "
    "(make run writes var/admin-token)"
)


@dataclass
class CallFailure:
    code: str
    message: str
    reason: str | None = None
    domain: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    field_violations: list[tuple[str, str]] = field(default_factory=list)
    retry_after_seconds: float | None = None

    def lines(self) -> list[str]:
        lines = [f"error: {self.code}: {self.message}"]
        if self.reason:
            extra = ", ".join(f"{key}={value}" for key, value in sorted(self.metadata.items()))
            lines.append(f"reason: {self.reason}" + (f" ({extra})" if extra else ""))
        lines += [f"  field {name}: {description}" for name, description in self.field_violations]
        if self.retry_after_seconds is not None:
            lines.append(f"retry after {self.retry_after_seconds:g} s")
        if self.reason in {"ADMIN_TOKEN_REQUIRED", "ADMIN_TOKEN_INVALID"}:
            lines.append(f"hint: {TOKEN_HINT}")
        return lines


def describe(error: grpc.RpcError) -> CallFailure:
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else None
    failure = CallFailure(code=code.name if code else "UNKNOWN", message=details or str(error))
    try:
        status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
    except ValueError:  # a status whose details do not match its code and message
        status = None
    if status is None:
        return failure
    for detail in status.details:
        info, bad_request, retry = (
            error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest(), error_details_pb2.RetryInfo()
        )
        if detail.Unpack(info):
            failure.reason, failure.domain, failure.metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Unpack(bad_request):
            failure.field_violations += [(v.field, v.description) for v in bad_request.field_violations]
        elif detail.Unpack(retry):
            failure.retry_after_seconds = retry.retry_delay.ToTimedelta().total_seconds()
    return failure
