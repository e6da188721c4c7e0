"""The error reasons are one list: the contract's ErrorReason, the core's enums, the
server's status codes and the client's typed reason all agree, by name."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from callcredit.errors import CallcreditError, ErrorReason
from callcredit_server.core import Reason
from callcredit_server.core.outcomes import AccessReason, Refused
from callcredit_server.errors import refusal_status, status_for

PROTO = (
    Path(__file__).resolve().parent.parent / "proto" / "callcredit" / "v1" / "error_reason.proto"
)
CORE_REASONS = (*Reason, *AccessReason)
TRANSPORT_REASONS = (
    ErrorReason.UNAUTHENTICATED,
    ErrorReason.UNAVAILABLE,
    ErrorReason.SLOW_CONSUMER,
    ErrorReason.NOT_PRIMARY,
)
"""Sent by the servicer alone (a token, a drain or a failing journal, a stream's reader
too slow for its pushes, a hot standby): the core never decides them, so its enums do not
name them."""
SENT = [value for _, value in ErrorReason.items() if value != ErrorReason.ERROR_REASON_UNSPECIFIED]


def _documented_codes() -> dict[str, str]:
    """Each value's "gRPC code X", as its comment in error_reason.proto says."""
    text = PROTO.read_text()
    enum = text[text.index("enum ErrorReason {") :]
    codes = {}
    for comment, name in re.findall(r"((?:\s*//[^\n]*\n)+)\s*([A-Z_]+) = \d+;", enum):
        found = re.findall(r"gRPC code\s+([A-Z_]+)", " ".join(comment.split("//")))
        codes[name] = found[0] if len(found) == 1 else f"{len(found)} codes documented"
    return codes


def test_every_core_reason_is_a_contract_reason_of_the_same_name_and_back() -> None:
    core = {reason.name for reason in CORE_REASONS}
    transport = {ErrorReason.Name(value) for value in TRANSPORT_REASONS}
    contract = {ErrorReason.Name(value) for value in SENT}
    assert not core & transport, "a transport-only reason is decided by the core too"
    assert sorted(contract - core - transport) == [], "contract reasons nobody sends"
    assert sorted(core - contract) == [], "core reasons missing from error_reason.proto"
    assert sorted(transport - contract) == []


def test_core_reasons_are_spelled_as_their_names() -> None:
    # Metrics labels and CallTermination.reason use the core value itself.
    assert [r.value for r in CORE_REASONS] == [r.name for r in CORE_REASONS]


@pytest.mark.parametrize("reason", CORE_REASONS, ids=str)
def test_a_core_refusal_travels_as_its_name(reason: Reason | AccessReason) -> None:
    status = refusal_status(Refused(reason, "why"))
    (detail, *_) = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    assert (info.reason, info.domain) == (reason.name, "callcredit.v1")


@pytest.mark.parametrize("value", SENT, ids=ErrorReason.Name)
def test_each_reason_gets_the_code_its_comment_documents(value: ErrorReason.ValueType) -> None:
    name = ErrorReason.Name(value)
    error = CallcreditError.from_status(status_for(value, "why"))
    assert (error.reason, error.error_reason) == (name, value)
    assert error.code.name == _documented_codes()[name]


def test_the_client_types_only_contract_names() -> None:
    unknown = CallcreditError("DEADLINE_EXCEEDED", "", grpc.StatusCode.DEADLINE_EXCEEDED)
    assert unknown.error_reason == ErrorReason.ERROR_REASON_UNSPECIFIED
    newer = CallcreditError("SOME_NEWER_REASON", "", grpc.StatusCode.FAILED_PRECONDITION)
    assert newer.error_reason == ErrorReason.ERROR_REASON_UNSPECIFIED
    spelled = CallcreditError("ERROR_REASON_UNSPECIFIED", "")
    assert spelled.error_reason == ErrorReason.ERROR_REASON_UNSPECIFIED


def test_the_core_imports_no_generated_code() -> None:
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, callcredit_server.core; print(*sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    impure = [m for m in imported if m.split(".")[0] in ("callcredit", "google", "grpc")]
    assert impure == []
