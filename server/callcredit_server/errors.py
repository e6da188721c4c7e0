"""Refusals as gRPC: google.rpc.Status with ErrorInfo (and BadRequest) details.

The one place a reason becomes a gRPC status code. The reasons are the contract's
`callcredit.v1.ErrorReason` (proto/callcredit/v1/error_reason.proto); ErrorInfo.reason
carries the value's name. The core decides with its own enums (`Reason`, `AccessReason`:
it imports no generated code); each of their members is the ErrorReason of the same name.
The servicer alone sends UNAUTHENTICATED (auth.py), UNAVAILABLE (a drain, a failing
journal) and SLOW_CONSUMER (a Control stream's reader too slow for its pushes): the core
never decides those. tests/test_error_reasons.py proves the lists match.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from callcredit.v1.error_reason_pb2 import ErrorReason
from callcredit_server.core import Reason, Refused
from callcredit_server.core.outcomes import AccessReason

DOMAIN = "callcredit.v1"
# A status travels in the trailers, which clients cap (grpc's default: 16 KiB of
# metadata): a refusal names its first violations and counts the rest.
MAX_FIELD_VIOLATIONS = 20
MAX_STATUS_MESSAGE_CHARS = 1_000

_CODES: dict[ErrorReason.ValueType, grpc.StatusCode] = {
    ErrorReason.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorReason.ACCOUNT_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorReason.TARIFF_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorReason.CALL_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorReason.ACCOUNT_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorReason.CALL_ID_CONFLICT: grpc.StatusCode.ALREADY_EXISTS,
    ErrorReason.IDEMPOTENCY_KEY_CONFLICT: grpc.StatusCode.ALREADY_EXISTS,
    ErrorReason.INSUFFICIENT_FUNDS: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorReason.ACCOUNT_SUSPENDED: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorReason.ACCOUNT_CLOSED: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorReason.NO_RATE_FOR_DESTINATION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorReason.CALL_ALREADY_ENDED: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorReason.CURRENCY_MISMATCH: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorReason.ACCOUNT_HAS_OPEN_CALLS: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorReason.CONCURRENT_CALL_LIMIT: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorReason.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorReason.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorReason.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorReason.SLOW_CONSUMER: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorReason.NOT_PRIMARY: grpc.StatusCode.UNAVAILABLE,
}

_OF_CORE: dict[Reason | AccessReason, ErrorReason.ValueType] = {
    reason: ErrorReason.Value(reason.name) for reason in (*Reason, *AccessReason)
}
"""A core reason as the contract's value of the same name (ValueError at import if the
contract lacks one)."""


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def status_for(
    reason: ErrorReason.ValueType,
    message: str,
    field_violations: tuple[tuple[str, str], ...] = (),
    metadata: dict[str, str] | None = None,
) -> status_pb2.Status:
    """A google.rpc.Status carrying `reason`'s name in an ErrorInfo of our domain."""
    code: grpc.StatusCode = _CODES[reason]
    if len(field_violations) > MAX_FIELD_VIOLATIONS:
        more = len(field_violations) - MAX_FIELD_VIOLATIONS
        field_violations = field_violations[:MAX_FIELD_VIOLATIONS]
        message = "; ".join(f"{name}: {why}" for name, why in field_violations)
        message += f"; and {more} more"
    if len(message) > MAX_STATUS_MESSAGE_CHARS:
        message = message[: MAX_STATUS_MESSAGE_CHARS - 3] + "..."
    status = status_pb2.Status(code=code.value[0], message=message)
    info = error_details_pb2.ErrorInfo(
        reason=ErrorReason.Name(reason), domain=DOMAIN, metadata=metadata
    )
    status.details.append(_pack(info))
    if field_violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=name, description=why)
                for name, why in field_violations
            ]
        )
        status.details.append(_pack(bad))
    return status


def refusal_status(refused: Refused) -> status_pb2.Status:
    return status_for(_OF_CORE[refused.reason], refused.message, refused.field_violations)


def invalid(field: str, why: str) -> status_pb2.Status:
    return status_for(ErrorReason.INVALID_ARGUMENT, f"{field}: {why}", ((field, why),))


def unavailable(message: str) -> status_pb2.Status:
    return status_for(ErrorReason.UNAVAILABLE, message)


def permission_denied(message: str) -> status_pb2.Status:
    return status_for(ErrorReason.PERMISSION_DENIED, message)


def unauthenticated(message: str) -> status_pb2.Status:
    return status_for(ErrorReason.UNAUTHENTICATED, message)


def not_primary(primary: str) -> status_pb2.Status:
    """This server is not the primary; `primary` is where it is ("" if unknown)."""
    where = f"; the primary is at {primary}" if primary else "; no primary is known yet"
    metadata = {"primary": primary} if primary else None
    return status_for(
        ErrorReason.NOT_PRIMARY, f"this server is not the primary{where}", (), metadata
    )
