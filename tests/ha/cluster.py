"""Several `callcredit-server --ha` processes on one PostgreSQL journal, for tests and scripts.

`HaCluster` is the crash campaign's server (tests/crash/harness.py `run_campaign`) made
of a primary and standbys: `kill()` SIGKILLs the primary, `start()` restarts the dead
as standbys and returns once a primary serves (the takeover), and the clients' target
file names every server, so they must find the primary themselves (NOT_PRIMARY and
UNAVAILABLE are lost answers to them: tests/crash/client.py).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.crash.harness import (
    REPO_ROOT,
    STARTUP_TIMEOUT_S,
    CampaignConfig,
    CampaignReport,
    ServerFailed,
    Supervisor,
    _free_port,
    run_campaign,
    write_target,
)

HEALTH_TIMEOUT_S = 0.5
TAKEOVER_TIMEOUT_S = 60.0
SERVING = health_pb2.HealthCheckResponse.SERVING


def health(target: str) -> int | None:
    """The overall health status of the server at `target`; None if it does not answer."""
    with grpc.insecure_channel(target) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_TIMEOUT_S
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
        lease_s: float = 2.0,
        renew_s: float = 0.5,
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
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * servers
        self.logs: list[Path | None] = [None] * servers
        self.ha_args = ["--ha", "--lease-seconds", str(lease_s), "--lease-renew-seconds",
                        str(renew_s)]  # fmt: skip
        self.primary: int | None = None
        self.killed_at: float | None = None
        self.takeover_seconds: list[float] = []  # from a kill to a new primary serving

    def target_of(self, slot: int) -> str:
        return f"127.0.0.1:{self.ports[slot]}"

    @property
    def targets(self) -> str:
        return ",".join(self.target_of(slot) for slot in range(len(self.ports)))

    def spawn(self, slot: int) -> subprocess.Popen[bytes]:
        self.starts += 1
        log_path = self.workdir / f"server-{self.starts:03d}.log"
        target = self.target_of(slot)
        with log_path.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "callcredit_server.cli", "--listen", target,
                 "--advertise", target, "--database-url", self.urls[slot],
                 "--snapshot-dir", str(self.workdir / f"snapshots-{slot}"),
                 *self.serve_args, *self.ha_args],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=self.env,
            )  # fmt: skip
        self.procs[slot], self.logs[slot] = process, log_path
        return process

    def wait_for_primary(self, timeout_s: float = TAKEOVER_TIMEOUT_S) -> int:
        """The slot whose server reports SERVING, once one does."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for slot, process in enumerate(self.procs):
                alive = process is not None and process.poll() is None
                if alive and health(self.target_of(slot)) == SERVING:
                    return slot
            time.sleep(0.02)
        raise ServerFailed(f"no primary after {timeout_s:.0f} s:\n{self.log_tail()}")

    def start(self, *, same_port: bool = True, tries: int = 5) -> float:
        """Start every dead slot (as a standby); return once a primary serves."""
        del same_port, tries  # each slot keeps its port
        began = time.monotonic()
        for slot, process in enumerate(self.procs):
            if process is None or process.poll() is not None:
                self.spawn(slot)
        slot = self.wait_for_primary()
        if self.killed_at is not None:
            self.takeover_seconds.append(time.monotonic() - self.killed_at)
            self.killed_at = None
        self.primary = slot
        self.process, self._log = self.procs[slot], self.logs[slot]
        self.port, self.target = self.ports[slot], self.target_of(slot)
        write_target(self.workdir, self.targets)
        self._wait_listening(STARTUP_TIMEOUT_S)
        took = time.monotonic() - began
        self.start_seconds.append(took)
        return took

    def _wait_listening(self, timeout_s: float) -> None:
        """Every live slot has bound its port (a standby answers health NOT_SERVING)."""
        deadline = time.monotonic() + timeout_s
        for slot, process in enumerate(self.procs):
            while process is not None and health(self.target_of(slot)) is None:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise ServerFailed(f"slot {slot} did not start:\n{self.slot_log(slot)}")
                time.sleep(0.05)

    def slot_log(self, slot: int) -> str:
        log_path = self.logs[slot]
        return "" if log_path is None else log_path.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        """SIGKILL the primary."""
        if self.primary is None:
            return
        process = self.procs[self.primary]
        if process is not None:
            process.send_signal(signal.SIGKILL)
            process.wait()
        self.killed_at = time.monotonic()
        self.kills += 1
        self.procs[self.primary] = None
        self.primary, self.process = None, None

    def check_alive(self) -> None:
        for slot, process in enumerate(self.procs):
            if process is not None and process.poll() is not None:
                raise ServerFailed(
                    f"slot {slot} exited on its own ({process.returncode}):\n{self.slot_log(slot)}"
                )

    def stop(self) -> None:
        """SIGTERM every server (standbys first), SIGKILL any that hangs."""
        order = [s for s in range(len(self.procs)) if s != self.primary] + (
            [self.primary] if self.primary is not None else []
        )
        for slot in order:
            process = self.procs[slot]
            if process is None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            self.procs[slot] = None
        self.primary, self.process = None, None

    def kill_all(self) -> None:
        for slot, process in enumerate(self.procs):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
            self.procs[slot] = None


def run_ha_campaign(
    database_url: str,
    workdir: Path,
    *,
    kills: int,
    lease_s: float,
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
        kill_after_s=(0.3, 1.2),
        downtime_s=(0.0, 0.0),  # the standby is already running
        kill_in_recovery_probability=0.0,
        prune_every_kills=0,  # the standby tails the journal: nothing is pruned under it
        tag="ha",
    )
    cluster = HaCluster(config, lease_s=lease_s, renew_s=lease_s / 4)
    try:
        report = run_campaign(config, progress, server=cluster)
    finally:
        cluster.kill_all()
    return report, cluster


def takeover_line(cluster: HaCluster, lease_s: float) -> str:
    took = sorted(cluster.takeover_seconds) or [0.0]
    return (
        f"  takeovers {len(cluster.takeover_seconds)}: p50 {took[len(took) // 2]:.2f} s, "
        f"max {took[-1]:.2f} s (SIGKILL of the primary to the standby serving; "
        f"--lease-seconds {lease_s:g})"
    )
