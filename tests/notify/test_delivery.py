"""The notifier's decisions, as plain values: routing, payload, signature, retries."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import pytest

from callcredit.v1 import admin_pb2
from callcredit_server.notify.delivery import (
    DeadLetter,
    Delivered,
    Endpoint,
    Retry,
    RetryPolicy,
    after_attempt,
    payload,
    retry_delay_seconds,
    routes,
    signature,
    verify,
)
from tests.test_docs import REPO, marked_block

SECRET = "whsec_0123456789abcdef"
POLICY = RetryPolicy(max_attempts=5, first_retry_seconds=1.0, max_retry_seconds=10.0)


def event(
    kind: int = admin_pb2.EVENT_KIND_LOW_BALANCE, account_id: str = "acme-1"
) -> admin_pb2.Event:
    return admin_pb2.Event(
        seq=7,
        index=1,
        event_id="7.1",
        kind=kind,  # type: ignore[arg-type]
        account_id=account_id,
        account=admin_pb2.Account(account_id=account_id, available=40, low_balance_threshold=50),
    )


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"id":"7.1"}'
    header = signature(SECRET, 1_700_000_000, body)
    expected = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert verify(SECRET, header, body, now_seconds=1_700_000_100)


@pytest.mark.parametrize(
    ("secret", "body", "now_seconds"),
    [
        pytest.param("whsec_another-secret!", b'{"id":"7.1"}', 1_700_000_000, id="wrong-secret"),
        pytest.param(SECRET, b'{"id":"7.2"}', 1_700_000_000, id="altered-body"),
        pytest.param(SECRET, b'{"id":"7.1"}', 1_700_000_301, id="too-old"),
        pytest.param(SECRET, b'{"id":"7.1"}', 1_699_999_699, id="from-the-future"),
    ],
)
def test_a_wrong_secret_body_or_time_fails_verification(
    secret: str, body: bytes, now_seconds: int
) -> None:
    header = signature(SECRET, 1_700_000_000, b'{"id":"7.1"}')
    assert not verify(secret, header, body, now_seconds)


@pytest.mark.parametrize("header", ["", "t=,v1=", "v1=abc", "t=x,v1=abc", "t=1700000000"])
def test_a_malformed_header_fails_verification(header: str) -> None:
    assert not verify(SECRET, header, b"{}", 1_700_000_000)


def test_the_payload_is_the_event_in_proto_json_and_stable() -> None:
    body = payload(event())
    assert body == payload(event())
    data = json.loads(body)
    assert data["event_id"] == "7.1" and data["kind"] == "EVENT_KIND_LOW_BALANCE"
    assert data["account"]["available"] == "40"  # int64: a string in proto JSON


def test_routing_by_accounts_prefix_and_kinds() -> None:
    everything = Endpoint("all", "http://x/", SECRET)
    acme_low = Endpoint(
        "acme", "http://x/", SECRET, account_prefix="acme-", kinds=frozenset({"LOW_BALANCE"})
    )
    just_beta = Endpoint("beta", "http://x/", SECRET, accounts=frozenset({"beta"}))
    endpoints = [everything, acme_low, just_beta]
    assert routes(event(), endpoints) == [everything, acme_low]
    assert routes(event(admin_pb2.EVENT_KIND_CALL_STARTED), endpoints) == [everything]
    assert routes(event(account_id="beta"), endpoints) == [everything, just_beta]


def test_backoff_doubles_up_to_its_cap_and_jitter_only_shortens() -> None:
    assert [retry_delay_seconds(POLICY, n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert retry_delay_seconds(POLICY, 3, jitter=0.999) == pytest.approx(2.002)


@pytest.mark.parametrize(
    ("attempt", "status", "expected"),
    [
        pytest.param(1, 200, Delivered(), id="2xx"),
        pytest.param(1, 204, Delivered(), id="204"),
        pytest.param(1, 500, Retry(1.0, "HTTP 500"), id="5xx-retried"),
        pytest.param(2, None, Retry(2.0, "ReadTimeout"), id="timeout-retried"),
        pytest.param(3, 429, Retry(4.0, "HTTP 429"), id="429-retried"),
        pytest.param(1, 408, Retry(1.0, "HTTP 408"), id="408-retried"),
        pytest.param(5, 503, DeadLetter("HTTP 503 (attempt 5 of 5)"), id="last-attempt"),
        pytest.param(
            1, 400, DeadLetter("HTTP 400: the receiver refused the request itself"), id="4xx"
        ),
        pytest.param(1, 302, Retry(1.0, "HTTP 302"), id="redirect-not-followed"),
    ],
)
def test_what_follows_an_attempt(attempt: int, status: int | None, expected: object) -> None:
    error = "ReadTimeout" if status is None else ""
    assert after_attempt(POLICY, attempt, status, error) == expected


def test_the_verification_snippet_of_the_docs_accepts_our_signature() -> None:
    namespace: dict[str, Any] = {}
    exec(marked_block(REPO / "docs" / "operations.md", "webhook-verify"), namespace)
    body = b'{"event_id":"7.1"}'
    now_seconds = int(time.time())
    assert namespace["verify"](SECRET, signature(SECRET, now_seconds, body), body)
    assert not namespace["verify"](SECRET, signature(SECRET, now_seconds, body), body + b" ")
    assert not namespace["verify"](SECRET, signature(SECRET, now_seconds - 301, body), body)
