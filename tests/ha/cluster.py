"""Several `callcredit-server --ha` processes on one PostgreSQL journal, for tests and scripts.

`HaCluster` is the crash campaign's server (tests/crash/harness.py `run_campaign`) made
of a primary and standbys: `kill()` SIGKILLs the primary, `start()` restarts the dead
as standbys and returns once a primary serves (the takeover), and the clients' target
file names every server, so they must find the primary themselves (NOT_PRIMARY and
UNAVAILABLE are lost answers to them: tests/crash/client.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from callcredit_server import launch
from tests.crash.harness import (
    REPO_ROOT,
    STARTUP_TIMEOUT_SECONDS,
    CampaignConfig,
    CampaignReport,
    ServerFailed,
    Supervisor,
    _free_port,
    run_campaign,
    write_target,
)

HEALTH_TIMEOUT_SECONDS = 0.5
TAKEOVER_TIMEOUT_SECONDS = 60.0
SERVING = health_pb2.HealthCheckResponse.SERVING


def health(target: str) -> int | None:
    """The overall health status of the server at `target`; None if it does not answer."""
    with grpc.insecure_channel(target) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_TIMEOUT_SECONDS
            )
        except grpc.RpcError:
            return None
    return int(answer.status)


class HaCluster(Supervisor):
    """`servers` --ha processes; slot i always listens on the same port."""

    restarts_validity = True  # a takeover journals Takeover

    def __init__(
        self,
        config: CampaignConfig,
        *,
        servers: int = 2,
        lease_seconds: float = 2.0,
        renew_seconds: float = 0.5,
        database_urls: list[str] | None = None,
    ) -> None:
        super().__init__(config)
        ports: list[int] = []
        while len(ports) < servers:
            port = _free_port(avoid=ports[-1] if ports else None)
            if port not in ports:
                ports.append(port)
        self.ports = ports
        self.urls = database_urls or [config.database_url] * servers
        self.servers: list[launch.ServerProcess | None] = [None] * servers
        self.ha_args = ["--ha", "--lease-seconds", str(lease_seconds), "--lease-renew-seconds",
                        str(renew_seconds)]  # fmt: skip
        self.primary: int | None = None
        self.killed_at: float | None = None
        self.takeover_seconds: list[float] = []  # from a kill to a new primary serving

    def target_of(self, slot: int) -> str:
        return f"127.0.0.1:{self.ports[slot]}"

    @property
    def targets(self) -> str:
        return ",".join(self.target_of(slot) for slot in range(len(self.ports)))

    def process_of(self, slot: int) -> launch.ServerProcess | None:
        """The live server of `slot`, if any."""
        server = self.servers[slot]
        return server if server is not None and server.process.poll() is None else None

    def spawn(self, slot: int) -> launch.ServerProcess:
        """Start slot's server (the launcher's ready file says it listens, as a standby)."""
        self.starts += 1
        target = self.target_of(slot)
        args = ["--listen", target, "--advertise", target, "--database-url", self.urls[slot],
                "--snapshot-dir", str(self.workdir / f"snapshots-{slot}"),
                *self.serve_args, *self.ha_args]  # fmt: skip
        server = launch.spawn(
            args, self.workdir / f"server-{self.starts:03d}.log", env=self.env, cwd=REPO_ROOT
        )
        self.servers[slot] = server
        return server

    def wait_for_primary(self, timeout_seconds: float = TAKEOVER_TIMEOUT_SECONDS) -> int:
        """The slot whose server reports SERVING, once one does."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            for slot in range(len(self.servers)):
                if self.process_of(slot) and health(self.target_of(slot)) == SERVING:
                    return slot
            time.sleep(0.02)
        raise ServerFailed(f"no primary after {timeout_seconds:.0f} s:\n{self.log_tail()}")

    def start(self, *, same_port: bool = True, tries: int = 5) -> float:
        """Start every dead slot (as a standby); return once a primary serves."""
        del same_port, tries  # each slot keeps its port
        began = time.monotonic()
        for slot in range(len(self.servers)):
            if self.process_of(slot) is None:
                self.spawn(slot)
        slot = self.wait_for_primary()
        if self.killed_at is not None:
            self.takeover_seconds.append(time.monotonic() - self.killed_at)
            self.killed_at = None
        self.primary = slot
        self._server = self.servers[slot]
        self.process = self._server.process if self._server is not None else None
        self.port, self.target = self.ports[slot], self.target_of(slot)
        write_target(self.workdir, self.targets)
        for other in self.servers:  # every standby listens too
            if other is not None:
                try:
                    other.wait_ready(STARTUP_TIMEOUT_SECONDS)
                except launch.ServerDidNotStart as exc:
                    raise ServerFailed(f"a standby did not start: {exc}") from exc
        took = time.monotonic() - began
        self.start_seconds.append(took)
        return took

    def slot_log(self, slot: int) -> str:
        server = self.servers[slot]
        return "" if server is None else server.log_text()[-3000:]

    def log_of(self, slot: int) -> str:
        server = self.servers[slot]
        return "" if server is None else server.log_text()

    def kill(self) -> None:
        """SIGKILL the primary."""
        if self.primary is None:
            return
        server = self.servers[self.primary]
        if server is not None:
            server.stop(kill=True)
        self.killed_at = time.monotonic()
        self.kills += 1
        self.servers[self.primary] = None
        self.primary, self.process = None, None

    def check_alive(self) -> None:
        for slot, server in enumerate(self.servers):
            if server is not None and server.process.poll() is not None:
                raise ServerFailed(
                    f"slot {slot} exited on its own ({server.process.returncode}):\n"
                    f"{self.slot_log(slot)}"
                )

    def stop(self) -> None:
        """SIGTERM every server (standbys first), SIGKILL any that hangs."""
        order = [s for s in range(len(self.servers)) if s != self.primary] + (
            [self.primary] if self.primary is not None else []
        )
        for slot in order:
            server = self.servers[slot]
            if server is not None:
                server.stop(timeout_seconds=30)
            self.servers[slot] = None
        self.primary, self.process = None, None

    def kill_all(self) -> None:
        for slot, server in enumerate(self.servers):
            if server is not None:
                server.stop(kill=True)
            self.servers[slot] = None


def run_ha_campaign(
    database_url: str,
    workdir: Path,
    *,
    kills: int,
    lease_seconds: float,
    seed: int,
    clients: int = 3,
    progress: Callable[[str], None] | None = None,
) -> tuple[CampaignReport, HaCluster]:
    """The crash campaign against a primary and a standby: each kill is a takeover."""
    config = CampaignConfig(
        database_url=database_url,
        workdir=workdir,
        kills=kills,
        clients=clients,
        seed=seed,
        kill_after_seconds=(0.3, 1.2),
        downtime_seconds=(0.0, 0.0),  # the standby is already running
        kill_in_recovery_probability=0.0,
        prune_every_kills=0,  # the standby tails the journal: nothing is pruned under it
        tag="ha",
    )
    cluster = HaCluster(config, lease_seconds=lease_seconds, renew_seconds=lease_seconds / 4)
    try:
        report = run_campaign(config, progress, server=cluster)
    finally:
        cluster.kill_all()
    return report, cluster


def takeover_line(cluster: HaCluster, lease_seconds: float) -> str:
    took = sorted(cluster.takeover_seconds) or [0.0]
    return (
        f"  takeovers {len(cluster.takeover_seconds)}: p50 {took[len(took) // 2]:.2f} s, "
        f"max {took[-1]:.2f} s (SIGKILL of the primary to the standby serving; "
        f"--lease-seconds {lease_seconds:g})"
    )
