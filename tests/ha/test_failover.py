"""Hot standby failures with real processes on real PostgreSQL: a zombie primary, a
primary cut from the database, and servers racing for an empty journal."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from callcredit.v1 import admin_pb2, admin_pb2_grpc, credit_control_pb2, credit_control_pb2_grpc
from callcredit_server.core import Takeover
from callcredit_server.journal import Journal
from tests.crash.harness import (
    DESTINATIONS,
    CampaignConfig,
    EventLog,
    account_ids,
    read_snapshot,
    setup_accounts,
)
from tests.faults.conftest import PostgresSchema
from tests.faults.proxy import TcpProxy
from tests.ha.cluster import SERVING, HaCluster, health

pytestmark = pytest.mark.timeout(120)

LEASE_SECONDS = 2.0
RPC_TIMEOUT_SECONDS = 1.0
SEED_BALANCE = 600  # the first account of the crash campaign's specs


def refusal(error: grpc.RpcError) -> tuple[str, dict[str, str]]:
    """The ErrorInfo reason and metadata of a refused RPC."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, error
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    return info.reason, dict(info.metadata)


class TopUps(threading.Thread):
    """Top-ups of one account with unique keys, each sent to the servers in turn until
    one acknowledges it (the same key every time): a client that follows the primary."""

    def __init__(self, targets: list[str], account_id: str) -> None:
        super().__init__(daemon=True)
        self.targets = targets
        self.account_id = account_id
        self.acked: list[tuple[str, int, str, float]] = []  # (key, amount, target, when)
        self.stopping = threading.Event()

    def run(self) -> None:
        channels = {t: grpc.insecure_channel(t) for t in self.targets}
        turn = 0
        try:
            for n in range(1, 100_000):
                if self.stopping.is_set():
                    return
                key, amount = f"load-{n}", 1 + n % 7
                request = admin_pb2.TopUpRequest(
                    account_id=self.account_id, amount=amount, idempotency_key=key, reference=""
                )
                while True:
                    target = self.targets[turn % len(self.targets)]
                    try:
                        admin_pb2_grpc.AdminServiceStub(channels[target]).TopUp(
                            request, timeout=RPC_TIMEOUT_SECONDS
                        )
                    except grpc.RpcError:
                        turn += 1  # lost or NOT_PRIMARY: the same key to the next server
                        time.sleep(0.02)
                        continue
                    self.acked.append((key, amount, target, time.monotonic()))
                    break
        finally:
            for channel in channels.values():
                channel.close()


def ledger_top_ups(target: str, account_id: str) -> list[tuple[str, int]]:
    entries = read_snapshot(target, [account_id], get_calls=False).entries[account_id]
    return [(e.idempotency_key, e.amount) for e in entries if e.kind == admin_pb2.ENTRY_KIND_TOP_UP]


def balance(target: str, account_id: str) -> admin_pb2.Account:
    with grpc.insecure_channel(target) as channel:
        return (
            admin_pb2_grpc.AdminServiceStub(channel)
            .GetAccount(admin_pb2.GetAccountRequest(account_id=account_id), timeout=10)
            .account
        )


def deadline_ms(channel: grpc.Channel, call_id: str, account_id: str) -> int:
    """The open call's deadline as GetCall and ListCalls show it (they must agree)."""
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    call = admin.GetCall(admin_pb2.GetCallRequest(call_id=call_id), timeout=5).call
    listed = admin.ListCalls(
        admin_pb2.ListCallsRequest(account_id=account_id, active_only=True), timeout=5
    ).calls
    assert [c for c in listed if c.call_id == call_id] == [call]
    return int(call.expires_at.ToMilliseconds())


def wait_serving(cluster: HaCluster, slot: int, timeout_seconds: float) -> float:
    """Seconds until `slot` serves; fails if any other slot serves at the same instant."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_seconds:
        serving = [s for s in range(len(cluster.ports)) if health(cluster.target_of(s)) == SERVING]
        assert len(serving) <= 1, f"two primaries at once: {serving}"
        if serving == [slot]:
            return time.monotonic() - began
        time.sleep(0.02)
    raise AssertionError(
        f"slot {slot} not serving after {timeout_seconds} s:\n{cluster.slot_log(slot)}"
    )


def test_a_zombie_primary_acknowledges_nothing_and_its_calls_survive(
    pg_url: str, tmp_path: Path
) -> None:
    config = CampaignConfig(database_url=pg_url, workdir=tmp_path, validity_seconds=3, tag="z")
    cluster = HaCluster(config, lease_seconds=LEASE_SECONDS, renew_seconds=LEASE_SECONDS / 4)
    try:
        cluster.start()
        old = cluster.primary
        assert old is not None
        zombie_server = cluster.servers[old]
        assert zombie_server is not None
        zombie = zombie_server.process
        setup_accounts(cluster.target_of(old), "z", EventLog(tmp_path / "seed.events"))
        account = account_ids("z")[0]
        with grpc.insecure_channel(cluster.target_of(old)) as channel:
            dialer = credit_control_pb2_grpc.CreditControlServiceStub(channel)
            dialer.Reserve(
                credit_control_pb2.ReserveRequest(
                    call_id="z.call", account_id=account, destination=DESTINATIONS[2]
                ),
                timeout=5,
            )
            reserved_deadline = deadline_ms(channel, "z.call", account)
        reserved_at = time.monotonic()
        load = TopUps(cluster.targets.split(","), account)
        load.start()
        time.sleep(0.5)

        zombie.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        new = 1 - old
        took = wait_serving(cluster, new, timeout_seconds=LEASE_SECONDS + 10)
        assert took < LEASE_SECONDS + 2.0
        # The Takeover restarted the call's validity in memory, not in its history row:
        # GetCall and ListCalls both show the restarted deadline.
        with grpc.insecure_channel(cluster.target_of(new)) as channel:
            restarted_deadline = deadline_ms(channel, "z.call", account)
        assert restarted_deadline >= reserved_deadline + 1_000

        # Past the call's validity (3 s from its reserve) but not from the takeover:
        # the new primary restarted it, so the dialer that could not reach anyone renews.
        time.sleep(max(0.0, reserved_at + config.validity_seconds + 0.3 - time.monotonic()))
        with grpc.insecure_channel(cluster.target_of(new)) as channel:
            renewed = credit_control_pb2_grpc.CreditControlServiceStub(channel).Renew(
                credit_control_pb2.RenewRequest(call_id="z.call", sequence=1, used_seconds=3),
                timeout=5,
            )
        assert renewed.grant.allowed_seconds >= 3

        # A request queued at the zombie while it is stopped, then SIGCONT.
        answer: dict[str, object] = {}

        def ask_the_zombie() -> None:
            with grpc.insecure_channel(cluster.target_of(old)) as channel:
                try:
                    answer["ok"] = admin_pb2_grpc.AdminServiceStub(channel).TopUp(
                        admin_pb2.TopUpRequest(
                            account_id=account, amount=1_000, idempotency_key="zombie"
                        ),
                        timeout=15,
                    )
                except grpc.RpcError as exc:
                    answer["error"] = exc.code()

        asking = threading.Thread(target=ask_the_zombie)
        asking.start()
        time.sleep(0.3)
        zombie.send_signal(signal.SIGCONT)
        assert zombie.wait(timeout=60) == 3, cluster.slot_log(old)  # deposed
        asking.join(timeout=30)
        assert "ok" not in answer, "the zombie acknowledged a top-up after the takeover"
        time.sleep(0.5)
        load.stopping.set()
        load.join(timeout=30)

        # Nothing lost, nothing twice: the ledger is exactly the acknowledged top-ups.
        acked = {key: amount for key, amount, _, _ in load.acked}
        from_zombie = [when for _, _, target, when in load.acked
                       if target == cluster.target_of(old) and when > stopped_at + 0.5]  # fmt: skip
        assert from_zombie == [], "the zombie acknowledged top-ups after it was stopped"
        ledger = ledger_top_ups(cluster.target_of(new), account)
        assert sorted(ledger) == sorted([("z.seed", SEED_BALANCE), *acked.items()])
        view = balance(cluster.target_of(new), account)
        assert view.balance == SEED_BALANCE + sum(acked.values())
        assert view.active_calls == 1
        assert len(acked) > 10
        zombie_log = cluster.log_of(old)
        assert "deposed" in zombie_log
        new_log = cluster.log_of(new)
        assert "sessions of the old primary" in new_log  # its locks could not hold us up
    finally:
        for server in cluster.servers:
            if server is not None and server.process.poll() is None:
                server.process.send_signal(signal.SIGCONT)
        cluster.kill_all()


def test_a_primary_cut_from_postgresql_steps_down_and_the_standby_takes_over(
    postgres_schema: PostgresSchema, proxy: TcpProxy, tmp_path: Path
) -> None:
    direct = postgres_schema.url.render_as_string(hide_password=False)
    config = CampaignConfig(database_url=direct, workdir=tmp_path, tag="p")
    cluster = HaCluster(
        config,
        lease_seconds=LEASE_SECONDS,
        renew_seconds=LEASE_SECONDS / 4,
        database_urls=[postgres_schema.via(proxy.port), direct],
    )
    try:
        cluster.spawn(0)  # first, alone: it becomes the primary
        assert cluster.wait_for_primary() == 0
        cluster.start()  # and the standby
        setup_accounts(cluster.target_of(0), "p", EventLog(tmp_path / "seed.events"))
        account = account_ids("p")[0]
        proxy.stall()  # a partition: connections stay open, nothing gets through
        took = wait_serving(cluster, 1, timeout_seconds=LEASE_SECONDS + 10)
        assert took < LEASE_SECONDS + 2.0
        old = cluster.servers[0]
        assert old is not None
        assert old.process.wait(timeout=60) == 3, cluster.slot_log(0)  # stepped down
        assert balance(cluster.target_of(1), account).balance == SEED_BALANCE
        log = cluster.log_of(0)
        assert "deposed" in log
    finally:
        cluster.kill_all()


def test_servers_started_at_once_on_an_empty_journal_elect_exactly_one(
    pg_url: str, tmp_path: Path
) -> None:
    config = CampaignConfig(database_url=pg_url, workdir=tmp_path, tag="e")
    cluster = HaCluster(
        config, servers=3, lease_seconds=LEASE_SECONDS, renew_seconds=LEASE_SECONDS / 4
    )
    try:
        for slot in range(3):
            cluster.spawn(slot)
        primary = cluster.wait_for_primary()
        cluster.start()
        time.sleep(LEASE_SECONDS)  # renewals go on: still exactly one
        statuses = [health(cluster.target_of(slot)) for slot in range(3)]
        assert statuses.count(SERVING) == 1 and statuses[primary] == SERVING, statuses
        for slot in set(range(3)) - {primary}:
            with (
                grpc.insecure_channel(cluster.target_of(slot)) as channel,
                pytest.raises(grpc.RpcError) as refused,
            ):
                admin_pb2_grpc.AdminServiceStub(channel).GetAccount(
                    admin_pb2.GetAccountRequest(account_id="x"), timeout=5
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert refusal(refused.value) == (
                "NOT_PRIMARY",
                {"primary": cluster.target_of(primary)},
            )
        with Journal(pg_url) as journal:
            assert [command for _, _, command in journal.replay()] == [Takeover(epoch=1)]
    finally:
        cluster.kill_all()
