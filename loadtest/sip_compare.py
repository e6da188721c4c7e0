"""Live SIP calls limited by credit, side by side: Kamailio with cnxcc, and Kamailio with
callcredit (issue 10).

The same SIPp scenarios (loadtest/sip/uac.xml calling loadtest/sip/uas.xml) run through

  cnxcc       Kamailio with integrations/kamailio/cnxcc.cfg: cnxcc_set_max_credit on the
              account's credit at a flat rate per second (Redis for its state), one
              Kamailio per credit_check_period (--periods, default 1,5,10);
  callcredit  Kamailio with integrations/kamailio/kamailio.cfg, the callcredit-kamailio
              adapter, and callcredit-server (a fresh SQLite journal), the account topped
              up with the same credit at the same flat rate, billed per second.

Scenarios, on --credit-seconds of credit (default 20) per scenario and system:

  single      one call that wants 3x the credit (60 s on 20 s)
  together    20 calls sent together (within 20 ms), each wanting 1.5x the credit
  sequential  two calls one after the other, each wanting 1.5x the credit

Per scenario and system it prints: calls admitted (answered) and refused (the SIP codes),
total talk time against the credit, the overshoot, the longest call, the answered calls
the callee never saw end (no BYE reached it: the carrier's leg stays up), what the talk
time costs billed per second call by call ("carrier bills"), what the system charged, and
whether every charge was exact. Talk time is measured independently of both systems: from
the callee's message trace (SIPp -trace_msg), its 200 OK to the BYE it receives, as the
carrier would bill it. A charge is exact when it is the rate times that talk time rounded
up to the second, allowing TALK_TOLERANCE_S for the clocks of two observers. callcredit's
charges are its calls' `charged` (AdminService.ListCalls), paired with the calls by the
adapter's call_id, and its ledger must add up: the credit minus the final balance equals
the charges. cnxcc keeps no ledger and names no call; what it deducted is observed in
Redis (its ended_calls_consumed_amount increments, read with MONITOR) and paired with the
calls in the order they ended.

Every scenario and system runs at once, each on its own ports, so one run takes about as
long as its longest call (~1 minute with the defaults):

    python loadtest/sip_compare.py
    python loadtest/sip_compare.py --scenarios single --credit-seconds 3 --periods 1
    python loadtest/sip_compare.py --json /tmp/sip_compare.json

Needs kamailio (with kamailio-extra-modules, kamailio-json-modules and, for the cnxcc
side, kamailio-cnxcc-modules), sipp, and Redis (--redis, a database of its own: --redis-db).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import TypeAlias

if __package__ in (None, ""):  # run as a script: make `loadtest` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from callcredit.admin import AdminClient, RateSpec
from callcredit.v1 import admin_pb2
from callcredit_server.kamailio.decisions import derive_call_id
from callcredit_server.launch import serving

REPO = Path(__file__).resolve().parent.parent
SCENARIO_DIR = REPO / "loadtest" / "sip"
CNXCC_CFG = REPO / "integrations" / "kamailio" / "cnxcc.cfg"
CALLCREDIT_CFG = REPO / "integrations" / "kamailio" / "kamailio.cfg"

# One flat rate on both sides: 1 unit of money per second of talk, billed per second.
RATE_PER_SECOND = 1
PRICE_PER_MINUTE_MICROS = RATE_PER_SECOND * 60 * 1_000_000  # callcredit's unit
CURRENCY = "EUR"
DESTINATION = "4930123456"

TALK_TOLERANCE_S = 0.1  # the callee and the charging system see a call end this far apart
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
CALL_MARGIN_S = 30.0  # a caller still running this long after its calls should end is hung
SETTLE_S = 1.0  # after the callers end: late BYEs to the callee, last Redis writes
TOGETHER_CALLS = 20


# -- processes -----------------------------------------------------------------------


def udp_port() -> int:
    """A UDP port free now on 127.0.0.1 (the kernel's choice; a short race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def sip_answers(port: int, timeout_seconds: float = 0.2) -> bool:
    """Whether something answers a SIP OPTIONS on 127.0.0.1:port (any status will do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        local = sock.getsockname()[1]
        request = (
            f"OPTIONS sip:probe@127.0.0.1:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bK-probe{time.monotonic_ns()}\r\n"
            f"From: <sip:probe@127.0.0.1:{local}>;tag=probe\r\n"
            f"To: <sip:probe@127.0.0.1:{port}>\r\n"
            f"Call-ID: probe-{time.monotonic_ns()}@127.0.0.1\r\n"
            "CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
        sock.sendto(request.encode(), ("127.0.0.1", port))
        sock.settimeout(timeout_seconds)
        try:
            return sock.recv(65536).startswith(b"SIP/2.0 ")
        except OSError:
            return False


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal a child we started and wait for it (SIGKILL if it lingers)."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass(frozen=True)
class Listening:
    port: int
    pid: int


@contextmanager
def kamailio(
    config: Path, defines: Sequence[str], workdir: Path, *, shm_mb: int = 64
) -> Iterator[Listening]:
    """Kamailio in the foreground on a SIP port of its own; yields that port and its
    main process's pid.

    `defines` are the -A values besides SIP_LISTEN; `shm_mb` its shared memory (64 MiB,
    Kamailio's default, holds a few hundred calls a second at most); its log is
    workdir/kamailio.log. It runs in a session of its own: on the way out, whatever it
    forked and left (its workers, when its main process had to be killed) is killed
    with its process group."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = udp_port()
    argv = ["kamailio", "-DD", "-E", "-Y", str(workdir), "-m", str(shm_mb), "-f", str(config)]
    argv += ["-A", f"SIP_LISTEN=udp:127.0.0.1:{port}"]
    for define in defines:
        argv += ["-A", define]
    log = workdir / "kamailio.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not sip_answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"kamailio did not start: {log.read_text(errors='replace')}")
        yield Listening(port, process.pid)
    finally:
        stop(process)
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


@dataclass(frozen=True)
class Callee:
    """A SIPp callee (loadtest/sip/uas.xml) and its message trace."""

    port: int
    trace: Path


@contextmanager
def callee(workdir: Path, *, trace_messages: bool = True) -> Iterator[Callee]:
    """The callee behind a proxy: answers every INVITE, talks until BYE, and traces its
    messages (unless told not to: a load test spares the callee the writing)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = udp_port()
    trace = workdir / "callee_messages.log"
    argv = [
        "sipp", "-sf", str(SCENARIO_DIR / "uas.xml"), "-i", "127.0.0.1", "-p", str(port),
        "-nostdin", "-trace_err", "-error_file", str(workdir / "callee_errors.log"),
    ]  # fmt: skip
    if trace_messages:
        argv += ["-trace_msg", "-message_file", str(trace)]
    process = subprocess.Popen(
        argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(0.2)  # sipp binds before it reads the scenario's first receive
        if process.poll() is not None:
            raise RuntimeError(f"the sipp callee exited at once ({process.returncode})")
        yield Callee(port, trace)
    finally:
        stop(process, signal.SIGUSR1)  # sipp's graceful quit


def sipp_caller_argv(
    proxy_port: int,
    workdir: Path,
    *,
    account: str,
    calls: int,
    hold_s: float,
    rate_per_s: float,
    limit: int,
    extra: Sequence[str] = (),
) -> list[str]:
    """The sipp command line of a caller (loadtest/sip/uac.xml) with a message trace."""
    return [
        "sipp", f"127.0.0.1:{proxy_port}", "-sf", str(SCENARIO_DIR / "uac.xml"),
        "-i", "127.0.0.1", "-p", str(udp_port()), "-s", DESTINATION,
        "-key", "account", account, "-m", str(calls), "-l", str(limit),
        "-r", str(rate_per_s), "-rp", "1000", "-recv_timeout", str(round(hold_s * 1000)),
        "-timeout", str(caller_timeout_s(calls, hold_s, rate_per_s, limit)), "-timeout_error",
        "-nostdin",
        "-trace_msg", "-message_file", str(workdir / "caller_messages.log"),
        "-trace_err", "-error_file", str(workdir / "caller_errors.log"),
        *extra,
    ]  # fmt: skip


def caller_timeout_s(calls: int, hold_s: float, rate_per_s: float, limit: int) -> int:
    """How long a caller may run before it is hung: placing its calls, then at most
    `limit` at a time each talking `hold_s`, plus CALL_MARGIN_S."""
    return math.ceil(calls / rate_per_s + math.ceil(calls / limit) * hold_s + CALL_MARGIN_S)


def run_caller(argv: Sequence[str], workdir: Path) -> int:
    """Run a sipp caller to its end; its exit status (0: every call as scripted)."""
    workdir.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(
        list(argv), cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    return completed.returncode


# -- what SIPp saw -------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    at: float  # seconds since the epoch, from sipp's trace (microseconds)
    sent: bool
    first_line: str
    call_id: str
    cseq_method: str


_TRACE_SEPARATOR = re.compile(r"^-{40,} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)$", re.MULTILINE)


def parse_message_trace(path: Path) -> list[Message]:
    """The messages of a sipp -trace_msg file, in order."""
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    parts = _TRACE_SEPARATOR.split(text)
    messages = []
    # parts: [before, stamp, block, stamp, block, ...]
    for stamp, block in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line.strip() for line in block.strip().splitlines()]
        if len(lines) < 2:
            continue
        sent = lines[0].startswith(("UDP message sent", "TCP message sent"))
        body = [line for line in lines[1:] if line]
        if not body:
            continue
        call_id = cseq = ""
        for line in body[1:]:
            name, _, value = line.partition(":")
            lowered = name.strip().lower()
            if lowered in ("call-id", "i") and not call_id:
                call_id = value.strip()
            elif lowered == "cseq" and not cseq:
                cseq = value.split()[-1] if value.split() else ""
        at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()
        messages.append(Message(at, sent, body[0], call_id, cseq))
    return messages


def status_code(first_line: str) -> int | None:
    """The status of a response's first line; None for a request."""
    if not first_line.startswith("SIP/2.0 "):
        return None
    return int(first_line.split()[1])


@dataclass(frozen=True)
class Talk:
    answered_at: float
    ended_at: float

    @property
    def seconds(self) -> float:
        return self.ended_at - self.answered_at


def talk_by_call(callee_trace: Sequence[Message]) -> dict[str, Talk]:
    """Per Call-ID, the callee's first 200 OK to the INVITE and the first BYE it received."""
    answered: dict[str, float] = {}
    ended: dict[str, float] = {}
    for message in callee_trace:
        if message.sent and message.cseq_method == "INVITE":
            if status_code(message.first_line) == 200:
                answered.setdefault(message.call_id, message.at)
        elif not message.sent and message.first_line.startswith("BYE "):
            ended.setdefault(message.call_id, message.at)
    return {c: Talk(answered[c], ended[c]) for c in answered if c in ended}


def final_answers(caller_trace: Sequence[Message]) -> dict[str, int]:
    """Per Call-ID of the caller, the status of the first final answer to its INVITE
    (0 if none came)."""
    finals: dict[str, int] = {}
    for message in caller_trace:
        if message.sent and message.first_line.startswith("INVITE "):
            finals.setdefault(message.call_id, 0)
        code = status_code(message.first_line)
        if (
            not message.sent
            and message.cseq_method == "INVITE"
            and code is not None
            and code >= 200
            and not finals.get(message.call_id)
        ):
            finals[message.call_id] = code
    return finals


# -- what cnxcc deducted -------------------------------------------------------------


@dataclass(frozen=True)
class Deduction:
    at: float
    account: str
    amount: Decimal


class RedisMonitor:
    """Reads Redis's MONITOR feed on a thread and keeps what cnxcc deducted per call.

    cnxcc adds each ended call's consumed amount to its customer's
    `ended_calls_consumed_amount` (HINCRBYFLOAT on cnxcc:money:<customer>); nothing else
    in its state outlives the customer's last call."""

    _LINE = re.compile(r"^\+(\d+\.\d+) \[(\d+) [^\]]*\] (.*)$")
    _ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')

    def __init__(self, host: str, port: int, db: int) -> None:
        self.db = db
        self.deductions: list[Deduction] = []
        self._lock = threading.Lock()
        self._sock = socket.create_connection((host, port), timeout=5)
        self._sock.sendall(b"MONITOR\r\n")
        self._file = self._sock.makefile("rb")
        if not self._file.readline().startswith(b"+OK"):
            raise RuntimeError("Redis refused MONITOR")
        self._sock.settimeout(None)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for raw in self._file:
                self._take(raw.decode(errors="replace").rstrip("\r\n"))
        except (OSError, ValueError):
            return  # closed

    def _take(self, line: str) -> None:
        found = self._LINE.match(line)
        if not found or int(found.group(2)) != self.db:
            return
        args = self._ARG.findall(found.group(3))
        if (
            len(args) == 4
            and args[0].upper() == "HINCRBYFLOAT"
            and args[1].startswith("cnxcc:money:")
            and args[2] == "ended_calls_consumed_amount"
        ):
            deduction = Deduction(
                float(found.group(1)), args[1].removeprefix("cnxcc:money:"), Decimal(args[3])
            )
            with self._lock:
                self.deductions.append(deduction)

    def of(self, account: str) -> list[Deduction]:
        with self._lock:
            return [d for d in self.deductions if d.account == account]

    def close(self) -> None:
        self._sock.close()


# -- scenarios and results -----------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    key: str
    calls: int
    hold_percent_of_credit: int  # each call wants this share of the credit's seconds
    together: bool  # all at once, or one after the other

    def hold_s(self, credit_seconds: int) -> float:
        return credit_seconds * self.hold_percent_of_credit / 100


SCENARIOS = {
    s.key: s
    for s in (
        Scenario("single", 1, 300, together=True),
        Scenario("together", TOGETHER_CALLS, 150, together=True),
        Scenario("sequential", 2, 150, together=False),
    )
}


@dataclass
class Result:
    scenario: str
    system: str
    check_period_s: int | None  # cnxcc's credit_check_period
    credit_seconds: int
    calls: int
    admitted: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # SIP status -> calls
    unanswered: int = 0  # no final answer seen at the caller
    never_ended: int = 0  # answered, but the callee never received a BYE
    talk_s: list[float] = field(default_factory=list)  # per admitted call, as billed
    charged: str = "n/a"  # money units, as the system recorded it
    charges_exact: str = "n/a"
    notes: list[str] = field(default_factory=list)

    @property
    def talk_total_s(self) -> float:
        return sum(self.talk_s)

    @property
    def carrier_bills(self) -> int:
        """What the talk time costs billed per second, call by call (money units)."""
        return RATE_PER_SECOND * sum(math.ceil(round(t, 3)) for t in self.talk_s)

    @property
    def overshoot_s(self) -> float:
        return max(0.0, self.talk_total_s - self.credit_seconds)

    @property
    def overshoot_percent(self) -> float:
        return 100.0 * self.overshoot_s / self.credit_seconds

    def row(self) -> dict[str, object]:
        return {
            **asdict(self),
            "talk_total_s": round(self.talk_total_s, 2),
            "overshoot_s": round(self.overshoot_s, 2),
            "overshoot_percent": round(self.overshoot_percent, 1),
            "carrier_bills": self.carrier_bills,
        }


def billed_seconds_bounds(talk_s: float) -> tuple[int, int]:
    """Per-second billing of a call the callee saw last `talk_s`: the least and most
    whole seconds a system that saw it TALK_TOLERANCE_S apart may bill."""
    return (
        max(0, math.ceil(round(talk_s - TALK_TOLERANCE_S, 6))),
        math.ceil(round(talk_s + TALK_TOLERANCE_S, 6)),
    )


def charge_is_exact(talk_s: float, charged: Decimal) -> bool:
    low, high = billed_seconds_bounds(talk_s)
    return any(charged == RATE_PER_SECOND * seconds for seconds in range(low, high + 1))


def money(amount: Decimal) -> str:
    """An amount without trailing zeros or an exponent (cnxcc writes 21.000000)."""
    return f"{amount.normalize():f}"


Pairs: TypeAlias = list[tuple[Talk, Decimal]]


def pair_in_end_order(
    talks: Sequence[Talk], charges: Sequence[tuple[float, Decimal]]
) -> tuple[Pairs, str]:
    """Calls and (ended_at, amount) charges paired in the order they ended, for a
    system that names no call (cnxcc); what could not be paired, if anything.

    Both the callee and the charging system see a call end at about the same moment, so
    the order is the same (calls ending within ms of each other last the same to
    within the tolerance)."""
    if len(talks) != len(charges):
        return [], f"{len(charges)} charges for {len(talks)} calls"
    ordered = sorted(talks, key=lambda t: t.ended_at)
    return [(t, amount) for t, (_, amount) in zip(ordered, sorted(charges), strict=True)], ""


def pair_by_call_id(talks: dict[str, Talk], charged: dict[str, Decimal]) -> tuple[Pairs, str]:
    """Calls (by SIP Call-ID) and callcredit's charges (by its call_id, which the
    adapter derives from the SIP Call-ID); what could not be paired, if anything."""
    ids = {derive_call_id(sip_call_id): sip_call_id for sip_call_id in talks}
    pairs = [(talks[sip], charged[call_id]) for call_id, sip in ids.items() if call_id in charged]
    unpaired = []
    if len(pairs) < len(talks):
        unpaired.append(f"{len(talks) - len(pairs)} calls without a charge")
    strangers = [call_id for call_id in charged if call_id not in ids and charged[call_id]]
    if strangers:
        unpaired.append(f"{len(strangers)} charges for calls the callee never saw end")
    return pairs, "; ".join(unpaired)


def judge_charges(pairs: Pairs, unpaired: str) -> str:
    """ "yes" if every call was paired with its charge and every charge is exact."""
    if unpaired:
        return f"no: {unpaired}"
    if not pairs:
        return "n/a (no call)"
    wrong = [
        f"{talk.seconds:.2f} s charged {money(amount)}"
        for talk, amount in pairs
        if not charge_is_exact(talk.seconds, amount)
    ]
    return "yes" if not wrong else f"no: {len(wrong)} of {len(pairs)} ({'; '.join(wrong[:3])})"


def observe(result: Result, caller_trace: Path, callee_trace: Path) -> dict[str, Talk]:
    """Fill admissions and talk time from the two traces; the talk of each admitted call
    that ended, by SIP Call-ID."""
    finals = final_answers(parse_message_trace(caller_trace))
    talks_all = talk_by_call(parse_message_trace(callee_trace))
    result.admitted = sum(1 for code in finals.values() if code == 200)
    result.unanswered = sum(1 for code in finals.values() if code == 0)
    result.refused = dict(
        sorted(Counter(str(code) for code in finals.values() if code not in (0, 200)).items())
    )
    talks = {c: talks_all[c] for c, code in finals.items() if code == 200 and c in talks_all}
    result.never_ended = result.admitted - len(talks)
    if result.unanswered:
        result.notes.append(f"{result.unanswered} INVITEs got no final answer")
    ordered = sorted(talks.values(), key=lambda t: t.answered_at)
    result.talk_s = [round(t.seconds, 3) for t in ordered]
    return talks


# -- the two systems -----------------------------------------------------------------


@dataclass
class Options:
    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    systems: tuple[str, ...] = ("cnxcc", "callcredit")
    periods: tuple[int, ...] = (1, 5, 10)
    credit_seconds: int = 20
    redis: str = "127.0.0.1:6379"
    redis_db: int = 11
    workdir: Path | None = None
    json_path: Path | None = None


@dataclass(frozen=True)
class Job:
    """One scenario through one proxy: the caller's command, where it writes."""

    scenario: Scenario
    system: str
    period: int | None
    account: str
    proxy_port: int
    callee: Callee
    workdir: Path

    def caller_argv(self, credit_seconds: int) -> list[str]:
        together = self.scenario.together
        return sipp_caller_argv(
            self.proxy_port,
            self.workdir,
            account=self.account,
            calls=self.scenario.calls,
            hold_s=self.scenario.hold_s(credit_seconds),
            rate_per_s=1000 if together else 10,
            limit=self.scenario.calls if together else 1,
        )


def account_name(scenario: Scenario, system: str, period: int | None, run_id: str) -> str:
    suffix = f"-p{period}" if period is not None else ""
    return f"{system}-{scenario.key}{suffix}-{run_id}"


async def _setup_callcredit(target: str, accounts: Sequence[str], credit: int) -> None:
    async with AdminClient(target) as admin:
        await admin.put_tariff("flat", CURRENCY, [RateSpec("", PRICE_PER_MINUTE_MICROS)])
        for account in accounts:
            await admin.create_account(account, currency=CURRENCY, tariff_id="flat")
            await admin.top_up(account, credit, idempotency_key=f"credit-{account}")


async def _callcredit_charges(
    target: str, account: str, credit: int
) -> tuple[dict[str, Decimal], list[str]]:
    """The account's calls' charges by call_id, and what does not add up in its ledger."""
    problems = []
    async with AdminClient(target) as admin:
        calls: list[admin_pb2.Call] = []
        page = ""
        while True:
            response = await admin.list_calls(account, page_token=page)
            calls.extend(response.calls)
            page = response.next_page_token
            if not page:
                break
        state = await admin.get_account(account)
        entries = await admin.list_entries(account)
    total = sum(c.charged for c in calls)
    if credit - state.balance != total:
        problems.append(f"credit {credit} - balance {state.balance} != charged {total}")
    if sum(e.amount for e in entries) != state.balance:
        problems.append("the ledger does not sum to the balance")
    if state.reserved or state.active_calls:
        problems.append(f"still held: {state.reserved} ({state.active_calls} calls)")
    return {c.call_id: Decimal(c.charged) for c in calls}, problems


@dataclass(frozen=True)
class CallcreditStack:
    target: str  # callcredit-server's
    sip_port: int  # Kamailio's
    callee: Callee
    pids: dict[str, int]  # by role: callcredit-server, kamailio (its main process), adapter


@contextmanager
def callcredit_proxy(
    workdir: Path, *, trace_callee: bool = True, shm_mb: int = 64
) -> Iterator[CallcreditStack]:
    """callcredit-server, Kamailio with kamailio.cfg and the adapter between them, and
    a callee behind."""
    workdir.mkdir(parents=True, exist_ok=True)
    server_args = [
        "--listen", "127.0.0.1:0", "--database-url", f"sqlite:///{workdir / 'journal.db'}",
        "--snapshot-dir", str(workdir / "snapshots"), "--log-level", "WARNING",
    ]  # fmt: skip
    events, rpc = tcp_port(), udp_port()
    with ExitStack() as stack:
        server = stack.enter_context(serving(server_args, workdir / "server.log"))
        target = server.target
        callee_ = stack.enter_context(callee(workdir / "callee", trace_messages=trace_callee))
        proxy = stack.enter_context(
            kamailio(
                CALLCREDIT_CFG,
                [
                    f'NEXT_HOP="sip:127.0.0.1:{callee_.port}"',
                    f'CC_EVENTS="127.0.0.1:{events}"',
                    f'CC_RPC="udp:127.0.0.1:{rpc}"',
                ],
                workdir / "kamailio",
                shm_mb=shm_mb,
            )
        )
        adapter_pid = stack.enter_context(adapter(target, events, rpc, workdir / "adapter.log"))
        pids = {"callcredit-server": server.pid, "kamailio": proxy.pid, "adapter": adapter_pid}
        yield CallcreditStack(target, proxy.port, callee_, pids)


@contextmanager
def adapter(target: str, events: int, rpc: int, log: Path) -> Iterator[int]:
    """`python -m callcredit_server.kamailio` connected to callcredit and Kamailio;
    yields its pid."""
    argv = [
        sys.executable, "-m", "callcredit_server.kamailio", "--target", target,
        "--events", f"127.0.0.1:{events}", "--rpc", f"127.0.0.1:{rpc}",
    ]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "connected" not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the adapter did not start: {log.read_text()}")
            time.sleep(0.05)
        yield process.pid
    finally:
        stop(process)


def run(options: Options) -> list[Result]:
    """Every scenario through every system at once; one Result per (scenario, system,
    period), in a stable order."""
    scenarios = [SCENARIOS[key] for key in options.scenarios]
    run_id = f"{int(time.time())}"
    with ExitStack() as stack:
        workdir = options.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        jobs: list[Job] = []
        monitor: RedisMonitor | None = None
        target = ""
        if "cnxcc" in options.systems:
            host, port = options.redis.rsplit(":", 1)
            monitor = RedisMonitor(host, int(port), options.redis_db)
            stack.callback(monitor.close)
            for period in options.periods:
                here = workdir / f"cnxcc-p{period}"
                callee_ = stack.enter_context(callee(here / "callee"))
                proxy = stack.enter_context(
                    kamailio(
                        CNXCC_CFG,
                        [
                            f'NEXT_HOP="sip:127.0.0.1:{callee_.port}"',
                            f'CC_RPC="udp:127.0.0.1:{udp_port()}"',
                            f'CNXCC_REDIS="addr={host};port={port};db={options.redis_db}"',
                            f"CREDIT={options.credit_seconds * RATE_PER_SECOND}",
                            f"COST_PER_SECOND={RATE_PER_SECOND}",
                            f"CREDIT_CHECK_PERIOD={period}",
                            "SIP_WORKERS=2",
                        ],
                        here / "kamailio",
                    )
                )
                jobs += [
                    Job(s, "cnxcc", period, account_name(s, "cnxcc", period, run_id),
                        proxy.port, callee_, here / s.key)
                    for s in scenarios
                ]  # fmt: skip
        if "callcredit" in options.systems:
            here = workdir / "callcredit"
            callcredit = stack.enter_context(callcredit_proxy(here))
            target = callcredit.target
            accounts = [account_name(s, "callcredit", None, run_id) for s in scenarios]
            asyncio.run(
                _setup_callcredit(target, accounts, options.credit_seconds * RATE_PER_SECOND)
            )
            jobs += [
                Job(
                    s,
                    "callcredit",
                    None,
                    account,
                    callcredit.sip_port,
                    callcredit.callee,
                    here / s.key,
                )
                for s, account in zip(scenarios, accounts, strict=True)
            ]
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            statuses = list(
                pool.map(
                    lambda job: run_caller(job.caller_argv(options.credit_seconds), job.workdir),
                    jobs,
                )
            )
        time.sleep(SETTLE_S)
        results = []
        for job, status in zip(jobs, statuses, strict=True):
            result = Result(
                job.scenario.key, job.system, job.period, options.credit_seconds, job.scenario.calls
            )
            talks = observe(result, job.workdir / "caller_messages.log", job.callee.trace)
            if status != 0:
                result.notes.append(f"sipp exited {status} (see {job.workdir})")
            if monitor is not None and job.system == "cnxcc":
                deducted = monitor.of(job.account)
                result.charged = money(sum((d.amount for d in deducted), Decimal(0)))
                pairs, unpaired = pair_in_end_order(
                    list(talks.values()), [(d.at, d.amount) for d in deducted]
                )
                result.charges_exact = judge_charges(pairs, unpaired)
            elif job.system == "callcredit":
                charged, problems = asyncio.run(
                    _callcredit_charges(
                        target, job.account, options.credit_seconds * RATE_PER_SECOND
                    )
                )
                result.charged = money(sum(charged.values(), Decimal(0)))
                result.charges_exact = judge_charges(*pair_by_call_id(talks, charged))
                result.notes += problems
            results.append(result)
    return results


# -- the report ----------------------------------------------------------------------

COLUMNS = (
    "scenario", "system", "check period", "calls", "admitted", "refused", "talk total s",
    "credit s", "overshoot s", "overshoot %", "longest call s", "never ended", "carrier bills",
    "charged", "charges exact",
)  # fmt: skip


def table(results: Sequence[Result]) -> str:
    """The results as a Markdown table (one row per scenario and system)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        refused = ", ".join(f"{n}x{code}" for code, n in r.refused.items()) or "0"
        cells = [
            r.scenario,
            r.system,
            f"{r.check_period_s} s" if r.check_period_s is not None else "-",
            str(r.calls),
            str(r.admitted),
            refused,
            f"{r.talk_total_s:.2f}",
            str(r.credit_seconds),
            f"{r.overshoot_s:.2f}",
            f"{r.overshoot_percent:.0f}%",
            f"{max(r.talk_s, default=0.0):.2f}",
            str(r.never_ended),
            str(r.carrier_bills),
            r.charged,
            r.charges_exact,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        f"- {r.scenario} / {r.system} {r.check_period_s or ''}: {n}"
        for r in results
        for n in r.notes
    ]
    return "\n".join(lines + (["", *notes] if notes else []))


def missing_tools(systems: Sequence[str]) -> list[str]:
    """What this machine lacks to run `systems` (empty: nothing)."""
    missing = [tool for tool in ("kamailio", "sipp") if shutil.which(tool) is None]
    if "cnxcc" in systems and not any(
        Path(folder, "cnxcc.so").exists() for folder in _kamailio_module_dirs()
    ):
        missing.append("kamailio's cnxcc module (kamailio-cnxcc-modules)")
    return missing


def _kamailio_module_dirs() -> list[str]:
    return [str(p) for p in Path("/usr/lib").glob("*/kamailio/modules")] + [
        "/usr/lib/kamailio/modules",
        "/usr/local/lib64/kamailio/modules",
    ]


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--systems", default="cnxcc,callcredit")
    parser.add_argument("--periods", default="1,5,10", help="cnxcc's credit_check_period values")
    parser.add_argument("--credit-seconds", type=int, default=20)
    parser.add_argument("--redis", default="127.0.0.1:6379")
    parser.add_argument("--redis-db", type=int, default=11)
    parser.add_argument("--workdir", type=Path, help="keep traces and logs here")
    parser.add_argument("--json", type=Path, dest="json_path", help="also write the rows here")
    args = parser.parse_args(argv)
    scenarios = tuple(s for s in args.scenarios.split(",") if s)
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    systems = tuple(s for s in args.systems.split(",") if s)
    if set(systems) - {"cnxcc", "callcredit"}:
        parser.error("--systems takes cnxcc and/or callcredit")
    return Options(
        scenarios=scenarios,
        systems=systems,
        periods=tuple(int(p) for p in args.periods.split(",") if p),
        credit_seconds=args.credit_seconds,
        redis=args.redis,
        redis_db=args.redis_db,
        workdir=args.workdir,
        json_path=args.json_path,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    missing = missing_tools(options.systems)
    if missing:
        print(f"cannot run: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    started = time.monotonic()
    results = run(options)
    print(table(results))
    print(f"\n{len(results)} runs in {time.monotonic() - started:.0f} s", file=sys.stderr)
    if options.json_path is not None:
        options.json_path.write_text(json.dumps([r.row() for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
