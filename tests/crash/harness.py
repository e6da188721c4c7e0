"""Crash-test harness: a real server killed with SIGKILL under real client processes.

Used by `tests/crash/test_kill9.py` (a short run per backend) and
`scripts/crash_loop.py` (a long one). One campaign:

1. starts `callcredit-server` on a fresh journal and creates a tariff and a few
   accounts (the harness logs its seed top-ups like a client would);
2. starts client processes (`python -m tests.crash.client`, see client.py) that
   drive a mixed campaign over gRPC: reserves, renews and releases over one
   multiplexed Control stream and over the unary RPCs, top-ups and adjustments
   with idempotency keys, duplicates (in one ControlRequest, right after the
   answer, and again after a reconnect) and retries of every unanswered
   operation with the same ids;
3. kills the server with SIGKILL at random moments, sometimes while it is
   still starting (importing, replaying), and restarts it on the same database,
   on the same port or on a new one. The current target is in `<workdir>/target`;
   clients re-read it when they lose the server. The server writes a snapshot
   every `snapshot_every_records` records (so kills land during snapshots and
   starts recover from them), and every few kills `callcredit-server prune --yes`
   deletes the journal records a snapshot covers, under load;
4. restarts it a last time, tells the clients to stop (`<workdir>/stop`), waits
   for them, reads the final state through AdminService (GetAccount,
   ListEntries, ListCalls, GetCall) and checks it against every client's log
   (`verify`), kills it once more without load and checks the restarted state
   is the same (`compare_restart`), stops it, and runs `callcredit-server
   verify` over the journal and snapshots. Server logs are scanned too: a
   CRITICAL line (the writer stopped) is a violation, a failed snapshot a finding.

Client logs (`<workdir>/*.events`) are JSON lines, flushed per line, one per
event: `ack` (an answer the client received; `req` what was sent, `ans` what
came back), `refused`, `unanswered` (sent, never answered: abandoned after a
lost answer or still pending when the client stopped), `dup` (a duplicate and
its answer), `push`, `read`, `left_open`, `violation` (something the client saw
that must not happen), `stats`.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

from callcredit.v1 import admin_pb2, admin_pb2_grpc
from callcredit_server import launch

REPO_ROOT = Path(__file__).resolve().parents[2]
TARGET_FILE = "target"
STOP_FILE = "stop"
EVENTS_SUFFIX = ".events"
DOMAIN = "callcredit.v1"
STARTUP_TIMEOUT_SECONDS = 60.0
ADMIN_TIMEOUT_SECONDS = 20.0
PAGE = 1_000
MICROS_PER_MINUTE = 60_000_000

TARIFF_ID = "crash"
CURRENCY = "VND"
RATES = (
    # 1 đ/s billed per second.
    admin_pb2.Rate(prefix="", price_per_minute_micros=60_000_000,
                   first_increment_seconds=1, next_increment_seconds=1, connect_fee=0),
    # 1.5 đ/s in 6-second steps with a connect fee: rounding and fees in every charge.
    admin_pb2.Rate(prefix="84", price_per_minute_micros=90_000_000,
                   first_increment_seconds=6, next_increment_seconds=6, connect_fee=2),
    # 0.5 đ/s, 30 s first then 6 s steps.
    admin_pb2.Rate(prefix="1", price_per_minute_micros=30_000_000,
                   first_increment_seconds=30, next_increment_seconds=6, connect_fee=1),
)  # fmt: skip
DESTINATIONS = ("+84901234567", "84912345678", "15551234567", "+4420797000")


@dataclass(frozen=True, slots=True)
class AccountSpec:
    suffix: str
    seed_amount: int
    top_up_weight: int  # how often clients top it up, relative to the others
    credit_limit: int = 0
    max_concurrent_calls: int = 0


ACCOUNT_SPECS = (
    AccountSpec("a0", seed_amount=600, top_up_weight=6),
    AccountSpec("a1", seed_amount=400, top_up_weight=3, max_concurrent_calls=4),  # a cap
    # Little money, few top-ups: refusals, grants cut short (final), pushes on top-up.
    AccountSpec("a2", seed_amount=60, top_up_weight=1, credit_limit=40),
)


# ------------------------------------------------------------------ configuration


@dataclass(frozen=True, slots=True)
class CampaignConfig:
    """One campaign. The defaults are the CI variant: well under a minute per backend."""

    database_url: str
    workdir: Path
    kills: int = 6  # SIGKILLs under load (kills during recovery come on top)
    clients: int = 3  # client processes
    call_workers: int = 3  # concurrent calls per client process
    seed: int = 0
    kill_after_seconds: tuple[float, float] = (0.3, 1.5)  # how long the server serves before a kill
    downtime_seconds: tuple[float, float] = (0.0, 0.3)  # between a kill and the next start
    kill_in_recovery_probability: float = 0.15  # also kill a start before it serves
    same_port_probability: float = 0.5  # restart on the old port (else a new one)
    warmup_seconds: float = 1.0  # load before the first kill
    validity_seconds: int = 6  # short: calls silent across a restart expire, late releases
    client_stop_grace_seconds: float = 30.0  # a stopping client retries this long, then gives up
    quiet_kill_check: bool = True  # kill once more without load; state must not change
    snapshot_every_records: int = 100  # often: kills land while a snapshot is written
    prune_every_kills: int = 3  # `callcredit-server prune --yes` under load (0: never)
    tag: str = "r"  # prefixes every id, so runs on a shared database do not collide


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """What one client process is told (as JSON on its command line)."""

    workdir: str
    client_id: int
    seed: int
    tag: str
    accounts: tuple[str, ...]
    top_up_weights: tuple[int, ...]
    call_workers: int
    unary_probability: float = 0.3  # an attempt goes over a unary RPC, else the stream
    batch_duplicate_probability: float = 0.1  # a stream reserve sent twice in one message
    duplicate_probability: float = 0.15  # an answered op is sent again at once
    replay_probability: float = 0.3  # an answered release/top-up is sent again after reconnect
    abandon_probability: float = 0.05  # after a lost answer, give the op up (never retried)
    leave_open_probability: float = 0.05  # a call is never released
    silent_probability: float = 0.04  # a call goes silent for silent_seconds before its release
    silent_seconds: float = 8.0  # longer than the server's validity: it expires first
    adjust_probability: float = 0.15  # money ops that are adjustments instead of top-ups
    read_probability: float = 0.2  # a GetAccount after a money op
    op_timeout_seconds: float = 10.0
    stop_grace_seconds: float = 30.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ClientConfig:
        data = json.loads(text)
        data["accounts"] = tuple(data["accounts"])
        data["top_up_weights"] = tuple(data["top_up_weights"])
        return cls(**data)


def account_ids(tag: str) -> list[str]:
    return [f"{tag}.{spec.suffix}" for spec in ACCOUNT_SPECS]


# ------------------------------------------------------------------ files


def write_target(workdir: Path, target: str) -> None:
    """Atomically name the server clients should use."""
    tmp = workdir / f"{TARGET_FILE}.tmp"
    tmp.write_text(target + "\n", encoding="utf-8")
    os.replace(tmp, workdir / TARGET_FILE)


def read_target(workdir: Path) -> str | None:
    try:
        text = (workdir / TARGET_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text or None


class EventLog:
    """An append-only JSON-lines log, flushed per line (only the server gets killed)."""

    def __init__(self, path: Path) -> None:
        self._file: IO[str] = path.open("a", encoding="utf-8")

    def write(self, ev: str, **fields: Any) -> None:
        self._file.write(json.dumps({"ev": ev, "t": round(time.time(), 3), **fields}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


@dataclass(frozen=True, slots=True)
class Event:
    """One line of a client's log."""

    who: str
    line: int
    ev: str
    op: str
    req: dict[str, Any]
    ans: dict[str, Any]
    raw: dict[str, Any]

    def where(self) -> str:
        return f"{self.who}:{self.line}"


def load_events(workdir: Path) -> tuple[list[Event], list[str]]:
    """Every event of every log in workdir, and the lines that could not be read."""
    events: list[Event] = []
    unreadable: list[str] = []
    for path in sorted(workdir.glob(f"*{EVENTS_SUFFIX}")):
        who = path.name.removesuffix(EVENTS_SUFFIX)
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                raw = json.loads(text)
            except json.JSONDecodeError:
                unreadable.append(f"{who}:{number}: {text[:120]!r}")
                continue
            events.append(
                Event(
                    who=who,
                    line=number,
                    ev=str(raw.get("ev", "")),
                    op=str(raw.get("op", "")),
                    req=dict(raw.get("req") or {}),
                    ans=dict(raw.get("ans") or {}),
                    raw=raw,
                )
            )
    return events, unreadable


# ------------------------------------------------------------------ rating (independent)


def billed_seconds(rate: admin_pb2.Rate, seconds: int) -> int:
    if seconds <= 0:
        return 0
    rest = max(0, seconds - rate.first_increment_seconds)
    steps = -(-rest // rate.next_increment_seconds)
    return rate.first_increment_seconds + steps * rate.next_increment_seconds


def cost(rate: admin_pb2.Rate, seconds: int) -> int:
    if seconds <= 0:
        return 0
    price = billed_seconds(rate, seconds) * rate.price_per_minute_micros
    return rate.connect_fee + -(-price // MICROS_PER_MINUTE)


# ------------------------------------------------------------------ server process


class ServerFailed(Exception):
    """The server did not come up (or died on its own): always a finding."""


class Supervisor:
    """Starts, kills and restarts `callcredit-server` on one database."""

    restarts_validity = False  # does a restart restart open calls' validity (tests/ha)?

    def __init__(self, config: CampaignConfig, env: dict[str, str] | None = None) -> None:
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.database_url = config.database_url
        self.workdir = config.workdir
        self.journal_args = [
            "--database-url", config.database_url,
            "--snapshot-dir", str(config.workdir / "snapshots"),
        ]  # fmt: skip
        self.serve_args = [
            "--validity-seconds", str(config.validity_seconds),
            "--snapshot-every-records", str(config.snapshot_every_records),
            "--log-level", "INFO",
            "--drain-seconds", "0",  # the clean stop at the end: no drain (tests/ops tests it)
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.target: str | None = None
        self.starts = 0
        self.kills = 0
        self.recovery_kills = 0
        self.recovery_kills_after_replay = 0  # replay was over already
        self.start_seconds: list[float] = []
        self._server: launch.ServerProcess | None = None

    def _spawn(self, port: int) -> launch.ServerProcess:
        self.starts += 1
        log_path = self.workdir / f"server-{self.starts:03d}.log"
        args = ["--listen", f"127.0.0.1:{port}", *self.journal_args, *self.serve_args]
        server = launch.spawn(args, log_path, env=self.env, cwd=REPO_ROOT)
        self.process = server.process
        self._server = server
        return server

    def start(self, *, same_port: bool, tries: int = 5) -> float:
        """Start and wait until it serves; the seconds that took.

        Not on the same port: on another free one, so clients must find it.
        """
        began = time.monotonic()
        port = self.port if same_port and self.port else _free_port(avoid=self.port)
        server = self._spawn(port)
        while True:
            if server.poll_ready():
                self.port = server.port
                self.target = f"127.0.0.1:{self.port}"
                write_target(self.workdir, self.target)
                took = time.monotonic() - began
                self.start_seconds.append(took)
                return took
            code = server.process.poll()
            if code is not None:
                text = server.log_text()
                if tries > 1 and "could not start" in text and "bind" in text.lower():
                    # the port was taken meanwhile
                    return self.start(same_port=False, tries=tries - 1)
                raise ServerFailed(f"server start #{self.starts} exited {code}:\n{text[-3000:]}")
            if time.monotonic() - began > STARTUP_TIMEOUT_SECONDS:
                raise ServerFailed(f"server start #{self.starts} not serving after 60 s")
            time.sleep(0.02)

    def start_and_kill_in_recovery(self, rng: random.Random) -> None:
        """Start on the same port and SIGKILL it before it serves: while it opens the
        journal and replays it (the end of the usual time to serve), or while it imports."""
        usual = sorted(self.start_seconds)[len(self.start_seconds) // 2]
        server = self._spawn(self.port or 0)
        time.sleep(rng.uniform(0.6, 1.0) * usual)
        self.recovery_kills += 1
        text = server.log_text()
        if "recovered" in text:  # replay was over: it was binding or serving
            self.recovery_kills_after_replay += 1
        self.kill()

    def kill(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is not None and self._server is not None:
            text = self._server.log_text()
            if self._server.poll_ready() or "could not start" in text:
                raise ServerFailed(
                    f"server #{self.starts} died before it was killed "
                    f"(exit {self.process.returncode}):\n{text[-3000:]}"
                )
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.kills += 1
        self.process = None

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None and self._server:
            text = self._server.log_text()
            raise ServerFailed(
                f"server #{self.starts} exited on its own ({self.process.returncode}):\n"
                f"{text[-3000:]}"
            )

    def stop(self) -> None:
        """SIGTERM (a clean stop), SIGKILL if it hangs."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def tool(self, *command: str) -> tuple[int, str]:
        """`callcredit-server <command> --database-url ... --snapshot-dir ...`: (exit, output)."""
        done = subprocess.run(
            [sys.executable, "-m", "callcredit_server.cli", *command, *self.journal_args],
            capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, check=False,
        )  # fmt: skip
        return done.returncode, (done.stdout + done.stderr).strip()

    def log_tail(self, chars: int = 3000) -> str:
        if self._server is None:
            return ""
        return self._server.log_text()[-chars:]

    def wait_for_log(self, pattern: str, timeout_seconds: float = 30.0) -> re.Match[str]:
        """The first match of `pattern` in the current server's log, once it is there."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            found = re.search(pattern, self.log_tail(chars=1 << 30))
            if found:
                return found
            if time.monotonic() > deadline:
                raise ServerFailed(f"no {pattern!r} in the server log:\n{self.log_tail()}")
            time.sleep(0.05)


def _free_port(avoid: int | None) -> int:
    """A port nothing listens on now, other than `avoid` (the kernel likes to reuse it)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port != avoid:
            return port
    raise ServerFailed("no free port")


@contextmanager
def admin_stub(target: str) -> Iterator[admin_pb2_grpc.AdminServiceStub]:
    channel = grpc.insecure_channel(target)
    try:
        yield admin_pb2_grpc.AdminServiceStub(channel)
    finally:
        channel.close()


def setup_accounts(target: str, tag: str, log: EventLog) -> None:
    """The tariff and the accounts; seed top-ups are logged like any acknowledged one."""
    with admin_stub(target) as admin:
        admin.PutTariff(
            admin_pb2.PutTariffRequest(
                tariff=admin_pb2.Tariff(tariff_id=f"{tag}.{TARIFF_ID}", currency=CURRENCY,
                                        rates=RATES)
            ),
            timeout=ADMIN_TIMEOUT_SECONDS,
        )  # fmt: skip
        for spec, account_id in zip(ACCOUNT_SPECS, account_ids(tag), strict=True):
            admin.CreateAccount(
                admin_pb2.CreateAccountRequest(
                    account_id=account_id, currency=CURRENCY, tariff_id=f"{tag}.{TARIFF_ID}",
                    credit_limit=spec.credit_limit,
                    max_concurrent_calls=spec.max_concurrent_calls,
                ),
                timeout=ADMIN_TIMEOUT_SECONDS,
            )  # fmt: skip
            req = {"account": account_id, "key": f"{tag}.seed", "amount": spec.seed_amount,
                   "reference": "seed"}  # fmt: skip
            answer = admin.TopUp(
                admin_pb2.TopUpRequest(
                    account_id=account_id, amount=spec.seed_amount,
                    idempotency_key=f"{tag}.seed", reference="seed",
                ),
                timeout=ADMIN_TIMEOUT_SECONDS,
            )  # fmt: skip
            log.write("ack", op="topup", req=req, ans=account_answer(answer.account),
                      attempts=1, via=["unary"])  # fmt: skip


def account_answer(account: admin_pb2.Account) -> dict[str, Any]:
    """An Account answer as logged."""
    return {
        "balance": account.balance,
        "reserved": account.reserved,
        "available": account.available,
        "credit_limit": account.credit_limit,
        "active_calls": account.active_calls,
        "status": account.status,
    }


# ------------------------------------------------------------------ final state


@dataclass(slots=True)
class Snapshot:
    """What the server answers about the campaign's accounts (AdminService only)."""

    accounts: dict[str, admin_pb2.Account]
    entries: dict[str, list[admin_pb2.LedgerEntry]]  # ListEntries, every page
    calls: dict[str, admin_pb2.Call]  # ListCalls of every account, every page
    active_listed: dict[str, list[str]]  # ListCalls(active_only=True)
    got: dict[str, admin_pb2.Call] = field(default_factory=dict)  # GetCall of every call

    def same_as(self, other: Snapshot) -> bool:
        return (
            self.accounts == other.accounts
            and self.entries == other.entries
            and self.calls == other.calls
            and self.active_listed == other.active_listed
        )


def _list_calls(
    admin: admin_pb2_grpc.AdminServiceStub, account_id: str, *, active_only: bool
) -> list[admin_pb2.Call]:
    calls: list[admin_pb2.Call] = []
    token = ""
    while True:
        page = admin.ListCalls(
            admin_pb2.ListCallsRequest(
                account_id=account_id, active_only=active_only, limit=PAGE, page_token=token
            ),
            timeout=ADMIN_TIMEOUT_SECONDS,
        )
        calls.extend(page.calls)
        token = page.next_page_token
        if not token:
            return calls


def _list_entries(
    admin: admin_pb2_grpc.AdminServiceStub, account_id: str
) -> list[admin_pb2.LedgerEntry]:
    entries: list[admin_pb2.LedgerEntry] = []
    after = 0
    while True:
        page = admin.ListEntries(
            admin_pb2.ListEntriesRequest(account_id=account_id, after_entry_id=after, limit=PAGE),
            timeout=ADMIN_TIMEOUT_SECONDS,
        )
        entries.extend(page.entries)
        if len(page.entries) < PAGE:
            return entries
        after = page.entries[-1].entry_id


def read_snapshot(target: str, accounts: Sequence[str], *, get_calls: bool) -> Snapshot:
    with admin_stub(target) as admin:
        snapshot = Snapshot({}, {}, {}, {})
        for account_id in accounts:
            snapshot.accounts[account_id] = admin.GetAccount(
                admin_pb2.GetAccountRequest(account_id=account_id), timeout=ADMIN_TIMEOUT_SECONDS
            ).account
            snapshot.entries[account_id] = _list_entries(admin, account_id)
            for call in _list_calls(admin, account_id, active_only=False):
                snapshot.calls[call.call_id] = call
            snapshot.active_listed[account_id] = [
                c.call_id for c in _list_calls(admin, account_id, active_only=True)
            ]
        if get_calls:
            for call_id in snapshot.calls:
                snapshot.got[call_id] = admin.GetCall(
                    admin_pb2.GetCallRequest(call_id=call_id), timeout=ADMIN_TIMEOUT_SECONDS
                ).call
        return snapshot


def stable_snapshot(target: str, accounts: Sequence[str], attempts: int = 30) -> Snapshot:
    """A read (with GetCall of every call) that a second read finds unchanged.

    Calls left open may expire while we read; the state only moves forward, so
    if the second read equals the first, nothing changed during the first.
    """
    for _ in range(attempts):
        current = read_snapshot(target, accounts, get_calls=True)
        if read_snapshot(target, accounts, get_calls=False).same_as(current):
            return current
        time.sleep(0.3)
    raise ServerFailed("the final state kept changing with no client running")


# ------------------------------------------------------------------ verification

ACTIVE = admin_pb2.CALL_STATE_ACTIVE
RELEASED = admin_pb2.CALL_STATE_RELEASED
EXPIRED = admin_pb2.CALL_STATE_EXPIRED
TOP_UP = admin_pb2.ENTRY_KIND_TOP_UP
ADJUSTMENT = admin_pb2.ENTRY_KIND_ADJUSTMENT
CALL_CHARGE = admin_pb2.ENTRY_KIND_CALL_CHARGE
EXPIRY_CHARGE = admin_pb2.ENTRY_KIND_EXPIRY_CHARGE
REFUND = admin_pb2.ENTRY_KIND_REFUND
MONEY_KIND = {"topup": TOP_UP, "adjust": ADJUSTMENT}
# Refusals a campaign may meet; anything else is a finding.
EXPECTED_REFUSALS = {
    "reserve": {"INSUFFICIENT_FUNDS", "CONCURRENT_CALL_LIMIT", "CALL_ALREADY_ENDED"},
    "renew": {"CALL_ALREADY_ENDED"},
    "release": set(),
    "topup": set(),
    "adjust": {"INSUFFICIENT_FUNDS"},
}


class Verifier:
    """Every client log against the final state; `violations` lists what does not hold.

    `check(name, ok, text, *args)` counts a passed check or records a violation;
    `text.format(*args)` is only built for a violation.
    """

    def __init__(self, snapshot: Snapshot, events: Sequence[Event]) -> None:
        self.s = snapshot
        self.events = events
        self.violations: list[str] = []
        self.passed: Counter[str] = Counter()
        self.entries_of_call: dict[str, list[admin_pb2.LedgerEntry]] = defaultdict(list)
        self.entries_of_key: dict[tuple[str, str], list[admin_pb2.LedgerEntry]] = defaultdict(list)
        self.balances_seen: dict[str, set[int]] = {}
        for account_id, entries in snapshot.entries.items():
            self.balances_seen[account_id] = {0} | {e.balance_after for e in entries}
            for entry in entries:
                if entry.call_id:
                    self.entries_of_call[entry.call_id].append(entry)
                if entry.idempotency_key:
                    self.entries_of_key[(account_id, entry.idempotency_key)].append(entry)
        self.by_kind: dict[tuple[str, str], list[Event]] = defaultdict(list)
        self.reserves: dict[str, list[Event]] = defaultdict(list)  # call_id -> what was sent
        self.releases: dict[str, list[Event]] = defaultdict(list)
        self.money: dict[tuple[str, str], list[Event]] = defaultdict(list)
        for event in events:
            self.by_kind[(event.ev, event.op)].append(event)
            if event.ev in ("ack", "refused", "unanswered"):
                if event.op == "reserve":
                    self.reserves[event.req["call"]].append(event)
                elif event.op == "release":
                    self.releases[event.req["call"]].append(event)
                elif event.op in MONEY_KIND:
                    self.money[(event.req["account"], event.req["key"])].append(event)

    def check(self, name: str, ok: bool, text: str = "", *args: object) -> bool:
        if ok:
            self.passed[name] += 1
        else:
            self.violations.append(f"{name}: {text.format(*args)}")
        return ok

    def run(self) -> Verifier:
        self._accounts()
        self._conservation()
        self._calls()
        self._reserves()
        self._renews()
        self._releases()
        self._money()
        self._duplicates()
        self._pushes_and_reads()
        self._client_findings()
        return self

    # -- accounts and money -------------------------------------------------

    def _accounts(self) -> None:
        entry_ids: set[int] = set()
        for account_id, a in self.s.accounts.items():
            active = [
                c for c in self.s.calls.values() if c.account_id == account_id and c.state == ACTIVE
            ]
            self.check("available >= 0", a.available >= 0, "{}", a)
            self.check(
                "available == balance + credit_limit - reserved",
                a.available == a.balance + a.credit_limit - a.reserved,
                "{}",
                a,
            )
            holds = sum(c.held for c in active)
            self.check(
                "reserved == sum of open calls' holds",
                a.reserved == holds,
                "{}: reserved {}, holds of open calls {}",
                account_id,
                a.reserved,
                holds,
            )
            self.check(
                "active_calls == open calls",
                a.active_calls == len(active),
                "{}: {} != {}",
                account_id,
                a.active_calls,
                len(active),
            )
            listed = set(self.s.active_listed.get(account_id, []))
            open_ids = {c.call_id for c in active}
            self.check(
                "ListCalls(active_only) lists exactly the ACTIVE calls",
                listed == open_ids,
                "{}: differ in {}",
                account_id,
                sorted(listed ^ open_ids),
            )
            running = 0
            last_id = 0
            for entry in self.s.entries.get(account_id, []):
                running += entry.amount
                self.check(
                    "entry balance_after chains",
                    entry.balance_after == running,
                    "{} expected balance_after {}",
                    entry,
                    running,
                )
                self.check(
                    "entry ids increase, unique across accounts",
                    entry.entry_id > last_id and entry.entry_id not in entry_ids,
                    "{} after {}",
                    entry.entry_id,
                    last_id,
                )
                self.check("entry sign matches its kind", _sign_ok(entry), "{}", entry)
                entry_ids.add(entry.entry_id)
                last_id = entry.entry_id
            self.check(
                "balance == sum of entries",
                a.balance == running,
                "{}: balance {}, entries sum to {}",
                account_id,
                a.balance,
                running,
            )

    def _conservation(self) -> None:
        totals: Counter[int] = Counter()
        for entries in self.s.entries.values():
            for entry in entries:
                totals[entry.kind] += entry.amount
        top_ups, adjustments = totals[TOP_UP], totals[ADJUSTMENT]
        charges = -(totals[CALL_CHARGE] + totals[EXPIRY_CHARGE])
        refunds = totals[REFUND]
        balances = sum(a.balance for a in self.s.accounts.values())
        self.check(
            "money conserved: top-ups + adjustments - charges + refunds == balances",
            top_ups + adjustments - charges + refunds == balances,
            "{} + {} - {} + {} != {}",
            top_ups,
            adjustments,
            charges,
            refunds,
            balances,
        )
        charged = sum(c.charged for c in self.s.calls.values())
        self.check(
            "sum of calls' charged == charges - refunds",
            charged == charges - refunds,
            "calls charged {}, entries {} - {}",
            charged,
            charges,
            refunds,
        )
        acked = sum(e.req["amount"] for e in self.by_kind[("ack", "topup")])
        maybe = sum(e.req["amount"] for e in self.by_kind[("unanswered", "topup")])
        self.check(
            "acked top-ups <= ledger top-ups <= acked + unanswered",
            acked <= top_ups <= acked + maybe,
            "acked {}, ledger {}, unanswered {}",
            acked,
            top_ups,
            maybe,
        )

    # -- calls ---------------------------------------------------------------

    def _calls(self) -> None:
        for call_id, call in self.s.calls.items():
            got = self.s.got.get(call_id)
            self.check("GetCall == ListCalls", got == call, "GetCall {} ListCalls {}", got, call)
            sent = self.reserves.get(call_id, [])
            if self.check(
                "every call was reserved by a client",
                bool(sent),
                "{} in {}: nobody reserved it",
                call_id,
                call.account_id,
            ):
                req = sent[0].req
                self.check(
                    "a call has the account and destination it was reserved with",
                    (call.account_id, call.destination)
                    == (req["account"], req["dest"].removeprefix("+")),
                    "{}: {} {} vs {}",
                    call_id,
                    call.account_id,
                    call.destination,
                    req,
                )
            entries = self.entries_of_call.get(call_id, [])
            paid = -sum(e.amount for e in entries)
            self.check(
                "a call's entries sum to -charged",
                paid == call.charged,
                "{}: charged {}, entries {}",
                call_id,
                call.charged,
                entries,
            )
            kinds = Counter(e.kind for e in entries)
            if call.state == ACTIVE:
                self.check(
                    "an open call holds the cost of its allowance, nothing charged",
                    call.held == cost(call.rate, call.allowed_seconds)
                    and call.charged == 0
                    and not entries,
                    "{}",
                    call,
                )
            else:
                self.check("an ended call holds nothing", call.held == 0, "{}", call)
            if call.state == RELEASED:
                self.check(
                    "a released call has one CALL_CHARGE (if charged) and nothing else",
                    kinds == (Counter({CALL_CHARGE: 1}) if call.charged else Counter()),
                    "{} charged {}: {}",
                    call_id,
                    call.charged,
                    entries,
                )
                self.check(
                    "released: charged + shortfall == cost(used)",
                    call.charged + call.shortfall == cost(call.rate, call.used_seconds),
                    "{}",
                    call,
                )
                sent_used = {e.req["used"] for e in self.releases.get(call_id, [])}
                self.check(
                    "a released call was released by a client, with that used_seconds",
                    call.used_seconds in sent_used,
                    "{} used {}, releases sent {}",
                    call_id,
                    call.used_seconds,
                    sent_used,
                )
            if call.state == EXPIRED:
                self.check(
                    "an expired call has one EXPIRY_CHARGE (if any) and at most one REFUND",
                    kinds[EXPIRY_CHARGE] <= 1
                    and kinds[REFUND] <= 1
                    and set(kinds) <= {EXPIRY_CHARGE, REFUND},
                    "{}: {}",
                    call_id,
                    entries,
                )
        for event in self.by_kind[("left_open", "")]:
            left = self.s.calls.get(event.raw["call"])
            self.check(
                "a call left open was not released",
                left is None or left.state != RELEASED,
                "{} {}",
                event.where(),
                left,
            )

    def _reserves(self) -> None:
        for event in self.by_kind[("ack", "reserve")]:
            call = self.s.calls.get(event.req["call"])
            if call is None:
                self.check(
                    "acked reserve: the call exists", False, "{} {}", event.where(), event.raw
                )
                continue
            self.check(
                "acked reserve: the call exists, its grant never below the acked one",
                call.allowed_seconds >= event.ans["allowed"],
                "{} acked {}, call {}",
                event.where(),
                event.ans,
                call,
            )
            self.check(
                "acked reserve: held == cost(allowed)",
                event.ans["held"] == cost(call.rate, event.ans["allowed"]),
                "{} {}",
                event.where(),
                event.ans,
            )
        for event in self.by_kind[("refused", "reserve")]:
            call = self.s.calls.get(event.req["call"])
            if event.raw["reason"] == "CALL_ALREADY_ENDED":
                self.check(
                    "reserve refused CALL_ALREADY_ENDED: a retry of a call that ended",
                    event.raw["attempts"] > 1 and call is not None and call.state != ACTIVE,
                    "{} {} call {}",
                    event.where(),
                    event.raw,
                    call,
                )
            else:
                self.check(
                    "refused reserve: no call",
                    call is None,
                    "{} refused {} yet {}",
                    event.where(),
                    event.raw["reason"],
                    call,
                )

    def _renews(self) -> None:
        for event in self.by_kind[("ack", "renew")]:
            call = self.s.calls.get(event.req["call"])
            if call is None:
                self.check("acked renew: the call exists", False, "{} {}", event.where(), event.raw)
                continue
            self.check(
                "acked renew is in the call (sequence, used_seconds, allowance)",
                call.last_sequence >= event.req["seq"]
                and call.used_seconds >= event.req["used"]
                and call.allowed_seconds >= event.ans["allowed"],
                "{} acked {} {}, call {}",
                event.where(),
                event.req,
                event.ans,
                call,
            )
            self.check(
                "acked renew: held == cost(allowed)",
                event.ans["held"] == cost(call.rate, event.ans["allowed"]),
                "{} {}",
                event.where(),
                event.ans,
            )
        for event in self.by_kind[("refused", "renew")]:
            call = self.s.calls.get(event.req["call"])
            self.check(
                "renew refused CALL_ALREADY_ENDED: the call expired",
                call is not None and call.state == EXPIRED,
                "{} {} call {}",
                event.where(),
                event.raw,
                call,
            )

    def _releases(self) -> None:
        for event in self.by_kind[("ack", "release")]:
            call = self.s.calls.get(event.req["call"])
            if call is None:
                self.check(
                    "acked release: the call exists", False, "{} {}", event.where(), event.raw
                )
                continue
            ans = event.ans
            self.check(
                "acked release is the call's final result (state, used, charged, shortfall)",
                call.state in (RELEASED, EXPIRED)
                and call.used_seconds == event.req["used"]
                and call.charged == ans["charged"]
                and call.shortfall == ans["shortfall"],
                "{} acked {} {}, call {}",
                event.where(),
                event.req,
                ans,
                call,
            )
            self.check(
                "acked release: billed_seconds of used",
                ans["billed"] == billed_seconds(call.rate, event.req["used"]),
                "{} {} rate {}",
                event.where(),
                ans,
                call.rate,
            )
            entries = self.entries_of_call.get(call.call_id, [])
            if call.state == RELEASED:
                charges = [e for e in entries if e.kind == CALL_CHARGE]
                if ans["charged"]:
                    self.check(
                        "acked release: exactly one CALL_CHARGE of the acked amount, "
                        "with the acked balance after it",
                        len(charges) == 1
                        and charges[0].amount == -ans["charged"]
                        and charges[0].balance_after == ans["balance"],
                        "{} {}: {}",
                        event.where(),
                        ans,
                        charges,
                    )
                else:
                    self.check(
                        "acked release of nothing: no charge, a balance the ledger had",
                        not charges and ans["balance"] in self.balances_seen[call.account_id],
                        "{} {}: {}",
                        event.where(),
                        ans,
                        charges,
                    )
            else:  # expired, then released late: re-rated, the difference refunded
                refunds = [e for e in entries if e.kind == REFUND]
                self.check(
                    "acked late release: the refund (if any) left the acked balance",
                    (len(refunds) == 1 and refunds[0].balance_after == ans["balance"])
                    or (not refunds and ans["balance"] in self.balances_seen[call.account_id]),
                    "{} {}: {}",
                    event.where(),
                    ans,
                    refunds,
                )
        for event in self.by_kind[("unanswered", "release")]:
            call = self.s.calls.get(event.req["call"])
            self.check(
                "unanswered release: applied whole or not at all",
                call is None or call.state != RELEASED or call.used_seconds == event.req["used"],
                "{} {}, call {}",
                event.where(),
                event.req,
                call,
            )

    def _money(self) -> None:
        for (account_id, key), sent in self.money.items():
            entries = self.entries_of_key.get((account_id, key), [])
            for event in sent:
                kind = MONEY_KIND[event.op]
                same = all(
                    e.kind == kind
                    and e.amount == event.req["amount"]
                    and e.reference == event.req["reference"]
                    for e in entries
                )
                if event.ev == "ack":
                    self._account_answer(event, event.ans)
                    self.check(
                        f"acked {event.op}: exactly one entry, the acked amount and balance",
                        len(entries) == 1
                        and same
                        and entries[0].balance_after == event.ans["balance"],
                        "{} {} {}: {}",
                        event.where(),
                        event.req,
                        event.ans,
                        entries,
                    )
                elif event.ev == "unanswered":
                    self.check(
                        f"unanswered {event.op}: one entry or none",
                        len(entries) <= 1 and same,
                        "{} {}: {}",
                        event.where(),
                        event.req,
                        entries,
                    )
                else:
                    self.check(
                        f"refused {event.op}: no entry",
                        not entries,
                        "{} {}: {}",
                        event.where(),
                        event.raw,
                        entries,
                    )
        for (account_id, key), entries in self.entries_of_key.items():
            self.check(
                "every top-up/adjustment entry was sent by someone, once",
                (account_id, key) in self.money and len(entries) == 1,
                "{} {}: {}",
                account_id,
                key,
                entries,
            )
        for event in self.events:
            if event.ev == "refused":
                self.check(
                    "only expected refusals",
                    event.raw["reason"] in EXPECTED_REFUSALS.get(event.op, set())
                    and not (event.op == "adjust" and event.req["amount"] > 0),
                    "{} {} {}: {}",
                    event.where(),
                    event.op,
                    event.req,
                    event.raw["reason"],
                )

    def _duplicates(self) -> None:
        ended = {"refused": "CALL_ALREADY_ENDED"}
        for event in (
            self.by_kind[("dup", "release")]
            + self.by_kind[("dup", "topup")]
            + (self.by_kind[("dup", "adjust")])
        ):
            first, again = event.raw["first"], event.raw["again"]
            self.check(
                f"a duplicate {event.op} gets the first answer",
                first == again,
                "{} {}: {} then {}",
                event.where(),
                event.req,
                first,
                again,
            )
        for event in self.by_kind[("dup", "renew")]:
            first, again = event.raw["first"], event.raw["again"]
            self.check(
                "a duplicate renew gets the first answer (or the call expired)",
                first == again or again == ended,
                "{} {}: {} then {}",
                event.where(),
                event.req,
                first,
                again,
            )
        for event in self.by_kind[("dup", "reserve")]:
            first, again = event.raw["first"], event.raw["again"]
            if event.raw.get("batch"):
                ok = first == again  # the same request twice in one ControlRequest
            else:  # sent again later: the call's current grant, never smaller
                ok = again == ended or again.get("allowed", -1) >= first.get("allowed", 0)
            self.check(
                "a duplicate reserve gets the call's grant",
                ok,
                "{} {}: {} then {}",
                event.where(),
                event.req,
                first,
                again,
            )

    def _account_answer(self, event: Event, ans: dict[str, Any]) -> None:
        """An Account some client was shown: the invariant held at that moment too."""
        fields = [ans.get(k) for k in ("available", "balance", "credit_limit", "reserved")]
        numbers = [f for f in fields if isinstance(f, int)]
        ok = False
        if len(numbers) == len(fields):  # a malformed answer is a violation too
            available, balance, credit_limit, reserved = numbers
            ok = 0 <= available == balance + credit_limit - reserved
        self.check(
            "every Account answer had available >= 0 = balance + credit_limit - reserved",
            ok,
            "{} {}",
            event.where(),
            ans,
        )

    def _pushes_and_reads(self) -> None:
        for event in self.by_kind[("push", "")]:
            call = self.s.calls.get(event.raw["call"])
            self.check(
                "a pushed grant is in the call (exists, allowance never smaller)",
                call is not None and call.allowed_seconds >= event.raw["allowed"],
                "{} {}, call {}",
                event.where(),
                event.raw,
                call,
            )
        for event in self.by_kind[("read", "")]:
            self._account_answer(event, event.raw)
            self.check(
                "a balance read is one the ledger had",
                event.raw["balance"] in self.balances_seen.get(event.raw["account"], set()),
                "{} {}",
                event.where(),
                event.raw,
            )

    def _client_findings(self) -> None:
        for event in self.by_kind[("violation", "")] + self.by_kind[("termination", "")]:
            self.check("clients saw nothing impossible", False, "{} {}", event.where(), event.raw)


def _sign_ok(entry: admin_pb2.LedgerEntry) -> bool:
    if entry.kind in (TOP_UP, REFUND):
        return entry.amount > 0 and (entry.kind == TOP_UP) != bool(entry.call_id)
    if entry.kind in (CALL_CHARGE, EXPIRY_CHARGE):
        return entry.amount < 0 and bool(entry.call_id)
    return entry.kind == ADJUSTMENT and entry.amount != 0 and not entry.call_id


def verify(snapshot: Snapshot, events: Sequence[Event]) -> Verifier:
    return Verifier(snapshot, events).run()


def compare_restart(
    before: Snapshot, after: Snapshot, *, validity_restarts: bool = False
) -> list[str]:
    """A kill with no load changes nothing, except calls whose validity ran out meanwhile
    (and, with `validity_restarts`, a hot standby's takeover, the deadlines of open calls:
    their validity restarts at the takeover)."""
    problems: list[str] = []
    expired_since: set[str] = set()
    for call_id, old in before.calls.items():
        new = after.calls.get(call_id)
        if new == old:
            continue
        if validity_restarts and new is not None and new.state == old.state == ACTIVE:
            moved = admin_pb2.Call()
            moved.CopyFrom(old)
            moved.expires_at.CopyFrom(new.expires_at)
            if moved == new and new.expires_at.ToNanoseconds() > old.expires_at.ToNanoseconds():
                continue
        if (
            new is not None
            and old.state == ACTIVE
            and new.state == EXPIRED
            and new.allowed_seconds == old.allowed_seconds
            and new.used_seconds == old.used_seconds
        ):
            expired_since.add(call_id)
            continue
        problems.append(f"restart changed call {call_id}: {old} -> {new}")
    problems.extend(f"restart added call {c}" for c in after.calls.keys() - before.calls.keys())
    for account_id, old_entries in before.entries.items():
        new_entries = after.entries.get(account_id, [])
        if new_entries[: len(old_entries)] != old_entries:
            problems.append(f"restart changed the ledger of {account_id}")
        extra = new_entries[len(old_entries) :]
        if any(e.kind != EXPIRY_CHARGE or e.call_id not in expired_since for e in extra):
            problems.append(f"restart added entries to {account_id}: {extra}")
        if not extra and not any(
            before.calls[c].account_id == account_id for c in expired_since
        ) and before.accounts[account_id] != after.accounts.get(account_id):  # fmt: skip
            problems.append(
                f"restart changed {account_id}: {before.accounts[account_id]} -> "
                f"{after.accounts.get(account_id)}"
            )
    return problems


# ------------------------------------------------------------------ the campaign


@dataclass(slots=True)
class CampaignReport:
    config: CampaignConfig
    kills: int = 0
    recovery_kills: int = 0
    recovery_kills_after_replay: int = 0
    starts: int = 0
    start_seconds: list[float] = field(default_factory=list)
    elapsed_seconds: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)  # "ack reserve": n, ...
    client_stats: Counter[str] = field(default_factory=Counter)
    checks: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    snapshot: Snapshot | None = None
    events: list[Event] = field(default_factory=list)
    prunes: list[str] = field(default_factory=list)  # what each prune said
    verify_output: str = ""
    server_log: Counter[str] = field(default_factory=Counter)  # see scan_server_logs
    findings: list[str] = field(default_factory=list)  # server anomalies, not data loss

    def count(self, ev: str) -> int:
        return sum(n for k, n in self.outcomes.items() if k.startswith(f"{ev} "))

    def _by_op(self, ev: str) -> str:
        parts = [
            f"{k.removeprefix(ev + ' ')} {n}"
            for k, n in sorted(self.outcomes.items())
            if k.startswith(f"{ev} ")
        ]
        return ", ".join(parts) or "none"

    def _final_state(self) -> str:
        if self.snapshot is None:
            return "not read"
        states = Counter(admin_pb2.CallState.Name(c.state) for c in self.snapshot.calls.values())
        kinds: Counter[str] = Counter()
        for entries in self.snapshot.entries.values():
            kinds.update(admin_pb2.EntryKind.Name(e.kind) for e in entries)
        return (
            f"{len(self.snapshot.calls)} calls ("
            + ", ".join(f"{s.removeprefix('CALL_STATE_')} {n}" for s, n in sorted(states.items()))
            + f"), {kinds.total()} entries ("
            + ", ".join(f"{k.removeprefix('ENTRY_KIND_')} {n}" for k, n in sorted(kinds.items()))
            + ")"
        )

    def summary(self, max_violations: int = 40) -> str:
        c = self.config
        stats = self.client_stats
        starts = sorted(self.start_seconds) or [0.0]
        lines = [
            f"crash campaign on {_safe(c.database_url)} (seed {c.seed}, workdir {c.workdir})",
            f"  {self.elapsed_seconds:.1f} s; {self.kills} SIGKILLs ({self.recovery_kills} of a "
            f"starting server, {self.recovery_kills_after_replay} of them after its replay); "
            f"{self.starts} starts, serving after {starts[len(starts) // 2]:.2f} s median, "
            f"{starts[-1]:.2f} s max",
            f"  {c.clients} client processes x {c.call_workers} calls; "
            f"ops acked {self.count('ack')}: {self._by_op('ack')}",
            f"  refused {self.count('refused')}: {self._by_op('refused')}",
            f"  unanswered {self.count('unanswered')}: {self._by_op('unanswered')}",
            f"  ops retried {stats['retried']} (answers lost {stats['lost']}), duplicates "
            f"{stats['duplicates']}, channels {stats['channels']}, streams {stats['streams']}, "
            f"grant pushes {stats['pushes']}, answers late (> op timeout) {stats['timeouts']}",
            f"  final state: {self._final_state()}",
            f"  snapshots started {self.server_log['snapshots started']}, written "
            f"{self.server_log['snapshots written']}, failed {self.server_log['snapshots failed']}"
            f"; recoveries from a snapshot {self.server_log['recovered from a snapshot']}; "
            f"prunes under load {len(self.prunes)} "
            f"({sum('pruned' in p for p in self.prunes)} of them deleted records)",
            f"  callcredit-server verify: {self.verify_output or '-'}",
            f"  checks passed {self.checks.total()} ({len(self.checks)} kinds); "
            f"violations {len(self.violations)}",
        ]
        lines.extend(f"  FINDING {f}" for f in self.findings[:max_violations])
        lines.extend(f"  VIOLATION {v}" for v in self.violations[:max_violations])
        if len(self.violations) > max_violations:
            lines.append(f"  ... and {len(self.violations) - max_violations} more")
        return "\n".join(lines)


def _judge_verify(code: int, out: str, report: CampaignReport) -> None:
    """`callcredit-server verify` after the campaign: any problem it reports is a violation."""
    lines = out.splitlines()
    report.verify_output = " | ".join(line for line in lines if not line.startswith("problem:"))
    if code == 0 and not any(line.startswith("problem:") for line in lines):
        report.checks["callcredit-server verify after the campaign"] += 1
    else:
        report.violations.append(f"callcredit-server verify exited {code}: {out[-3000:]}")


_SNAPSHOT_FAILED = re.compile(r"snapshot at seq (\d+) failed \(child (.+)\)")


def scan_server_logs(workdir: Path, report: CampaignReport) -> None:
    """Count snapshots and recoveries; a CRITICAL line (the writer stopped: a journal
    failure or a broken invariant) is a violation, a failed snapshot a finding."""
    for path in sorted(workdir.glob("server-*.log")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if ": snapshot at seq" in line and "child" in line and "started" in line:
                report.server_log["snapshots started"] += 1
            elif ": snapshot at seq" in line and line.endswith("written"):
                report.server_log["snapshots written"] += 1
            elif "recovered from snapshot at seq" in line:
                report.server_log["recovered from a snapshot"] += 1
            if " CRITICAL " in line or "Traceback" in line:
                report.violations.append(f"{path.name}: {line}")
            failed = _SNAPSHOT_FAILED.search(line)
            if failed:
                report.server_log["snapshots failed"] += 1
                report.findings.append(
                    f"{path.name}: snapshot child at seq {failed.group(1)} failed "
                    f"({failed.group(2)}); see test_snapshot_children_survive_grpc_traffic"
                )


def _safe(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def _spawn_client(config: CampaignConfig, client_id: int, seed: int) -> subprocess.Popen[bytes]:
    client_config = ClientConfig(
        workdir=str(config.workdir),
        client_id=client_id,
        seed=seed,
        tag=config.tag,
        accounts=tuple(account_ids(config.tag)),
        top_up_weights=tuple(spec.top_up_weight for spec in ACCOUNT_SPECS),
        call_workers=config.call_workers,
        silent_seconds=config.validity_seconds + 1.5,
        stop_grace_seconds=config.client_stop_grace_seconds,
    )
    with (config.workdir / f"client-{client_id}.out").open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.crash.client", client_config.to_json()],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def _check_clients(config: CampaignConfig, clients: Sequence[subprocess.Popen[bytes]]) -> None:
    for n, process in enumerate(clients):
        if process.poll() is not None:
            out = (config.workdir / f"client-{n}.out").read_text(errors="replace")
            raise ServerFailed(f"client {n} exited early ({process.returncode}):\n{out[-3000:]}")


def run_campaign(
    config: CampaignConfig,
    progress: Callable[[str], None] | None = None,
    server: Supervisor | None = None,
) -> CampaignReport:
    """Run one campaign; the report lists every violation found (none is the goal).

    `server`: another way to start and kill servers (tests/ha: a primary and a standby)."""
    say = progress or (lambda _: None)
    began = time.monotonic()
    config.workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    report = CampaignReport(config)
    server = server or Supervisor(config)
    clients: list[subprocess.Popen[bytes]] = []
    harness_log = EventLog(config.workdir / f"harness{EVENTS_SUFFIX}")
    try:
        server.start(same_port=False)
        assert server.target is not None
        try:
            setup_accounts(server.target, config.tag, harness_log)
        finally:
            harness_log.close()
        clients = [_spawn_client(config, n, rng.randrange(1 << 30)) for n in range(config.clients)]
        time.sleep(config.warmup_seconds)
        for k in range(config.kills):
            time.sleep(rng.uniform(*config.kill_after_seconds))
            server.check_alive()
            _check_clients(config, clients)
            server.kill()
            time.sleep(rng.uniform(*config.downtime_seconds))
            if rng.random() < config.kill_in_recovery_probability:
                server.start_and_kill_in_recovery(rng)
            took = server.start(same_port=rng.random() < config.same_port_probability)
            say(f"kill {k + 1}/{config.kills}: serving again after {took:.2f} s")
            if config.prune_every_kills and (k + 1) % config.prune_every_kills == 0:
                code, out = server.tool("prune", "--yes")  # under load, as an operator would
                report.prunes.append(out.splitlines()[-1] if out else "")
                if code != 0:
                    report.violations.append(f"prune under load exited {code}: {out[-2000:]}")
        time.sleep(rng.uniform(*config.kill_after_seconds))  # let the clients catch up
        (config.workdir / STOP_FILE).touch()
        deadline = time.monotonic() + config.client_stop_grace_seconds + 30
        for n, process in enumerate(clients):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                report.violations.append(f"client {n} did not stop")
            else:
                if process.returncode != 0:
                    out = (config.workdir / f"client-{n}.out").read_text(errors="replace")
                    report.violations.append(f"client {n} exited {process.returncode}: {out}")
        server.check_alive()
        assert server.target is not None
        accounts = account_ids(config.tag)
        snapshot = stable_snapshot(server.target, accounts)
        events, unreadable = load_events(config.workdir)
        report.violations.extend(f"unreadable log line {u}" for u in unreadable)
        verifier = verify(snapshot, events)
        report.violations.extend(verifier.violations)
        report.checks.update(verifier.passed)
        report.snapshot, report.events = snapshot, events
        for event in events:
            if event.ev in ("ack", "refused", "unanswered") and event.who != "harness":
                report.outcomes[f"{event.ev} {event.op}"] += 1
            if event.ev == "stats":
                report.client_stats.update(event.raw["stats"])
        if config.quiet_kill_check:
            server.kill()
            server.start(same_port=True)
            after = stable_snapshot(server.target, accounts)
            problems = compare_restart(snapshot, after, validity_restarts=server.restarts_validity)
            report.violations.extend(problems)
            if not problems:
                report.checks["a kill without load changes nothing"] += 1
        server.stop()
        code, out = server.tool("verify")  # the journal and every snapshot, offline
        _judge_verify(code, out, report)
    except ServerFailed as exc:
        report.violations.append(f"server or client failed: {exc}")
    except grpc.RpcError as exc:  # an admin call of the harness was refused or failed
        report.violations.append(f"the server failed a harness call: {exc}")
    finally:
        for process in clients:
            if process.poll() is None:
                process.kill()
                process.wait()
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait()
        report.kills, report.recovery_kills = server.kills, server.recovery_kills
        report.recovery_kills_after_replay = server.recovery_kills_after_replay
        report.starts, report.start_seconds = server.starts, server.start_seconds
        scan_server_logs(config.workdir, report)
        report.elapsed_seconds = time.monotonic() - began
    return report
