"""Prometheus metrics, scraped over HTTP after known operations."""

from __future__ import annotations

import logging

import pytest

from callcredit.v1 import admin_pb2, credit_control_pb2
from callcredit_server.core import COMPILED
from callcredit_server.metrics import Histogram, Metrics, parse_listen
from callcredit_server.snapshot import write_snapshot
from tests.ops.conftest import scrape
from tests.service.conftest import Harness
from tests.service.streams import RawStream, release_op, renew_op, reserve_op


def ops(kind: str, outcome: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("callcredit_operations_total", (("kind", kind), ("outcome", outcome)))


def plain(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (name, tuple(sorted(labels.items())))


async def test_scrape_counts_operations_commits_streams_and_pushes(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = harness.running.metrics
    assert metrics is not None and metrics.port
    await harness.funded_account("acc", 100)  # put_tariff, create_account, topup
    stream = RawStream(harness.dialer)
    # One message of four: two grants (the second final: 40 of 60 s), one refusal, one bad id.
    first = await stream.ask(
        reserve_op("r1", "c1", "acc"),
        reserve_op("r2", "c2", "acc"),
        reserve_op("r3", "c3", "acc"),
        reserve_op("bad id", "c4", "acc"),
    )
    assert [o.WhichOneof("result") for o in first] == ["reserve", "reserve", "error", "error"]
    assert first[1].reserve.grant.final
    await stream.ask(renew_op("n1", "c1", 1, 5))
    await stream.ask(release_op("x1", "c1", 10))  # frees 50: c2 is re-granted by a push
    await stream.wait_for(lambda: len(stream.grant_updates) == 1)
    with caplog.at_level(logging.INFO, logger="callcredit_server.metrics"):
        await harness.admin.UpdateAccount(
            admin_pb2.UpdateAccountRequest(
                account_id="acc", status=admin_pb2.ACCOUNT_STATUS_SUSPENDED
            )
        )
        await stream.wait_for(lambda: len(stream.terminations) == 1)

    seen = await scrape(metrics.port)

    assert seen[ops("reserve", "OK")] == 2
    assert seen[ops("reserve", "INSUFFICIENT_FUNDS")] == 1
    assert seen[ops("reserve", "INVALID_ARGUMENT")] == 1
    assert seen[ops("renew", "OK")] == 1
    assert seen[ops("release", "OK")] == 1
    for kind in ("put_tariff", "create_account", "topup", "update_account"):
        assert seen[ops(kind, "OK")] == 1
    answered = sum(v for (name, _), v in seen.items() if name == "callcredit_operations_total")
    assert answered == 10
    durations = {
        labels: v
        for (name, labels), v in seen.items()
        if name == "callcredit_operation_duration_seconds_count"
    }
    assert sum(durations.values()) == answered
    assert durations[(("kind", "reserve"),)] == 4
    assert (
        seen[plain("callcredit_operation_duration_seconds_bucket", kind="reserve", le="+Inf")] == 4
    )
    outcomes = {
        dict(labels)["outcome"]
        for (name, labels) in seen
        if name.startswith("callcredit_operations")
    }
    assert all(o.isupper() for o in outcomes), outcomes  # one kind of label: reason-like names
    # Every journal record went through a counted commit.
    records = harness.running.journal.last_seq()
    assert seen[plain("callcredit_journal_commit_records_sum")] == records
    assert 1 <= seen[plain("callcredit_journal_commit_duration_seconds_count")] <= records
    assert seen[plain("callcredit_pushes_total", kind="grant_update")] == 1
    assert seen[plain("callcredit_pushes_total", kind="termination")] == 1
    assert seen[plain("callcredit_control_streams_open")] == 1
    assert seen[plain("callcredit_control_streams_opened_total")] == 1
    assert seen[plain("callcredit_open_calls")] == 1  # c2, terminated but not released
    assert seen[plain("callcredit_open_calls_without_stream")] == 0
    assert seen[plain("callcredit_accounts")] == 1
    # Money per currency, never per account: 100 - 10 charged, c2 re-granted 60 s held.
    assert seen[plain("callcredit_balance_minor_units", currency="VND")] == 90
    assert seen[plain("callcredit_reserved_minor_units", currency="VND")] == 60
    assert seen[plain("callcredit_open_calls_by_currency", currency="VND")] == 1
    assert seen[plain("callcredit_writer_queued_submissions")] == 0
    assert seen[plain("callcredit_journal_uncommitted_records")] == 0
    assert seen[plain("callcredit_writer_failed")] == 0
    assert seen[plain("callcredit_draining")] == 0
    assert seen[plain("callcredit_core_compiled")] == int(COMPILED)
    # No snapshot yet (one every 100,000 records): a start would replay every record.
    assert seen[plain("callcredit_snapshot_behind_records")] == records
    assert plain("process_cpu_seconds_total") in seen
    # The termination is logged with its call_id.
    (logged,) = [r for r in caplog.records if getattr(r, "call_id", None) == "c2"]
    assert logged.__dict__["reason"] == "ACCOUNT_SUSPENDED"

    await stream.close()
    after = await scrape(metrics.port)
    assert after[plain("callcredit_control_streams_open")] == 0
    assert after[plain("callcredit_open_calls_without_stream")] == 1  # c2 lost its stream


async def test_unary_reserve_counts_and_overrun_logs_the_call(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = harness.running.metrics
    assert metrics is not None
    await harness.funded_account("acc", 100)
    await harness.dialer.Reserve(
        credit_control_pb2.ReserveRequest(call_id="u1", account_id="acc", destination="8490")
    )
    with caplog.at_level(logging.WARNING, logger="callcredit_server.metrics"):
        await harness.dialer.Release(
            credit_control_pb2.ReleaseRequest(call_id="u1", used_seconds=500)
        )
    seen = await scrape(metrics.port)
    assert seen[ops("reserve", "OK")] == 1
    assert seen[ops("release", "OK")] == 1
    assert seen[plain("callcredit_open_calls")] == 0
    (overrun,) = [r for r in caplog.records if getattr(r, "call_id", None) == "u1"]
    assert overrun.__dict__["shortfall"] == 400


def test_weighted_histogram_and_separate_registries() -> None:
    histogram = Histogram((0.1, 1.0))
    histogram.observe(0.05, 3)
    histogram.observe(0.5)
    histogram.observe(7.0)
    family = histogram.family("h_seconds", "doc")
    values = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert values[("h_seconds_bucket", "0.1")] == 3
    assert values[("h_seconds_bucket", "1.0")] == 4
    assert values[("h_seconds_bucket", "+Inf")] == 5
    assert values[("h_seconds_count", None)] == 5
    assert values[("h_seconds_sum", None)] == pytest.approx(0.15 + 0.5 + 7.0)
    # Two servers in one process do not share (or collide in) a registry.
    assert Metrics().registry is not Metrics().registry
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    assert parse_listen("9464") is None


async def test_the_records_a_start_would_replay_count_from_the_newest_snapshot(
    harness: Harness,
) -> None:
    metrics = harness.running.metrics
    assert metrics is not None and metrics.port and metrics.snapshot_dir is not None
    await harness.funded_account("acc", 100)
    records = harness.running.journal.last_seq()
    image = await harness.running.writer.read(lambda machine: machine.image())
    write_snapshot(metrics.snapshot_dir, records - 1, image, 0)  # as if one record ago
    seen = await scrape(metrics.port)
    assert seen[plain("callcredit_snapshot_behind_records")] == 1
