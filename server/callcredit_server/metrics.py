"""Prometheus metrics: counted with plain ints on the event loop, exposed over HTTP.

The hot path never touches prometheus_client. The servicers and the writer call the
hooks below once per message, per commit or per stream; a hook adds to ints in dicts
keyed by values that already exist (the operation's kind string, the refusal's
`Reason`), never by strings built per operation. At scrape time (on the exporter's
thread) `collect()` turns those ints into metric families, and samples the writer's
gauges on the event loop (`Writer.gauges()`), so no lock is ever taken on the hot
path and no state is read from another thread while the loop changes it.

Each `Metrics` has its own `CollectorRegistry`, so a test process can run several
servers. docs/operations.md, "Metrics", lists every family.

The hooks also write the few per-call log lines the server has (a forced termination,
a release that overran its allowance): they are the one place that sees each outcome.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import itertools
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from wsgiref.simple_server import WSGIServer

from google.rpc import status_pb2
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from callcredit.v1 import credit_control_pb2
from callcredit.v1.error_reason_pb2 import ErrorReason
from callcredit_server.changefeed import Changefeed
from callcredit_server.core import (
    COMPILED,
    Adjust,
    Command,
    CreateAccount,
    CurrencyTotals,
    Outcome,
    PutTariff,
    Refused,
    Release,
    ReleaseOutcome,
    Renew,
    Reserve,
    StateMachine,
    TopUp,
    UpdateAccount,
)
from callcredit_server.snapshot import list_snapshots
from callcredit_server.writer import Unavailable, Writer, WriterGauges

log = logging.getLogger(__name__)

SAMPLE_TIMEOUT_SECONDS = 1.0
"""A scrape waits this long for the event loop to sample the gauges, then reports the
previous sample (a loop busy for a second is itself worth seeing in the latency)."""

# Outcome labels are all of one kind: reason-like names. A success is "OK" (as gRPC's
# code is named), a refusal its Reason, a framing or transport failure its status name.
OK = "OK"
UNAVAILABLE = ErrorReason.Name(ErrorReason.UNAVAILABLE)
OTHER_ERROR = "ERROR"

LATENCY_BUCKETS_SECONDS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
COMMIT_RECORDS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000)

KIND_OF_COMMAND: dict[type[Command], str] = {
    Reserve: "reserve",
    Renew: "renew",
    Release: "release",
    TopUp: "topup",
    Adjust: "adjust",
    CreateAccount: "create_account",
    UpdateAccount: "update_account",
    PutTariff: "put_tariff",
}
"""Label `kind` of a unary RPC's command; Control operations use their oneof name
(reserve, renew, release, or "" for an operation with nothing set)."""

# google.rpc.Status answers made by the servicer itself (framing checks, UNAVAILABLE).
_STATUS_OUTCOME = {3: ErrorReason.Name(ErrorReason.INVALID_ARGUMENT), 14: UNAVAILABLE}
_Status = status_pb2.Status


class Histogram:
    """A histogram whose observations may carry a weight: one message of n operations
    is n observations of the same latency, recorded in one step."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float, weight: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += weight
        self.total += value * weight

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        return HistogramMetricFamily(
            name, documentation, buckets=self.buckets(), sum_value=self.total
        )

    def buckets(self) -> list[tuple[str, int]]:
        cumulative = list(itertools.accumulate(list(self.counts)))
        buckets = [(repr(float(b)), c) for b, c in zip(self.bounds, cumulative, strict=False)]
        buckets.append(("+Inf", cumulative[-1]))
        return buckets


def currency_totals(machine: StateMachine) -> dict[str, CurrencyTotals]:
    """Totals per currency: a few series per currency, never one per account. Copied
    from what the machine keeps (O(currencies)) on the writer's turn at scrape time, so
    what a scrape shows is durable."""
    return {
        currency: CurrencyTotals(total.balance, total.reserved, total.open_calls)
        for currency, total in machine.totals.items()
    }


@dataclass(slots=True)
class MetricsServer:
    """The HTTP exporter: prometheus_client's WSGI server on its own thread."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def parse_listen(listen: str) -> tuple[str, int] | None:
    """HOST:PORT (an IPv6 host in brackets) as (host, port); None if malformed."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65_535:
        return None
    return host.strip("[]"), int(port)


class Metrics(Collector):
    """Every callcredit metric of one server. Hooks run on the event loop."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ok: defaultdict[str, int] = defaultdict(int)  # kind -> answered ok
        self.refused: defaultdict[tuple[str, str], int] = defaultdict(int)  # (kind, reason)
        self.latency: dict[str, Histogram] = {}  # kind -> durations
        self.commit_records = Histogram(COMMIT_RECORDS_BUCKETS)
        self.commit_latency = Histogram(LATENCY_BUCKETS_SECONDS)
        self.grant_updates_pushed = 0
        self.terminations_pushed = 0
        self.streams_open = 0
        self.streams_opened = 0
        self.draining = False
        self._writer: Writer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last: WriterGauges | None = None
        self._last_totals: dict[str, CurrencyTotals] = {}
        self._exporter: MetricsServer | None = None
        self.feed: Changefeed | None = None  # set by app.py
        self.snapshot_dir: Path | None = None  # set by app.py: this server's snapshots
        self.registry.register(self)
        ProcessCollector(registry=self.registry)

    # ----------------------------------------------------------- wiring

    def watch(self, writer: Writer) -> None:
        """Sample `writer.gauges()` on the running event loop at each scrape."""
        self._writer = writer
        self._loop = asyncio.get_running_loop()

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP exporter (GET /metrics); returns the bound port."""
        server, thread = start_http_server(port, host, registry=self.registry)
        self._exporter = MetricsServer(server, thread)
        return self._exporter.port

    @property
    def port(self) -> int:
        return 0 if self._exporter is None else self._exporter.port

    def close(self) -> None:
        if self._exporter is not None:
            self._exporter.close()
            self._exporter = None

    # ------------------------------------------------- hooks (event loop)

    def control_answered(
        self,
        kinds: Sequence[str],
        noted: Sequence[tuple[str, Outcome | status_pb2.Status]],
        started: float,
    ) -> None:
        """One ControlRequest's answers are ready to send; it was read at `started`
        (time.perf_counter()). `kinds`: each operation's; `noted`: the answers that are
        not plain successes (refusals, releases that overran), with their kind.

        Counted per message: every answer not noted is OK."""
        per_kind: dict[str, int] = {}
        for kind in kinds:
            per_kind[kind] = per_kind.get(kind, 0) + 1
        not_ok: dict[str, int] = {}
        refused = self.refused
        for kind, outcome in noted:
            cls = outcome.__class__
            if cls is Refused:
                refused[kind, cast(Refused, outcome).reason] += 1
                not_ok[kind] = not_ok.get(kind, 0) + 1
            elif cls is _Status:
                code = cast(status_pb2.Status, outcome).code
                refused[kind, _STATUS_OUTCOME.get(code, OTHER_ERROR)] += 1
                not_ok[kind] = not_ok.get(kind, 0) + 1
            elif cls is ReleaseOutcome:
                self._overran(cast(ReleaseOutcome, outcome))
        if per_kind:
            seconds = time.perf_counter() - started
            ok = self.ok
            for kind, count in per_kind.items():
                answered_ok = count - not_ok.get(kind, 0)
                if answered_ok:
                    ok[kind] += answered_ok
                self._latency(kind).observe(seconds, count)

    def _latency(self, kind: str) -> Histogram:
        histogram = self.latency.get(kind)
        if histogram is None:
            histogram = self.latency[kind] = Histogram(LATENCY_BUCKETS_SECONDS)
        return histogram

    def unary_answered(self, command: Command, outcome: Outcome | None, started: float) -> None:
        """A unary RPC's command was answered (`outcome` None: UNAVAILABLE)."""
        kind = KIND_OF_COMMAND.get(type(command), "other")
        if outcome is None:
            self.refused[kind, UNAVAILABLE] += 1
        elif isinstance(outcome, Refused):
            self.refused[kind, outcome.reason] += 1
        else:
            self.ok[kind] += 1
            if isinstance(outcome, ReleaseOutcome) and outcome.result.shortfall:
                self._overran(outcome)
        self._latency(kind).observe(time.perf_counter() - started)

    def pushed(self, response: credit_control_pb2.ControlResponse) -> None:
        """A Control response carrying pushes is being sent."""
        self.grant_updates_pushed += len(response.grant_updates)
        self.terminations_pushed += len(response.terminations)
        for termination in response.terminations:
            log.info(
                "call %s told to hang up: %s",
                termination.call_id,
                termination.reason,
                extra={"call_id": termination.call_id, "reason": termination.reason},
            )

    def stream_opened(self) -> None:
        self.streams_open += 1
        self.streams_opened += 1

    def stream_closed(self) -> None:
        self.streams_open -= 1

    def committed(self, records: int, seconds: float) -> None:
        """The writer made `records` journal records durable in one transaction."""
        self.commit_records.observe(records)
        self.commit_latency.observe(seconds)

    def _overran(self, outcome: ReleaseOutcome) -> None:
        result = outcome.result
        log.warning(
            "call %s overran its allowance: %d s used, %d not covered",
            result.call_id,
            result.used_seconds,
            result.shortfall,
            extra={
                "call_id": result.call_id,
                "used_seconds": result.used_seconds,
                "shortfall": result.shortfall,
            },
        )

    # ------------------------------------------------- scrape (any thread)

    def _sample(self) -> WriterGauges | None:
        writer, loop = self._writer, self._loop
        if writer is None or loop is None or loop.is_closed():
            return self._last
        future: concurrent.futures.Future[WriterGauges] = concurrent.futures.Future()

        def sample() -> None:
            try:
                future.set_result(writer.gauges())
            except BaseException as exc:  # reported to the scraping thread
                future.set_exception(exc)

        try:
            loop.call_soon_threadsafe(sample)
            self._last = future.result(SAMPLE_TIMEOUT_SECONDS)
            if not self._last.failed:
                totals = asyncio.run_coroutine_threadsafe(writer.read(currency_totals), loop)
                try:
                    self._last_totals = totals.result(SAMPLE_TIMEOUT_SECONDS)
                except TimeoutError:
                    totals.cancel()  # the writer is busy: the previous totals
        except (RuntimeError, TimeoutError, Unavailable):  # closed, busy or failed: last sample
            pass
        return self._last

    def collect(self) -> Iterable[Metric]:
        return list(self._families())

    def _families(self) -> Iterator[Metric]:
        operations = CounterMetricFamily(
            "callcredit_operations",
            "Operations answered, by kind and outcome (OK, or the refusal's reason).",
            labels=["kind", "outcome"],
        )
        for kind, count in list(self.ok.items()):
            operations.add_metric([kind, OK], count)
        for (kind, reason), count in list(self.refused.items()):
            operations.add_metric([kind, str(reason)], count)
        yield operations
        durations = HistogramMetricFamily(
            "callcredit_operation_duration_seconds",
            "Time from reading an operation's message to its answer being ready to send, by kind.",
            labels=["kind"],
        )
        for kind, histogram in list(self.latency.items()):
            durations.add_metric([kind], histogram.buckets(), histogram.total)
        yield durations
        yield self.commit_records.family(
            "callcredit_journal_commit_records", "Journal records per commit (group commit)."
        )
        yield self.commit_latency.family(
            "callcredit_journal_commit_duration_seconds", "Time one journal commit took."
        )
        pushes = CounterMetricFamily(
            "callcredit_pushes", "Pushes sent on Control streams.", labels=["kind"]
        )
        pushes.add_metric(["grant_update"], self.grant_updates_pushed)
        pushes.add_metric(["termination"], self.terminations_pushed)
        yield pushes
        yield GaugeMetricFamily(
            "callcredit_control_streams_open", "Control streams open now.", self.streams_open
        )
        yield CounterMetricFamily(
            "callcredit_control_streams_opened",
            "Control streams opened (a dialer reconnecting opens one more).",
            self.streams_opened,
        )
        yield GaugeMetricFamily(
            "callcredit_draining", "1 while the server drains before exiting.", int(self.draining)
        )
        yield GaugeMetricFamily(
            "callcredit_core_compiled",
            "1 when the state machine runs compiled by mypyc, 0 when it runs as pure Python.",
            int(COMPILED),
        )
        if self.feed is not None:
            yield GaugeMetricFamily(
                "callcredit_changefeed_lag_records",
                "Durable journal records whose events the projector has not stored yet "
                "(the changefeed lags by this much; it grows if the projector is down).",
                self.feed.lag,
            )
            if self.snapshot_dir is not None:
                newest = list_snapshots(self.snapshot_dir)[:1]
                yield GaugeMetricFamily(
                    "callcredit_snapshot_behind_records",
                    "Durable journal records after the newest snapshot in this server's "
                    "folder: what a start would replay now (the projector takes one every "
                    "--snapshot-every-records records).",
                    max(self.feed.durable_seq - (newest[0].seq if newest else 0), 0),
                )
        sampled = self._sample()
        if sampled is None:
            return
        gauges: list[tuple[str, str, Any]] = [
            ("callcredit_writer_queued_submissions",
             "Submissions waiting for the writer's apply task.", sampled.queued_submissions),
            ("callcredit_journal_uncommitted_records",
             "Journal records applied but not yet committed.", sampled.uncommitted_records),
            ("callcredit_open_calls", "Calls ACTIVE now.", sampled.open_calls),
            ("callcredit_open_calls_without_stream",
             "Open calls with no Control stream to push to: seen only over unary RPCs, "
             "or their stream closed and they have not been re-attached yet.",
             sampled.open_calls_without_stream),
            ("callcredit_accounts", "Accounts in memory.", sampled.accounts),
            ("callcredit_writer_failed",
             "1 once the writer has stopped after a journal failure (fail-stop): "
             "restart the server once the database is back.",
             int(sampled.failed)),
        ]  # fmt: skip
        for name, documentation, value in gauges:
            yield GaugeMetricFamily(name, documentation, value)
        money: list[tuple[str, str, Callable[[CurrencyTotals], int]]] = [
            ("callcredit_balance_minor_units",
             "Sum of account balances, by currency, in its minor unit.", lambda t: t.balance),
            ("callcredit_reserved_minor_units",
             "Sum of the holds of open calls, by currency, in its minor unit.",
             lambda t: t.reserved),
            ("callcredit_open_calls_by_currency",
             "Calls ACTIVE now, by the currency of the account that pays.",
             lambda t: t.open_calls),
        ]  # fmt: skip
        totals = self._last_totals
        for name, documentation, value_of in money:
            family = GaugeMetricFamily(name, documentation, labels=["currency"])
            for currency, total in sorted(totals.items()):
                family.add_metric([currency], value_of(total))
            yield family
