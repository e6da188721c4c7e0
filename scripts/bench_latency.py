"""Latency at a fixed offered rate: p50 / p99 per operation, open loop.

The closed loop of loadtest/bench_compare.py keeps 1,000 operations in flight, so its
latency only restates its throughput (Little's law). This drives `callcredit-server` the
way a busy dialer does instead: operations fall due at a steady rate whatever the server
answers, every `--tick-ms` the client sends what fell due as one ControlRequest, and each
operation's latency runs from the moment it fell due to its answer (so a server that
falls behind shows it, instead of slowing the load down). The workload is the side-by-
side benchmark's call: reserve, 2 renews, release, over 10,000 accounts.

    python scripts/bench_latency.py --rates 5000,10000,15000 --seconds 10

Starts its own server on a fresh SQLite journal (default durability: ack after commit),
one run per rate, and prints one line per rate, then the run's slow journal commits from
the server's own histogram (`callcredit_journal_commit_duration_seconds`): a stall in
the answers that they do not account for was not the disk's.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import urllib.request
from collections import deque
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from callcredit.v1 import admin_pb2, admin_pb2_grpc, credit_control_pb2, credit_control_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loadtest.baselines.procs import free_port, process_cpu_seconds
from loadtest.baselines.workload import Histogram
from tests.service.processes import server_process

ACCOUNTS = 10_000
TARIFF_RATE = admin_pb2.Rate(
    prefix="", price_per_minute_micros=1_179_600_000, first_increment_seconds=6,
    next_increment_seconds=6, connect_fee=0,
)  # fmt: skip
MAX_OPS_PER_MESSAGE = 1_000  # what fell due in one tick; more waits for the next
USED_SECONDS = (20, 40, 50)  # reported by renew 1, renew 2, release


async def _setup(channel: grpc.aio.Channel) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    await admin.PutTariff(
        admin_pb2.PutTariffRequest(
            tariff=admin_pb2.Tariff(tariff_id="t", currency="VND", rates=[TARIFF_RATE])
        )
    )
    for n in range(ACCOUNTS):
        await admin.CreateAccount(
            admin_pb2.CreateAccountRequest(account_id=f"a{n}", currency="VND", tariff_id="t")
        )
        await admin.TopUp(
            admin_pb2.TopUpRequest(account_id=f"a{n}", amount=10**15, idempotency_key="k")
        )


class _Run:
    """One rate: operations due at `rate` per second, sent every tick, timed to the answer."""

    def __init__(self, rate: int, seconds: float, tick_seconds: float) -> None:
        self.rate = rate
        self.seconds = seconds
        self.tick_seconds = tick_seconds
        self.latency = Histogram()
        self.due: dict[str, float] = {}  # request_id -> when it fell due
        self.next_step: deque[tuple[str, int]] = deque()  # (call_id, step) due next
        self.answered = 0
        self.errors = 0
        self.late_sends = 0  # ticks that could not send all that was due

    def _operation(self, call_id: str, step: int, serial: int) -> credit_control_pb2.Operation:
        operation = credit_control_pb2.Operation(request_id=f"{call_id}:{step}")
        if step == 0:
            reserve = operation.reserve
            reserve.call_id = call_id
            reserve.account_id = f"a{serial % ACCOUNTS}"
            reserve.destination = "84901234567"
            reserve.requested_seconds = 60
        elif step < 3:
            renew = operation.renew
            renew.call_id = call_id
            renew.sequence = step
            renew.used_seconds = USED_SECONDS[step - 1]
            renew.requested_seconds = 60
        else:
            release = operation.release
            release.call_id = call_id
            release.used_seconds = USED_SECONDS[2]
        return operation

    async def drive(self, stub: credit_control_pb2_grpc.CreditControlServiceAsyncStub) -> None:
        call = stub.Control()
        loop = asyncio.get_running_loop()
        reader = asyncio.create_task(self._read(call))
        start = loop.time()
        sent = 0
        serial = 0
        # Each due operation is the next step of the oldest call with one waiting, or a
        # new call: calls run reserve -> renew -> renew -> release at the offered rate.
        while True:
            now = loop.time()
            if now - start >= self.seconds:
                break
            owed = int((now - start) * self.rate) - sent
            batch = min(owed, MAX_OPS_PER_MESSAGE)
            if owed > MAX_OPS_PER_MESSAGE:
                self.late_sends += 1
            operations = []
            for _ in range(batch):
                if self.next_step and len(self.next_step) > 64:
                    call_id, step = self.next_step.popleft()
                else:
                    call_id, step = f"r{self.rate}-c{serial}", 0
                    serial += 1
                operation = self._operation(call_id, step, serial)
                self.due[operation.request_id] = start + (sent + 1) / self.rate
                operations.append(operation)
                sent += 1
                if step < 3:
                    self.next_step.append((call_id, step + 1))
            if operations:
                await call.write(credit_control_pb2.ControlRequest(operations=operations))
            await asyncio.sleep(self.tick_seconds)
        # Release what is still open, untimed, so the run leaves nothing behind.
        closing = []
        for call_id, step in self.next_step:
            operation = self._operation(call_id, 3, 0)
            operation.request_id = f"{call_id}:close{step}"
            closing.append(operation)
        for i in range(0, len(closing), MAX_OPS_PER_MESSAGE):
            await call.write(
                credit_control_pb2.ControlRequest(operations=closing[i : i + MAX_OPS_PER_MESSAGE])
            )
        await call.done_writing()
        await reader

    async def _read(
        self,
        call: grpc.aio.StreamStreamCall[
            credit_control_pb2.ControlRequest, credit_control_pb2.ControlResponse
        ],
    ) -> None:
        loop = asyncio.get_running_loop()
        async for response in call:
            now = loop.time()
            for outcome in response.outcomes:
                due = self.due.pop(outcome.request_id, None)
                if outcome.WhichOneof("result") == "error":
                    self.errors += 1
                    if self.errors == 1:
                        print(f"first refusal: {outcome.request_id}: {outcome.error.message}")
                if due is not None:
                    self.latency.add(max(now - due, 0.0))
                    self.answered += 1


COMMIT_HISTOGRAM = "callcredit_journal_commit_duration_seconds"
SLOW_COMMIT_SECONDS = (0.05, 0.1, 0.25)  # bounds of the server's buckets (metrics.py)


def commit_buckets(metrics_port: int) -> dict[str, float]:
    """The server's commit-duration histogram: cumulative count per `le`, and `+Inf`."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        text: str = response.read().decode()
    return {
        sample.labels["le"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == COMMIT_HISTOGRAM
        for sample in family.samples
        if sample.name == COMMIT_HISTOGRAM + "_bucket"
    }


def slow_commits(before: dict[str, float], after: dict[str, float]) -> str:
    """How many commits between two reads took longer than each SLOW_COMMIT_SECONDS."""
    total = after["+Inf"] - before["+Inf"]
    over = [total - (after[str(bound)] - before[str(bound)]) for bound in SLOW_COMMIT_SECONDS]
    bounds = "/".join(f"{bound * 1000:.0f}" for bound in SLOW_COMMIT_SECONDS)
    return f"commits over {bounds} ms {'/'.join(f'{n:.0f}' for n in over)} of {total:,.0f}"


async def _main(args: argparse.Namespace, target: str, server_pid: int, metrics_port: int) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        await _setup(channel)
        stub = credit_control_pb2_grpc.CreditControlServiceStub(channel)
        for rate in args.rates:
            run = _Run(rate, args.seconds, args.tick_ms / 1000)
            cpu_before = process_cpu_seconds([server_pid])
            commits_before = commit_buckets(metrics_port)
            wall = time.perf_counter()
            await run.drive(stub)
            wall = time.perf_counter() - wall
            cpu = process_cpu_seconds([server_pid]) - cpu_before
            commits = slow_commits(commits_before, commit_buckets(metrics_port))
            print(
                f"offered {rate:>7,} ops/s  answered {run.answered / args.seconds:>8,.0f} ops/s  "
                f"p50 {run.latency.quantile_ms(0.5):7.2f} ms  "
                f"p99 {run.latency.quantile_ms(0.99):7.2f} ms  "
                f"max {run.latency.quantile_ms(1.0):7.2f} ms  "
                f"server CPU {cpu / wall * 100:4.0f}%  errors {run.errors}  "
                f"ticks over {MAX_OPS_PER_MESSAGE} ops {run.late_sends}  {commits}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--rates", default="5000,10000,15000", help="offered ops/s, comma-separated"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="per rate")
    parser.add_argument("--tick-ms", type=float, default=2.0, help="how often the client sends")
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()
    args.rates = [int(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{tmp}/latency.db"
        port = free_port()
        with server_process(url, "--metrics-listen", f"127.0.0.1:{port}") as (process, target):
            asyncio.run(_main(args, target, process.pid, port))


if __name__ == "__main__":
    main()
