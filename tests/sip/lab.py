"""A SIP lab on loopback: callcredit, the adapter, Kamailio and SIPp, as real processes.

    SIPp dialer (uac.xml) --> Kamailio (kamailio.cfg) --> SIPp carrier (uas.xml)
                                 |  evapi + JSON-RPC
                           callcredit-kamailio --> callcredit-server

Talk time is measured by the SIPp dialer (its 200 OK to the BYE it gets or sends), apart
from the adapter and Kamailio's own timestamps.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from callcredit.admin import AdminClient, RateSpec
from callcredit.v1 import admin_pb2
from callcredit_server.kamailio.decisions import derive_call_id

REPO = Path(__file__).resolve().parents[2]
KAMAILIO_CFG = REPO / "integrations" / "kamailio" / "kamailio.cfg"
SIPP_DIR = REPO / "integrations" / "kamailio" / "sipp"

START_TIMEOUT_SECONDS = 15.0
STOP_TIMEOUT_SECONDS = 5.0
DESTINATION = "84901234567"

UNIT_PER_SECOND = RateSpec("", 60_000_000)
"""1 minor unit per second, billed per second (1/1): credit of N covers N seconds."""

SETTLE_TIMEOUT_SECONDS = 10.0
UNENDED_SHOWN = 5
"""How many unended calls a dialer that did not finish names, with their log lines."""


def tool(name: str) -> str | None:
    """Where `name` is installed (kamailio lives in /usr/sbin, often off a user's PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


def _below_ephemeral() -> range:
    """Ports below the kernel's ephemeral range, which sockets bound to port 0 take from."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return range(max(1_024, low - 12_000), low)


_PORTS = _below_ephemeral()
_handed_out: set[int] = set()


def free_port(kind: int) -> int:
    """A loopback port free right now (SOCK_DGRAM or SOCK_STREAM), for a program to bind.

    Below the ephemeral range: a port 0 picks would be free here and taken a moment later
    by any socket bound to port 0 (every rpc() call's is), before the program binds it
    (SIPp then exits "Unable to bind main socket", once in a CI run). And never one
    handed out before in this process."""
    for port in random.sample(_PORTS, len(_PORTS)):
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, kind) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {_PORTS}")


def stop(process: subprocess.Popen[bytes], *, kill: bool = False) -> None:
    if process.poll() is None:
        if kill:
            process.kill()
        else:
            process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for(what: str, check: object, log: Path, process: subprocess.Popen[bytes]) -> None:
    """Poll `check()` until true; fail with the log if the process dies or time runs out."""
    assert callable(check)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not check():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what} did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)


def rpc(port: int, method: str, *params: object) -> object:
    """One JSON-RPC call to Kamailio's jsonrpcs UDP socket; None when unanswered."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        request = {"jsonrpc": "2.0", "method": method, "params": list(params), "id": 1}
        sock.sendto(json.dumps(request).encode(), ("127.0.0.1", port))
        try:
            answer = json.loads(sock.recv(65_535))
        except (TimeoutError, ConnectionRefusedError):
            return None
    return answer.get("result", answer.get("error"))


@dataclass
class CallRecord:
    """One dialed call as the SIPp dialer saw it (times: its ms clock)."""

    refused: int | None = None
    refused_ms: int | None = None
    answered_ms: int | None = None
    ended_ms: int | None = None
    ended_by_proxy: bool = False

    @property
    def talk_ms(self) -> int:
        if self.answered_ms is None or self.ended_ms is None:
            return 0
        return self.ended_ms - self.answered_ms


@dataclass
class CarrierLeg:
    """One call as the SIPp carrier saw it (times: its ms clock)."""

    answered_ms: int | None = None
    ended_ms: int | None = None


@dataclass
class Dial:
    """A SIPp dialer run: the process and, once finished, what each call did."""

    process: subprocess.Popen[bytes]
    log: Path
    started_at: float
    """time.monotonic() when the process was started (its clock's zero, give or take)."""
    calls: dict[str, CallRecord] = field(default_factory=dict)

    def wait(self, timeout_seconds: float) -> Dial:
        try:
            self.process.wait(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            stop(self.process)  # SIGTERM: SIPp writes out its log
            self._read()
            raise AssertionError(
                f"the SIPp dialer did not finish in {timeout_seconds} s\n{self._unended()}"
            ) from None
        self._read()
        return self

    def _unended(self) -> str:
        """The calls not ended yet, each with what the lab's other logs say of it."""
        unended = [
            sip
            for sip, call in self.calls.items()
            if call.refused is None and call.ended_ms is None
        ]
        logs = [
            (log.name, log.read_text(errors="replace").splitlines())
            for log in sorted(self.log.parent.glob("*.log"))
        ]
        lines = [f"calls not ended: {len(unended)} of {len(self.calls)}"]
        for sip_call_id in unended[:UNENDED_SHOWN]:
            lines.append(f"{sip_call_id}: {self.calls[sip_call_id]}")
            # Whole ids only: 1-42@host is not 11-42@host.
            mention = re.compile(
                rf"(?<![\w.@-])({re.escape(sip_call_id)}|{derive_call_id(sip_call_id)})(?![\w.@-])"
            )
            for name, log_lines in logs:
                lines.extend(f"  {name}: {line}" for line in log_lines if mention.search(line))
        return "\n".join(lines)

    def _read(self) -> None:
        for line in self.log.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            call = self.calls.setdefault(parts[0], CallRecord())
            what, value = parts[1], int(parts[2])
            if what == "refused":
                call.refused = value
                call.refused_ms = int(parts[3]) if len(parts) > 3 else None
            elif what == "answered":
                call.answered_ms = value
            elif what in ("bye_in", "bye_out"):
                call.ended_ms = value
                call.ended_by_proxy = what == "bye_in"

    @property
    def answered(self) -> list[CallRecord]:
        return [c for c in self.calls.values() if c.answered_ms is not None]

    def refused(self, status: int) -> list[CallRecord]:
        return [c for c in self.calls.values() if c.refused == status]


@dataclass
class Lab:
    folder: Path
    server_target: str
    sip_port: int = field(default_factory=lambda: free_port(socket.SOCK_DGRAM))
    events_port: int = field(default_factory=lambda: free_port(socket.SOCK_STREAM))
    rpc_port: int = field(default_factory=lambda: free_port(socket.SOCK_DGRAM))
    carrier_port: int = field(default_factory=lambda: free_port(socket.SOCK_DGRAM))
    reserve_timeout_seconds: float = 1.5
    adapter: subprocess.Popen[bytes] | None = None
    carrier: subprocess.Popen[bytes] | None = None
    carrier_log: Path | None = None
    adapter_starts: int = 0
    dials: int = 0

    def start_adapter(self) -> None:
        self.adapter_starts += 1
        log = self.folder / f"adapter-{self.adapter_starts}.log"
        with open(log, "wb") as out:
            self.adapter = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "callcredit_server.kamailio",
                    "--target",
                    self.server_target,
                    "--events",
                    f"127.0.0.1:{self.events_port}",
                    "--rpc",
                    f"127.0.0.1:{self.rpc_port}",
                    "--reserve-timeout",
                    str(self.reserve_timeout_seconds),
                    "--log-level",
                    "INFO",
                ],
                stderr=out,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        process = self.adapter
        wait_for(
            "callcredit-kamailio",
            lambda: "connected to kamailio events" in log.read_text(errors="replace"),
            log,
            process,
        )

    def kill_adapter(self) -> None:
        """kill -9: no release, no goodbye."""
        if self.adapter is not None:
            stop(self.adapter, kill=True)
            self.adapter = None

    def dial(self, account: str, calls: int, talk_seconds: float, *, rate: int = 1000) -> Dial:
        """Start `calls` SIPp calls for `account`, each wanting `talk_seconds` of talk, `rate`
        per second (1000: together)."""
        self.dials += 1
        log = self.folder / f"uac-{self.dials}.log"
        out = self.folder / f"uac-{self.dials}.out"
        with open(out, "wb") as output:
            process = subprocess.Popen(
                [
                    str(tool("sipp")),
                    f"127.0.0.1:{self.sip_port}",
                    "-sf",
                    str(SIPP_DIR / "uac.xml"),
                    "-i",
                    "127.0.0.1",
                    "-p",
                    str(free_port(socket.SOCK_DGRAM)),
                    "-key",
                    "account",
                    account,
                    "-key",
                    "destination",
                    DESTINATION,
                    "-recv_timeout",
                    str(int(talk_seconds * 1000)),
                    "-m",
                    str(calls),
                    "-l",
                    str(calls),
                    "-r",
                    str(rate),
                    "-trace_logs",
                    "-log_file",
                    str(log),
                    "-nostdin",
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        return Dial(process, log, time.monotonic())

    def carrier_ends(self) -> dict[str, CarrierLeg]:
        """Each call the carrier answered, by SIP Call-ID, with whether a BYE reached it."""
        legs: dict[str, CarrierLeg] = {}
        if self.carrier_log is None or not self.carrier_log.exists():
            return legs
        for line in self.carrier_log.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] in ("answered", "ended"):
                leg = legs.setdefault(parts[0], CarrierLeg())
                if parts[1] == "ended":
                    leg.ended_ms = int(parts[2])
                else:
                    leg.answered_ms = int(parts[2])
        return legs

    def dialogs(self) -> list[object]:
        found = rpc(self.rpc_port, "dlg.list")
        return found if isinstance(found, list) else []


@contextmanager
def running(argv: list[str], log: Path, what: str) -> Iterator[subprocess.Popen[bytes]]:
    """The process in a session of its own; on the way out it is stopped, and whatever
    it forked and left (Kamailio's workers, when its main process had to be killed) is
    killed with its process group."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        stop(process)
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


@contextmanager
def kamailio(lab: Lab) -> Iterator[subprocess.Popen[bytes]]:
    """Kamailio with integrations/kamailio/kamailio.cfg on the lab's ports."""
    run_dir = lab.folder / "kamailio-run"
    run_dir.mkdir()
    log = lab.folder / "kamailio.log"
    argv = [
        str(tool("kamailio")),
        "-f",
        str(KAMAILIO_CFG),
        "-DD",
        "-E",
        "-Y",
        str(run_dir),
        "-m",
        "64",
        "-M",
        "8",
        "-A",
        f"SIP_LISTEN=udp:127.0.0.1:{lab.sip_port}",
        "-A",
        f'NEXT_HOP="sip:127.0.0.1:{lab.carrier_port}"',
        "-A",
        f'CC_EVENTS="127.0.0.1:{lab.events_port}"',
        "-A",
        f'CC_RPC="udp:127.0.0.1:{lab.rpc_port}"',
    ]
    with running(argv, log, "kamailio") as process:
        wait_for("kamailio", lambda: rpc(lab.rpc_port, "core.uptime") is not None, log, process)
        yield process


@contextmanager
def carrier(lab: Lab) -> Iterator[subprocess.Popen[bytes]]:
    """The SIPp carrier behind Kamailio: answers every call, talks until a BYE."""
    lab.carrier_log = lab.folder / "uas.log"
    argv = [
        str(tool("sipp")),
        "-sf",
        str(SIPP_DIR / "uas.xml"),
        "-i",
        "127.0.0.1",
        "-p",
        str(lab.carrier_port),
        "-trace_logs",
        "-log_file",
        str(lab.carrier_log),
        "-nostdin",
    ]
    with running(argv, lab.folder / "uas.out", "sipp carrier") as process:
        time.sleep(0.2)
        if process.poll() is not None:
            raise AssertionError("the SIPp carrier did not start")
        yield process


async def funded(admin: AdminClient, account_id: str, amount: int, *, max_calls: int = 100) -> None:
    """An account on 1 unit per second (tariff per-second) with `amount` on it."""
    await admin.create_account(
        account_id, currency="USD", tariff_id="per-second", max_concurrent_calls=max_calls
    )
    if amount:
        await admin.top_up(account_id, amount, idempotency_key=f"seed-{account_id}")


async def settled(admin: AdminClient, account_id: str) -> admin_pb2.Account:
    """The account once no call of it is open (every call released or expired)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
    while True:
        account = await admin.get_account(account_id)
        if account.active_calls == 0 or time.monotonic() > deadline:
            return account
        await asyncio.sleep(0.1)


async def calls_of(admin: AdminClient, account_id: str) -> dict[str, admin_pb2.Call]:
    """Every call of the account, by call_id."""
    page = await admin.list_calls(account_id, limit=1000)
    return {call.call_id: call for call in page.calls}


async def assert_ledger(
    admin: AdminClient, account: admin_pb2.Account
) -> list[admin_pb2.LedgerEntry]:
    """The ledger sums to the balance; returns its entries."""
    entries = await admin.list_entries(account.account_id, limit=1000)
    assert sum(entry.amount for entry in entries) == account.balance
    return entries


def assert_billed(call: admin_pb2.Call, record: CallRecord) -> None:
    """callcredit charged the call for its talk time, every started second (1 unit/s)."""
    assert call.state == admin_pb2.CALL_STATE_RELEASED, call
    assert call.shortfall == 0, call
    assert call.charged == call.used_seconds, call
    assert_billed_seconds(call.used_seconds, record.talk_ms)


def assert_billed_seconds(used_seconds: int, talk_ms: int) -> None:
    """used_seconds is the talk time with every started second counted. The dialer's
    clock and Kamailio's see the answer and the BYE a few ms apart: allow that much
    either side of a whole second."""
    low, high = (talk_ms - 50) / 1000, (talk_ms + 50) / 1000
    assert math.ceil(low) <= used_seconds <= math.ceil(high), (used_seconds, talk_ms)


def call_id(sip_call_id: str) -> str:
    return derive_call_id(sip_call_id)
