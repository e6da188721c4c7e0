"""The notifier's decisions, without I/O: routing, the payload, the signature, retries.

Nothing here touches a socket, a file, a clock or a random source: times and jitter are
arguments, so every rule is a plain function tested with plain values.

- **Routing**: an event goes to each endpoint whose accounts, account prefix and kinds
  all match it (an empty filter matches everything).
- **Payload**: the contract's Event in the protobuf JSON mapping (field names as in
  admin.proto; int64 values as strings), compact and with sorted keys, so the same
  event always has the same bytes.
- **Signature** (as Stripe signs webhooks): ``Callcredit-Signature: t=<unix seconds>,
  v1=<hex HMAC-SHA256 of "<t>.<body>" under the endpoint's secret>``. The timestamp
  is signed with the body, so a captured request cannot be replayed later than the
  receiver's tolerance (`verify` takes it).
- **Retries**: after a failed attempt, the next waits `first_retry_seconds * 2**(attempt-1)`,
  at most `max_retry_seconds`, shortened by up to `jitter` of itself so that many failed
  deliveries do not retry in step; after `max_attempts` attempts the delivery is
  dead-lettered. A 4xx answer other than 408 and 429 says the request itself is wrong,
  and is dead-lettered at once: repeating it cannot succeed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from google.protobuf import json_format

from callcredit.v1 import admin_pb2

SIGNATURE_HEADER = "Callcredit-Signature"
EVENT_ID_HEADER = "Callcredit-Event-Id"
DEFAULT_TOLERANCE_SECONDS = 300  # how old a signature `verify` accepts
_RETRYABLE_4XX = frozenset({408, 429})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A URL that wants some events, and the secret its requests are signed with."""

    name: str
    url: str
    secret: str = field(repr=False)
    accounts: frozenset[str] = frozenset()  # empty: any account
    account_prefix: str = ""  # "": any account
    kinds: frozenset[str] = frozenset()  # EventKind names without the prefix; empty: all

    def wants(self, account_id: str, kind: str) -> bool:
        if self.accounts and account_id not in self.accounts:
            return False
        if not account_id.startswith(self.account_prefix):
            return False
        return not self.kinds or kind in self.kinds


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 8
    first_retry_seconds: float = 1.0
    max_retry_seconds: float = 300.0


def kind_name(event: admin_pb2.Event) -> str:
    """The event's kind as configuration files spell it: ``LOW_BALANCE``."""
    return admin_pb2.EventKind.Name(event.kind).removeprefix("EVENT_KIND_")


def routes(event: admin_pb2.Event, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
    """The endpoints `event` goes to."""
    kind = kind_name(event)
    return [e for e in endpoints if e.wants(event.account_id, kind)]


def payload(event: admin_pb2.Event) -> bytes:
    """The request body for `event`: the same bytes every time."""
    as_dict = json_format.MessageToDict(event, preserving_proto_field_name=True)
    return json.dumps(as_dict, sort_keys=True, separators=(",", ":")).encode()


def signature(secret: str, timestamp_seconds: int, body: bytes) -> str:
    """The Callcredit-Signature header value for `body` sent at `timestamp_seconds`."""
    signed = f"{timestamp_seconds}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp_seconds},v1={digest}"


def verify(
    secret: str,
    header: str,
    body: bytes,
    now_seconds: int,
    tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS,
) -> bool:
    """Whether `header` signs `body` with `secret`, no more than `tolerance_seconds` ago.

    What a receiver runs (docs/operations.md has a standalone copy).
    """
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    timestamp = fields.get("t", "")
    if not (timestamp.isascii() and timestamp.isdigit()):
        return False
    if abs(now_seconds - int(timestamp)) > tolerance_seconds:
        return False
    expected = signature(secret, int(timestamp), body).partition(",v1=")[2]
    return hmac.compare_digest(expected, fields.get("v1", ""))


# -------------------------------------------------------------- attempts


@dataclass(frozen=True, slots=True)
class Delivered:
    pass


@dataclass(frozen=True, slots=True)
class Retry:
    after_seconds: float
    error: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    error: str


Decision = Delivered | Retry | DeadLetter


def retry_delay_seconds(policy: RetryPolicy, attempt: int, jitter: float = 0.0) -> float:
    """The wait after failed attempt number `attempt` (1-based); `jitter` in [0, 1)."""
    base = min(policy.first_retry_seconds * 2.0 ** (attempt - 1), policy.max_retry_seconds)
    return base * (1.0 - jitter / 2)


def after_attempt(
    policy: RetryPolicy,
    attempt: int,
    status_code: int | None,
    error: str = "",
    jitter: float = 0.0,
) -> Decision:
    """What follows attempt number `attempt`: its HTTP status, or None and the error
    (timeout, refused connection) when there was no answer."""
    if status_code is not None and 200 <= status_code < 300:
        return Delivered()
    why = error if status_code is None else f"HTTP {status_code}"
    if status_code is not None and 400 <= status_code < 500 and status_code not in _RETRYABLE_4XX:
        return DeadLetter(f"{why}: the receiver refused the request itself")
    if attempt >= policy.max_attempts:
        return DeadLetter(f"{why} (attempt {attempt} of {policy.max_attempts})")
    return Retry(retry_delay_seconds(policy, attempt, jitter), why)
