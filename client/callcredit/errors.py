"""Errors raised by the callcredit client libraries.

The one place where gRPC errors become Python exceptions::

    CallcreditError            a refusal or failure, with .reason and .code
    └── StreamClosedError      the dialer's Control stream ended and is not coming back

A refusal from the server carries a google.rpc.Status whose ErrorInfo detail names
the reason: the name of a value of the contract's ``ErrorReason``
(proto/callcredit/v1/error_reason.proto), re-exported here. Compare the typed value::

    if err.error_reason == ErrorReason.INSUFFICIENT_FUNDS: ...

``err.reason`` keeps the name as sent. Transport failures without such a detail get the
gRPC code's name as reason ("UNAVAILABLE", "DEADLINE_EXCEEDED", ...); their
``error_reason`` is the value of that name, or ERROR_REASON_UNSPECIFIED when the
contract has none (as for a reason added by a newer server).
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from callcredit.v1.error_reason_pb2 import ErrorReason

__all__ = ["DOMAIN", "CallcreditError", "ErrorReason", "StreamClosedError"]

DOMAIN = "callcredit.v1"


class CallcreditError(Exception):
    """A request the server refused, or one that could not reach it."""

    def __init__(
        self,
        reason: str,
        message: str,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        field_violations: tuple[tuple[str, str], ...] = (),
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message
        self.code = code
        self.field_violations = field_violations
        # The ErrorInfo's metadata: e.g. a NOT_PRIMARY refusal's "primary" address.
        self.metadata = metadata or {}

    @property
    def error_reason(self) -> ErrorReason.ValueType:
        """`reason` as the contract's enum; ERROR_REASON_UNSPECIFIED for a name it lacks."""
        return _ERROR_REASONS.get(self.reason, ErrorReason.ERROR_REASON_UNSPECIFIED)

    @classmethod
    def from_status(cls, status: status_pb2.Status) -> CallcreditError:
        """Build from a google.rpc.Status (an Outcome's error, or a call's trailers)."""
        code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
        reason = code.name
        violations: tuple[tuple[str, str], ...] = ()
        metadata: dict[str, str] = {}
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
                metadata = dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = tuple((v.field, v.description) for v in bad.field_violations)
        return cls(reason, status.message, code, violations, metadata)

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> CallcreditError:
        """Translate a failed RPC: the rich status when the server sent one."""
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        if status is not None:
            return cls.from_status(status)
        if isinstance(error, grpc.Call | grpc.aio.AioRpcError):
            code = error.code()
            return cls(code.name, error.details() or "", code)
        return cls(grpc.StatusCode.UNKNOWN.name, str(error))


class StreamClosedError(CallcreditError):
    """The dialer's stream was closed (the client was shut down)."""


_CODES = {code.value[0]: code for code in grpc.StatusCode}
_ERROR_REASONS = {name: value for name, value in ErrorReason.items() if value}
