"""Refusals as gRPC: google.rpc.Status with ErrorInfo (and BadRequest) details.

The one place a core `Reason` becomes a gRPC status code (DESIGN.md, Errors).
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from callcredit_server.core import Reason, Refused
from callcredit_server.core.outcomes import AccessReason

DOMAIN = "callcredit.v1"
UNAVAILABLE = "UNAVAILABLE"
# Not a refusal of an operation: the server ends a Control stream whose reader fell
# so far behind that its pushes would have to be buffered without bound.
SLOW_CONSUMER = "SLOW_CONSUMER"
# A status travels in the trailers, which clients cap (grpc's default: 16 KiB of
# metadata): a refusal names its first violations and counts the rest.
MAX_FIELD_VIOLATIONS = 20
MAX_STATUS_MESSAGE_CHARS = 1_000
UNAUTHENTICATED = "UNAUTHENTICATED"  # no bearer token, or one the server does not know
# A hot standby (or a deposed primary) answers every RPC this way; ErrorInfo.metadata
# ["primary"] is the primary's advertised address when known.
NOT_PRIMARY = "NOT_PRIMARY"

_CODES: dict[str, grpc.StatusCode] = {
    Reason.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.ACCOUNT_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.TARIFF_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.CALL_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.ACCOUNT_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Reason.CALL_ID_CONFLICT: grpc.StatusCode.ALREADY_EXISTS,
    Reason.IDEMPOTENCY_KEY_CONFLICT: grpc.StatusCode.ALREADY_EXISTS,
    Reason.INSUFFICIENT_FUNDS: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.ACCOUNT_SUSPENDED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.ACCOUNT_CLOSED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.NO_RATE_FOR_DESTINATION: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.CALL_ALREADY_ENDED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.CURRENCY_MISMATCH: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.ACCOUNT_HAS_OPEN_CALLS: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.CONCURRENT_CALL_LIMIT: grpc.StatusCode.RESOURCE_EXHAUSTED,
    AccessReason.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    SLOW_CONSUMER: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    NOT_PRIMARY: grpc.StatusCode.UNAVAILABLE,
}


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def status_for(
    reason: str,
    message: str,
    field_violations: tuple[tuple[str, str], ...] = (),
    metadata: dict[str, str] | None = None,
) -> status_pb2.Status:
    """A google.rpc.Status carrying `reason` in an ErrorInfo of our domain."""
    code: grpc.StatusCode = _CODES[reason]
    if len(field_violations) > MAX_FIELD_VIOLATIONS:
        more = len(field_violations) - MAX_FIELD_VIOLATIONS
        field_violations = field_violations[:MAX_FIELD_VIOLATIONS]
        message = "; ".join(f"{name}: {why}" for name, why in field_violations)
        message += f"; and {more} more"
    if len(message) > MAX_STATUS_MESSAGE_CHARS:
        message = message[: MAX_STATUS_MESSAGE_CHARS - 3] + "..."
    status = status_pb2.Status(code=code.value[0], message=message)
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)
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
    return status_for(refused.reason, refused.message, refused.field_violations)


def invalid(field: str, why: str) -> status_pb2.Status:
    return status_for(Reason.INVALID_ARGUMENT, f"{field}: {why}", ((field, why),))


def unavailable(message: str) -> status_pb2.Status:
    return status_for(UNAVAILABLE, message)


def permission_denied(message: str) -> status_pb2.Status:
    return status_for(AccessReason.PERMISSION_DENIED, message)


def unauthenticated(message: str) -> status_pb2.Status:
    return status_for(UNAUTHENTICATED, message)


def not_primary(primary: str) -> status_pb2.Status:
    """This server is not the primary; `primary` is where it is ("" if unknown)."""
    where = f"; the primary is at {primary}" if primary else "; no primary is known yet"
    metadata = {"primary": primary} if primary else None
    return status_for(NOT_PRIMARY, f"this server is not the primary{where}", (), metadata)
