"""VOPR for callcredit: the server under a seeded storm of retries, delays and crashes.

One `random.Random(seed)` decides everything — the workload, the network, the
clock, when the journal commits and when the server crashes — and nothing reads a
clock or another random source, so a seed replays exactly:

    python scripts/simulate.py --seed 1234

What runs, and how it mirrors the real server:

- The state machine (core/) and the writer's core (writer_core.py) are the real
  ones; only writer.py's I/O shell is simulated. A round applies everything queued
  at one instant (`WriterCore.round_time`); the core turns each command that
  changed state into a `JournalRecord` with the next gap-free seq, holds each
  answer until the journal is durable up to the last record that existed when it
  was produced, and routes pushes to the stream that last carried the call. Reads
  (GetAccount) wait the same way. Every push must reach a stream of the dialer
  that reserved the call, even when another dialer sends a Reserve with that call
  id (a hijack: CALL_ID_CONFLICT, which must change nothing, routing included).
- The journal is simulated: commits are group commits of a prefix of what was
  applied, each record round-tripped through codec.py. After a commit that leaves
  nothing uncommitted, a snapshot may be taken (`StateMachine.image()`, serialised
  with orjson as snapshot.py does) at that seq, keeping the two newest: the
  projector takes them of the committed state only; the operator sometimes prunes the
  journal through the newest snapshot it reaches. A crash drops everything not
  committed (records, parked answers, queued work, most messages in flight) and
  recovers as recovery.recover() does: snapshots beyond the journal's end are
  deleted, the newest usable one is loaded (`from_image`), every durable record
  after it is replayed at its `at_ms` (each must change state, and do exactly
  what it did the first time), and audit() must be empty. A commit may also fail
  (writer.py fails stop): the database kept it or not, nothing waiting is
  answered, and the server restarts.
  For some seeds (`real_journal`) every commit, snapshot and prune also goes to a
  real `Journal` on a SQLite file and a snapshot directory; recovery there runs
  recovery.recover() itself, and the history tables (ledger entries, call rows)
  are compared with what was committed; at the end recovery.verify() runs.
- Clients (workload.py) are dialers and an operator that re-send whatever is
  unanswered; the network delays, reorders and duplicates their messages, and
  loses answers on a broken stream; the clock jumps (calls expire, ended calls
  and idempotency keys leave the retention window); the server may restart with
  other flags, and with a clock behind its journal.

Every command is checked by the model (model.py: what docs/design.md says the answer,
entries and pushes must be) and by the auditor (auditor.py: the ledger, first
answers, durability of every acknowledged answer); after every step, money
conservation and available >= 0 (and every few steps the machine's own audit()
and a full comparison with the model); after every recovery, that every
acknowledged operation is there exactly once and that the state is exactly the
durable journal's. A failure is an AssertionError starting "seed S step N: ".
"""

from __future__ import annotations

import heapq
import random
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from callcredit_server.codec import decode_command, encode_command
from callcredit_server.core import (
    AccountView,
    CallRecord,
    CallState,
    Command,
    CreateAccount,
    EntryKind,
    GrantPush,
    GrantResult,
    LedgerEntry,
    Outcome,
    Push,
    PutTariff,
    Reason,
    Refused,
    Release,
    ReleaseOutcome,
    Renew,
    Reserve,
    StateMachine,
    Step,
    Tariff,
    Termination,
    Tick,
    TickResult,
    TopUp,
)
from callcredit_server.journal import MAX_READ_ROWS, Journal, JournalRecord
from callcredit_server.projector import Projector, open_projector
from callcredit_server.recovery import recover, verify
from callcredit_server.service import _live
from callcredit_server.snapshot import discard_older, write_snapshot
from callcredit_server.writer_core import WriterCore
from tests.core.helpers import fingerprint_of

from .auditor import (
    MIN_RETENTION_MS,
    Acknowledged,
    Ledger,
    before,
    check_answer,
    check_expiries,
    compare_state,
)
from .model import Expected, Model, same_outcome
from .workload import (
    GIVE_UP_MS,
    AdminCommand,
    AdminRequest,
    Answer,
    Client,
    Dialer,
    Op,
    Operator,
    ReadAccount,
    ReleaseRequest,
    RenewRequest,
    Request,
    ReserveRequest,
    TickRequest,
    random_rate,
)

__all__ = ["DEFAULT_STEPS", "SimJournal", "Simulation", "Summary", "run_seed"]

DEFAULT_STEPS = 3_000
T0_MS = 1_750_000_000_000
NETWORK_DELAY_MS_MAX = 300
DUPLICATE_DELAY_MS_MAX = 60_000  # a stale copy arrives this late at most (< GIVE_UP_MS)
P_DUPLICATE = 0.05  # a message is also delivered again, later
P_SURVIVES_CRASH = 0.3  # a message in flight reaches the restarted server (another route)
P_CRASH = 0.003  # per step
P_RESTART = 0.001  # per step: a clean stop (everything committed) and start
P_PRUNE = 0.001  # per step: the operator prunes the journal through a snapshot
KEEP_SNAPSHOTS = 2  # snapshot.py keeps the two newest
P_RECONNECT = 0.004  # per client per step
P_RETRY = 0.05  # per client per step: unanswered operations sent again
P_HIJACK = 0.03  # per step: a dialer sends a Reserve with another dialer's open call id
P_APPLY = 0.85  # per step: the writer applies what is queued
P_COMMIT = 0.45  # per step: a group commit completes
P_COMMIT_FAILS = 0.002  # per commit: it fails (durable or not), the writer stops
STATE_CHECK_EVERY = 100  # steps between full comparisons of machine and model
AUDIT_EVERY = 10  # steps between the machine's own audit() (and after every recovery)
MAX_SUBMISSIONS_PER_ROUND = 1_024  # writer.py
# Clients never send (or reuse) an id older than GIVE_UP_MS, and the network delivers
# nothing later than DUPLICATE_DELAY_MS_MAX after it was sent: with a retention
# window longer than both, ids are never reused after it (docs/design.md, Idempotency).
if MIN_RETENTION_MS <= GIVE_UP_MS + DUPLICATE_DELAY_MS_MAX:
    raise ImportError("the simulated retention window must outlast every retry")


@dataclass(frozen=True, slots=True)
class Settings:
    """The server's flags: they size the commands it builds from requests."""

    grant_seconds: int
    max_grant_seconds: int
    validity_seconds: int
    retention_ms: int
    tick_interval_ms: int

    @staticmethod
    def random(rng: random.Random) -> Settings:
        max_grant = rng.choice((120, 300, 600))
        return Settings(
            grant_seconds=rng.choice((30, 60, max_grant)),
            max_grant_seconds=max_grant,
            validity_seconds=rng.choice((30, 60, 120)),
            retention_ms=rng.randint(MIN_RETENTION_MS // 60_000, 40) * 60_000,
            tick_interval_ms=rng.choice((250, 1_000, 5_000)),
        )

    def command(self, request: Request) -> Command:
        """The command a request becomes (convert.py, with GrantPolicy)."""
        match request:
            case ReserveRequest():
                return Reserve(
                    request.call_id,
                    request.account_id,
                    request.destination,
                    request.requested_seconds,
                    self._grant(request.requested_seconds),
                    self.validity_seconds,
                )
            case RenewRequest():
                return Renew(
                    request.call_id,
                    request.sequence,
                    request.used_seconds,
                    request.requested_seconds,
                    self._grant(request.requested_seconds),
                    self.validity_seconds,
                )
            case ReleaseRequest():
                return Release(request.call_id, request.used_seconds)
            case AdminRequest():
                return request.command
            case TickRequest():
                return Tick(self.retention_ms)
        raise AssertionError(f"no command for {request!r}")

    def _grant(self, requested_seconds: int) -> int:
        return min(requested_seconds or self.grant_seconds, self.max_grant_seconds)


class SimJournal:
    """The durable journal: the committed records, each stored as codec.py writes it."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, str, str]] = []  # (seq, at_ms, kind, body)
        self.pruned_through = 0

    def last_seq(self) -> int:
        return self.rows[-1][0] if self.rows else self.pruned_through

    def append(self, records: Sequence[JournalRecord]) -> None:
        """One group commit: all of `records` become durable at once."""
        for record in records:
            if record.seq != self.last_seq() + 1:
                raise AssertionError(f"journal: seq {record.seq} does not follow {self.last_seq()}")
            if self.rows and record.at_ms < self.rows[-1][1]:
                raise AssertionError(f"journal: seq {record.seq} goes back in time")
            kind, body = encode_command(record.command)
            self.rows.append((record.seq, record.at_ms, kind, body))

    def crash(self, uncommitted: Sequence[JournalRecord]) -> None:
        """The process died: what was not committed is gone (nothing to do here)."""

    def prune(self, through_seq: int) -> None:
        if through_seq > self.last_seq():
            raise AssertionError(f"prune through {through_seq}: past the end")
        self.rows = [row for row in self.rows if row[0] > through_seq]
        self.pruned_through = max(self.pruned_through, through_seq)

    def replay(self, after_seq: int) -> Iterator[tuple[int, int, Command]]:
        if after_seq < self.pruned_through:
            raise AssertionError(f"replay after {after_seq}: pruned")
        for seq, at_ms, kind, body in self.rows:
            if seq > after_seq:
                yield seq, at_ms, decode_command(kind, body)


@dataclass(slots=True)
class _Message:
    client: Client | None
    epoch: int
    ops: list[Op]


@dataclass(slots=True)
class _Answered:
    op: Op
    command: Command | None  # None: a read
    answer: Answer
    observed_seq: int  # the last journal record that existed when it was produced


_Route = tuple[Client, int]  # a stream: the client, and which of its connections (epoch)


@dataclass(slots=True)
class _Parked:
    """An answer (and its pushes), held by the writer core until it is durable."""

    client: Client | None
    epoch: int
    answers: list[_Answered]
    pushes: list[tuple[Client, int, Push]]


@dataclass(slots=True)
class _Delivery:
    client: Client
    epoch: int
    answers: list[tuple[Op, Answer]]
    pushes: list[Push]


@dataclass(slots=True)
class _Original:
    """How a journaled command went the first time: replay must repeat it exactly."""

    outcome: Outcome
    pushes: tuple[Push, ...]
    expired: int
    entries: list[LedgerEntry]  # what the history tables must come to hold (the projector)
    calls: list[CallRecord]


@dataclass(slots=True)
class Summary:
    seed: int
    real_journal: bool
    steps: int = 0
    sim_ms: int = 0
    ops: int = 0  # operations applied (copies and re-sends included)
    acked: int = 0  # answers released after their records were durable
    records: int = 0  # journal records committed
    commits: int = 0
    failed_commits: int = 0  # durable or not, never answered: the server restarted
    crashes: int = 0
    restarts: int = 0
    snapshots: int = 0
    from_snapshot: int = 0  # recoveries that started from a snapshot
    prunes: int = 0
    lost: int = 0  # records applied but never committed (dropped by crashes)
    calls: int = 0
    expiries: int = 0
    late_releases: int = 0
    refunds: int = 0
    shortfalls: int = 0
    regrants: int = 0
    terminations: int = 0
    forgotten: int = 0
    conflicts: int = 0
    hijacks: int = 0  # Reserves of another dialer's open call id
    refused: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        minutes = self.sim_ms // 60_000
        parts = [
            f"{self.steps} steps",
            f"{minutes // 60}h{minutes % 60:02d}m simulated",
            f"{self.ops} ops",
            f"{self.acked} acked",
            f"{self.records} records in {self.commits} commits",
            f"{self.crashes} crashes ({self.lost} records lost)",
            f"{self.restarts} restarts",
            f"{self.failed_commits} failed commits",
            f"{self.snapshots} snapshots ({self.from_snapshot} recoveries from one)",
            f"{self.prunes} prunes",
            f"{self.calls} calls",
            f"{self.expiries} expiries",
            f"{self.late_releases} late releases",
            f"{self.refunds} refunds",
            f"{self.shortfalls} shortfalls",
            f"{self.regrants} re-grants",
            f"{self.terminations} terminations",
            f"{self.forgotten} forgotten",
            f"{self.conflicts} key conflicts",
            f"{self.hijacks} hijacks",
            f"{sum(self.refused.values())} refused",
        ]
        if self.real_journal:
            parts.append("real SQLite journal")
        return f"seed {self.seed}: " + ", ".join(parts)


def uses_real_journal(seed: int) -> bool:
    """Which seeds also write a real SQLite journal: decided by the seed alone."""
    return seed % 8 == 5


class Simulation:
    """One seeded run. Subclasses inject bugs (tests/simulation/test_simulation.py)."""

    journal_class: type[SimJournal] = SimJournal
    core_class: type[WriterCore[_Route, _Parked]] = WriterCore
    # Compare every answer, and the state, with the model's (off: only the auditor's own
    # checks of the ledger, the answers and durability; the model still prices calls).
    check_with_model = True

    def __init__(
        self, seed: int, *, real_journal: bool | None = None, directory: Path | None = None
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.step = 0
        self.now_ms = T0_MS
        self.summary = Summary(
            seed, uses_real_journal(seed) if real_journal is None else real_journal
        )
        self._directory = directory
        self._own_directory: str | None = None
        self.real: Journal | None = None
        self.projector: Projector | None = None  # the real journal's, as the server runs one
        self.settings = Settings.random(self.rng)
        self.skew_ms = 0  # the server's clock minus the true time
        self.next_tick_ms = T0_MS
        self.last_op_id = 0
        # The server.
        self.journal = self.journal_class()
        self._stepped: Step | None = None  # the core's last step (WriterCore.on_step)
        self.core = self._new_core(self.new_machine(), 0)
        self.durable_seq = 0  # the last record the database holds
        self.inbox: deque[_Message] = deque()
        self.originals: dict[int, _Original] = {}
        self.owners: dict[str, Client] = {}  # call id -> the dialer whose Reserve opened it
        # Snapshots (writer.py's policy, snapshot.py's format): seq -> the image, serialised.
        self.snapshot_every = self.rng.choice((0, 30, 100, 300))
        self.snapshots: dict[int, bytes] = {}
        self.snapshot_seq = 0
        # The network.
        self._sequence = 0
        self.to_server: list[tuple[int, int, _Message]] = []
        self.to_clients: list[tuple[int, int, _Delivery]] = []
        # The auditor: the model and the ledger as applied, and as durable.
        self.model = Model()
        self.durable_model = Model()
        self.live = Ledger()
        self.durable = Ledger()
        self.acked = Acknowledged()
        self.clients: list[Client] = []

    # ------------------------------------------------------------ hooks (mutants)

    def new_machine(self) -> StateMachine:
        return StateMachine()

    def replay_at(self, at_ms: int) -> int:
        """The time a journal record is replayed at: the time it was applied."""
        return at_ms

    def _new_core(self, machine: StateMachine, last_seq: int) -> WriterCore[_Route, _Parked]:
        core = self.core_class(machine, last_seq)
        core.on_step = self._on_step
        return core

    def _on_step(self, command: Command, step: Step) -> None:
        self._stepped = step

    @property
    def machine(self) -> StateMachine:
        return self.core.machine

    # ------------------------------------------------------------ running

    def run(self, steps: int = DEFAULT_STEPS) -> Summary:
        try:
            if self.summary.real_journal:
                self._open_real_journal()
            self._guarded(self._setup)
            for self.step in range(1, steps + 1):
                self._guarded(self._one_step)
            self.step = steps + 1  # the end: drain, restart cleanly, check everything
            self._guarded(self._finish)
        finally:
            if self.real is not None:
                self.real.close()
            if self._own_directory is not None:
                shutil.rmtree(self._own_directory, ignore_errors=True)
        self.summary.steps = steps
        self.summary.sim_ms = self.now_ms - T0_MS
        return self.summary

    def _guarded(self, action: Any) -> None:
        try:
            action()
        except AssertionError as exc:
            raise AssertionError(f"seed {self.seed} step {self.step}: {exc}") from exc
        except Exception as exc:  # InvariantViolation, JournalError, CodecError, ...
            raise AssertionError(
                f"seed {self.seed} step {self.step}: {type(exc).__name__}: {exc}"
            ) from exc

    def _setup(self) -> None:
        rng = self.rng
        tariffs = [
            Tariff("t-vnd", "VND", tuple(random_rate(rng, p) for p in ("", "84", "849", "1"))),
            Tariff("t-vnd-2", "VND", tuple(random_rate(rng, p) for p in ("84", "44", "8490"))),
            Tariff("t-usd", "USD", (random_rate(rng, ""), random_rate(rng, "1"))),
        ]
        accounts = [
            CreateAccount("a-0", "VND", "t-vnd", rng.choice((0, 0, 1_000)), 0),
            CreateAccount("a-1", "VND", "t-vnd-2", 0, rng.choice((0, 4))),
            CreateAccount("a-2", "VND", "t-vnd", 0, 3),
            CreateAccount("a-usd", "USD", "t-usd", rng.choice((0, 500)), 0),
            CreateAccount("a-x", "VND", "t-vnd", 0, 0),
            CreateAccount("a-0", "VND", "t-vnd", 0, 0),  # ACCOUNT_EXISTS
            CreateAccount("a-bad", "USD", "t-vnd", 0, 0),  # CURRENCY_MISMATCH
            CreateAccount("a-bad", "USD", "t-eur", 0, 0),  # TARIFF_NOT_FOUND
        ]
        commands: list[AdminCommand] = [PutTariff(t) for t in tariffs]
        commands += accounts
        commands += [
            TopUp(a.account_id, rng.randint(100, 5_000), f"setup-{a.account_id}", "setup")
            for a in accounts[:5]
        ]
        commands.append(TopUp("a-none", 1, "setup-none", "setup"))  # ACCOUNT_NOT_FOUND
        ops = [Op(self._op_id(), None, AdminRequest(c), self.now_ms) for c in commands]
        self._apply_message(_Message(None, 0, ops), self.now_ms)
        self._commit(everything=True)
        ids = [a.account_id for a in accounts[:5]]
        destinations = ["84901234567", "+84912345678", "849", "12025550123", "+4420712345"]
        destinations += ["33123456789", "8490", "+1", "4412"]
        for i in range(rng.randint(2, 3)):
            self.clients.append(Dialer(f"d{i}", rng, self, self._op_id, ids, destinations))
        self.clients.append(Operator("op", rng, self, self._op_id, ids, "a-x", tariffs))

    def _op_id(self) -> int:
        self.last_op_id += 1
        return self.last_op_id

    def _one_step(self) -> None:
        rng = self.rng
        self._advance_clock()
        phases = (
            self._clients_act,
            self._deliver_to_server,
            self._tick,
            self._apply_round,
            self._commit_maybe,
            self._deliver_to_clients,
        )
        crash_at = rng.randrange(len(phases) + 1) if rng.random() < P_CRASH else -1
        for i, phase in enumerate(phases):
            if i == crash_at:
                self._crash(clean=False)
            phase()
        if crash_at == len(phases):
            self._crash(clean=False)
        if rng.random() < P_RESTART:
            self._crash(clean=True)
        if rng.random() < P_PRUNE:
            self._prune()
        self._check_step()

    def _finish(self) -> None:
        """Let everything settle, then stop cleanly and recover: nothing may be lost."""
        for _ in range(3):
            self._apply_round(always=True)
            self._commit(everything=True)
            self.now_ms += DUPLICATE_DELAY_MS_MAX
            self._deliver_to_clients()
        self._check_step()
        if self.check_with_model:
            compare_state(self.machine, self.model, "at the end")
        self._crash(clean=True)
        if self.real is not None:
            self._verify()

    # ------------------------------------------------------------ the world

    def _advance_clock(self) -> None:
        rng = self.rng
        roll = rng.random()
        validity_ms = self.settings.validity_seconds * 1000
        if roll < 0.0005:  # past the retention window: ended calls and keys are forgotten
            dt = rng.randint(self.settings.retention_ms, 2 * self.settings.retention_ms)
        elif roll < 0.003:  # past the validity of calls that do not renew in time
            dt = rng.randint(validity_ms // 2, validity_ms * 2)
        elif roll < 0.15:
            dt = rng.randint(1_000, 5_000)
        else:
            dt = rng.randint(0, 700)
        self.now_ms += dt

    def server_clock_ms(self) -> int:
        return self.now_ms + self.skew_ms

    def send(self, client: Client, ops: Sequence[Op]) -> None:
        """The network: a message arrives a little later; sometimes a copy, much later."""
        message = _Message(client, client.epoch, list(ops))
        self._to_server(self.now_ms + self.rng.randint(0, NETWORK_DELAY_MS_MAX), message)
        if self.rng.random() < P_DUPLICATE:
            delay = self.rng.randint(NETWORK_DELAY_MS_MAX, DUPLICATE_DELAY_MS_MAX)
            self._to_server(self.now_ms + delay, message)

    def _to_server(self, at_ms: int, message: _Message) -> None:
        self._sequence += 1
        heapq.heappush(self.to_server, (at_ms, self._sequence, message))

    def _to_client(self, at_ms: int, delivery: _Delivery) -> None:
        self._sequence += 1
        heapq.heappush(self.to_clients, (at_ms, self._sequence, delivery))

    def _clients_act(self) -> None:
        rng = self.rng
        if rng.random() < P_HIJACK:
            self._hijack()
        for client in self.clients:
            if rng.random() < P_RECONNECT:
                client.reconnect(self.now_ms)
            if rng.random() < P_RETRY:
                client.retry(self.now_ms)
            if rng.random() < (0.7 if isinstance(client, Dialer) else 0.12):
                client.act(self.now_ms)
            client.flush()

    def _hijack(self) -> None:
        """A dialer reserves, on its own stream, a call id another dialer has open."""
        rng = self.rng
        calls = self.machine.calls
        open_ids = [c for c in self.owners if c in calls and calls[c].state is CallState.ACTIVE]
        if not open_ids:
            return
        call = calls[rng.choice(open_ids)]
        owner = self.owners[call.call_id]
        others = [c for c in self.clients if isinstance(c, Dialer) and c is not owner]
        attacker = rng.choice(others)
        attacker.send(ReserveRequest(call.call_id, call.account_id, "999", 60), self.now_ms)
        self.summary.hijacks += 1

    def _deliver_to_server(self) -> None:
        while self.to_server and self.to_server[0][0] <= self.now_ms:
            _, _, message = heapq.heappop(self.to_server)
            # A copy older than any client waits is dropped: ids are never reused
            # beyond the retention window, so the server never sees one that old.
            ops = [op for op in message.ops if self.now_ms - op.born_ms <= GIVE_UP_MS]
            if ops:
                self.inbox.append(_Message(message.client, message.epoch, ops))

    def _deliver_to_clients(self) -> None:
        while self.to_clients and self.to_clients[0][0] <= self.now_ms:
            _, _, delivery = heapq.heappop(self.to_clients)
            client = delivery.client
            if delivery.epoch != client.epoch:
                continue  # sent on a stream that has broken since
            for op, answer in delivery.answers:
                client.deliver(op, answer, self.now_ms)
            for push in delivery.pushes:
                client.push(push, self.now_ms)
        for client in self.clients:
            client.flush()

    def _tick(self) -> None:
        """The writer's tick task: a Tick every tick interval of the server's clock."""
        if self.server_clock_ms() >= self.next_tick_ms:
            self.next_tick_ms = self.server_clock_ms() + self.settings.tick_interval_ms
            tick = Op(self._op_id(), None, TickRequest(), self.now_ms)
            self.inbox.append(_Message(None, 0, [tick]))

    # ------------------------------------------------------------ the writer

    def _apply_round(self, *, always: bool = False) -> None:
        if not self.inbox or (not always and self.rng.random() > P_APPLY):
            return
        count = len(self.inbox)
        if not always and self.rng.random() < 0.3:
            count = self.rng.randint(1, count)
        now_ms = self.core.round_time(self.server_clock_ms())
        for _ in range(min(count, MAX_SUBMISSIONS_PER_ROUND)):
            self._apply_message(self.inbox.popleft(), now_ms)

    def _apply_message(self, message: _Message, now_ms: int) -> None:
        answers: list[_Answered] = []
        pushes: list[tuple[Client, int, Push]] = []
        for op in message.ops:
            answers.append(self._apply_op(op, message, now_ms, pushes))
        parked = _Parked(message.client, message.epoch, answers, pushes)
        if self.core.hold(parked):
            self._release(parked)

    def _apply_op(
        self,
        op: Op,
        message: _Message,
        now_ms: int,
        pushes: list[tuple[Client, int, Push]],
    ) -> _Answered:
        self.summary.ops += 1
        request = op.request
        if isinstance(request, ReadAccount):
            view = self.machine.account(request.account_id)
            want = self.model.view(request.account_id)
            if view != want:
                raise AssertionError(f"GetAccount answered {view}, the model says {want}")
            return _Answered(op, None, view, self.core.next_seq - 1)
        command = self.settings.command(request)
        was = before(self.model, command, now_ms)
        client = message.client
        target = None if client is None else (client, message.epoch)
        self._stepped = None
        (outcome,), routed = self.core.apply([command], now_ms, target)
        step = self._stepped
        assert step is not None and step.outcome is outcome
        expected = self.model.apply(command, now_ms)
        self._compare(command, step, expected)
        check_answer(command, step.outcome, step.entries, was, self.model)
        self.live.add(step.entries)
        check_expiries(step.calls, self.live)
        if step.changed:
            seq = self.core.next_seq - 1
            self.originals[seq] = _Original(
                step.outcome, tuple(step.pushes), expected.expired, step.entries, step.calls
            )
            opened = isinstance(command, Reserve) and isinstance(outcome, GrantResult)
            if opened and client is not None:
                self.owners[command.call_id] = client
        for (to, epoch), push in routed:
            owner = self.owners.get(push.call_id)
            if to is not owner:
                raise AssertionError(
                    f"{push} routed to {to}'s stream; {owner} reserved call {push.call_id!r}"
                )
            pushes.append((to, epoch, push))
        return _Answered(op, command, outcome, self.core.next_seq - 1)

    def _compare(self, command: Command, step: Step, expected: Expected) -> None:
        if not step.changed and (step.entries or step.calls or step.pushes):
            raise AssertionError(f"{command}: changed nothing, yet produced {step}")
        if not self.check_with_model:
            return
        if not same_outcome(expected.outcome, step.outcome):
            raise AssertionError(
                f"{command} at {self.machine.now_ms}: answered {step.outcome}, "
                f"docs/design.md says {expected.outcome}"
            )
        if step.changed != expected.changed:
            raise AssertionError(
                f"{command}: changed={step.changed}, the model says {expected.changed}"
            )
        if step.entries != expected.entries:
            raise AssertionError(
                f"{command}: entries {step.entries}, the model says {expected.entries}"
            )
        if step.pushes != expected.pushes:
            raise AssertionError(
                f"{command}: pushes {step.pushes}, the model says {expected.pushes}"
            )

    def _commit_maybe(self) -> None:
        if self.rng.random() < P_COMMIT:
            self._commit(everything=self.rng.random() < 0.5, may_fail=True)

    def _commit(self, *, everything: bool, may_fail: bool = False) -> None:
        """A group commit: a prefix of the records applied becomes durable at once."""
        pending = len(self.core.records)
        if not pending:
            return
        count = pending if everything else self.rng.randint(1, pending)
        if may_fail and self.rng.random() < P_COMMIT_FAILS:
            self._failed_commit(count)
            return
        batch = self.core.take_records(count)
        self.journal.append(batch)
        if self.real is not None:
            self.real.append(batch)
            self._project_real()
        self.durable_seq = batch[-1].seq
        self.summary.commits += 1
        self.summary.records += count
        for record in batch:
            self._became_durable(record)
        for parked in self.core.durable(self.durable_seq):
            self._release(parked)
        self._maybe_snapshot()

    def _failed_commit(self, count: int) -> None:
        """The commit raised or timed out (writer.py: fail-stop). The database may have
        kept it all the same (a stalled commit that went through, a lost reply): either
        way nothing waiting is answered, and the server is restarted."""
        self.summary.failed_commits += 1
        if self.rng.random() < 0.5:
            batch = self.core.take_records(count)
            self.journal.append(batch)
            if self.real is not None:
                self.real.append(batch)
            self.durable_seq = batch[-1].seq
            self.summary.records += count
            for record in batch:
                self._became_durable(record)
        self._crash(clean=False)

    def _maybe_snapshot(self) -> None:
        """projector.py: every `snapshot_every` durable records, the state at a durable
        seq (the projector's state is the committed journal's). Here it is the writer's
        machine, at a moment when it holds nothing uncommitted."""
        if not self.snapshot_every or self.durable_seq - self.snapshot_seq < self.snapshot_every:
            return
        seq = self.durable_seq
        if self.core.next_seq - 1 != seq:
            return  # the machine is ahead of the journal: a later commit takes it
        image = self.machine.image()
        self.snapshots[seq] = orjson.dumps(image)  # as snapshot.py writes it
        for old in sorted(self.snapshots, reverse=True)[KEEP_SNAPSHOTS:]:
            del self.snapshots[old]
        if self.real is not None:
            write_snapshot(self._snapshot_dir(), seq, image, self.machine.now_ms)
            discard_older(self._snapshot_dir(), self.real.projected_through(), KEEP_SNAPSHOTS)
        self.snapshot_seq = seq
        self.summary.snapshots += 1

    def _prune(self) -> None:
        """The operator prunes the journal through the newest snapshot it reaches."""
        covered = [seq for seq in self.snapshots if seq <= self.journal.last_seq()]
        if not covered or max(covered) <= self.journal.pruned_through:
            return
        through = max(covered)
        self.journal.prune(through)
        if self.real is not None:
            self.real.prune(through)  # never past the projection (journal.prune)
        self.summary.prunes += 1

    def _became_durable(self, record: JournalRecord) -> None:
        """The durable model and ledger follow the journal, one record at a time."""
        original = self.originals[record.seq]
        expected = self.durable_model.apply(record.command, record.at_ms)
        if self.check_with_model and not (
            expected.changed
            and same_outcome(expected.outcome, original.outcome)
            and expected.entries == original.entries
        ):
            raise AssertionError(
                f"record {record.seq} ({record.command}): the model replays it as "
                f"{expected.outcome} {expected.entries}, first run was {original.outcome} "
                f"{original.entries}"
            )
        self.durable.add(original.entries)
        s = self.summary
        s.expiries += original.expired
        for entry in original.entries:
            if entry.kind is EntryKind.REFUND:
                s.refunds += 1
        if isinstance(original.outcome, TickResult):
            s.forgotten += original.outcome.forgotten
        if isinstance(record.command, Reserve) and isinstance(original.outcome, GrantResult):
            s.calls += 1
        if isinstance(original.outcome, ReleaseOutcome):
            if original.outcome.result.shortfall:
                s.shortfalls += 1
            if any(c.state is CallState.EXPIRED for c in original.calls):
                s.late_releases += 1
        for push in original.pushes:
            if isinstance(push, GrantPush):
                s.regrants += 1
            elif isinstance(push, Termination):
                s.terminations += 1

    def _release(self, parked: _Parked) -> None:
        """Acknowledge: the answers and pushes leave the server now."""
        durable = self.journal.last_seq()
        for answered in parked.answers:
            if answered.observed_seq > durable:
                raise AssertionError(
                    f"acknowledged {answered.answer} to {answered.op.request}, which reflects "
                    f"journal record {answered.observed_seq}; only {durable} are durable"
                )
            self.summary.acked += 1
            if answered.command is not None:
                self._count_ack(answered.command, answered.answer)
        for _, _, push in parked.pushes:
            if isinstance(push, GrantPush):
                self.acked.on_push_ack(push.grant)
        delay = self.rng.randint(0, NETWORK_DELAY_MS_MAX)
        if parked.client is not None:
            answers = [(a.op, a.answer) for a in parked.answers]
            self._to_client(
                self.now_ms + delay, _Delivery(parked.client, parked.epoch, answers, [])
            )
        for client, epoch, push in parked.pushes:
            self._to_client(self.now_ms + delay, _Delivery(client, epoch, [], [push]))

    def _count_ack(self, command: Command, answer: Answer) -> None:
        if answer is None or isinstance(answer, AccountView):
            raise AssertionError(f"{command} answered {answer}")
        self.acked.on_ack(command, answer, self.now_ms)
        if isinstance(answer, Refused):
            refused = self.summary.refused
            refused[answer.reason.value] = refused.get(answer.reason.value, 0) + 1
            if answer.reason is Reason.IDEMPOTENCY_KEY_CONFLICT:
                self.summary.conflicts += 1

    # ------------------------------------------------------------ crashes

    def _crash(self, *, clean: bool) -> None:
        """The server stops (cleanly: after committing everything) and recovers."""
        if clean:
            self._commit(everything=True)
            self.summary.restarts += 1
        else:
            self.summary.crashes += 1
        pending = self.core.records
        untouched = fingerprint_of(self.machine) if not pending else None
        self.summary.lost += len(pending)
        self.journal.crash(pending)
        # Everything the process held is gone: the writer core (uncommitted records,
        # held answers and pushes, routes) and queued work. Messages in flight mostly
        # die with their connections; some are copies on other routes and arrive later.
        self.inbox.clear()
        for seq in [seq for seq in self.originals if seq > self.durable_seq]:
            del self.originals[seq]
        self.to_server = [m for m in self.to_server if self.rng.random() < P_SURVIVES_CRASH]
        heapq.heapify(self.to_server)
        # The auditor's view rolls back to the durable journal.
        self.model = self.durable_model
        self.durable_model = self.model.clone()
        self.live = self.durable.copy()
        # Recover, as app.recover() does.
        machine = self._recover()
        self.durable_seq = self.journal.last_seq()
        self.core = self._new_core(machine, self.durable_seq)
        self.owners = {c: owner for c, owner in self.owners.items() if c in self.machine.calls}
        where = "after a clean restart" if clean else "after a crash"
        if self.check_with_model:
            compare_state(self.machine, self.model, where)
        self.live.check_conserved(self._balances(), where)
        self.acked.check_survived(self.machine, self.durable, self.model)
        if untouched is not None and fingerprint_of(self.machine) != untouched:
            raise AssertionError(
                f"{where}: nothing was lost, yet the rebuilt state differs from the old one"
            )
        if self.real is not None:
            self._check_history()
        # The restarted server may run with other flags, and a clock behind its journal.
        rng = self.rng
        if rng.random() < 0.3:
            self.settings = Settings.random(rng)
        self.skew_ms = rng.choice((0, 0, -rng.randint(0, 30_000), rng.randint(0, 5_000)))
        self.next_tick_ms = self.server_clock_ms()
        for client in self.clients:
            client.reconnect(self.now_ms)

    def _recover(self) -> StateMachine:
        """recovery.recover(): the newest usable snapshot, then the journal after it."""
        last_seq = self.journal.last_seq()
        pruned = self.journal.pruned_through
        for seq in [seq for seq in self.snapshots if seq > last_seq]:
            del self.snapshots[seq]  # a crash cut that timeline short
        usable = sorted((seq for seq in self.snapshots if seq >= pruned), reverse=True)
        start = usable[0] if usable else 0
        if start < pruned:
            raise AssertionError(f"journal pruned through {pruned}, no snapshot covers it")
        if start:
            image = orjson.loads(self.snapshots[start])
            machine = type(self.new_machine()).from_image(image)
            self.summary.from_snapshot += 1
        else:
            machine = self.new_machine()
        for seq, at_ms, command in self.journal.replay(after_seq=start):
            original = self.originals.get(seq)
            if original is None or seq > self.durable_seq:
                raise AssertionError(f"the journal holds record {seq}, which was never committed")
            step = machine.apply(command, self.replay_at(at_ms))
            if not step.changed:
                raise AssertionError(f"journal record {seq} changed nothing on replay: {command}")
            if not (
                step.outcome == original.outcome
                and step.entries == original.entries
                and step.calls == original.calls
                and tuple(step.pushes) == original.pushes
            ):
                raise AssertionError(
                    f"replay of record {seq} ({command} at {at_ms}) is not what it did first: "
                    f"{step.outcome} {step.entries} vs {original.outcome} {original.entries}"
                )
        problems = machine.audit()
        if problems:
            raise AssertionError(f"state rebuilt from the journal is broken: {problems}")
        self.snapshot_seq = start
        if self.real is not None:
            self.real.close()
            self.real = Journal(self._real_url())
            self.projector = None  # restarted with the server, from its watermark
            recovered = recover(self.real, self._snapshot_dir())
            if recovered.snapshot_seq != start:
                raise AssertionError(
                    f"recovery.recover() started from snapshot {recovered.snapshot_seq}, "
                    f"the simulation from {start}"
                )
            if fingerprint_of(recovered.machine) != fingerprint_of(machine):
                raise AssertionError(
                    "recovery.recover() on the SQLite journal rebuilt another state"
                )
        return machine

    # ------------------------------------------------------------ checks

    def _balances(self) -> dict[str, int]:
        balances: dict[str, int] = {}
        for account_id in self.machine.accounts:
            view = self.machine.account(account_id)
            assert view is not None
            if view.available < 0:
                raise AssertionError(f"{view}: available < 0")
            balances[account_id] = view.balance
        return balances

    def _check_step(self) -> None:
        if self.step % AUDIT_EVERY == 0:
            problems = self.machine.audit()
            if problems:
                raise AssertionError(f"audit(): {problems}")
        self.live.check_conserved(self._balances(), "after the step")
        if self.live.last_entry_id != self.machine.last_entry_id:
            raise AssertionError(
                f"the machine handed out {self.machine.last_entry_id} entries, "
                f"the auditor saw {self.live.last_entry_id}"
            )
        if self.step % STATE_CHECK_EVERY == 0 and self.check_with_model:
            compare_state(self.machine, self.model, "state")

    def _project_real(self) -> None:
        """The projector (projector.py) brings the real journal's history to its end:
        after each commit, as the server's keeps up with its writer, and opened again
        from its watermark after a restart."""
        assert self.real is not None
        if self.projector is None:
            self.projector = open_projector(self.real, self._snapshot_dir())
        while self.projector.step():
            pass

    def _check_history(self) -> None:
        """The real journal's history tables, once projected, say what the committed
        records said: every account's entries are the durable ledger's, and there is one
        call row per call ever journaled. Read as ListCalls reads them (an open call's row
        swapped for the call in memory: `service._live`), each is the call in memory or,
        for a call that left the window, what it was when it was forgotten."""
        real = self.real
        assert real is not None
        self._project_real()
        if real.last_seq() != self.journal.last_seq():
            raise AssertionError("SQLite journal length differs")
        rows: dict[str, CallRecord] = {}
        for account_id in self.model.accounts:
            entries: list[LedgerEntry] = []
            while True:
                after = entries[-1].entry_id if entries else 0
                page = real.list_entries(account_id, after, MAX_READ_ROWS)
                entries += page
                if len(page) < MAX_READ_ROWS:
                    break
            if entries != self.durable.by_account.get(account_id, []):
                raise AssertionError(f"ListEntries({account_id}) differs from the ledger")
            active = real.list_calls(account_id, active_only=True, before_call_seq=None, limit=100)
            open_ids = [c.call_id for c in self.machine.open_calls(account_id)]
            if [c.call_id for c in active] != open_ids:
                raise AssertionError(
                    f"ListCalls({account_id}, active_only) {[c.call_id for c in active]} "
                    f"!= open calls {open_ids}"
                )
            before_call_seq: int | None = None
            while True:
                calls = real.list_calls(
                    account_id, active_only=False, before_call_seq=before_call_seq, limit=1_000
                )
                rows.update((c.call_id, c) for c in _live(self.machine, calls, active_only=False))
                if len(calls) < 1_000:
                    break
                before_call_seq = calls[-1].call_seq
        expected = {call_id: self.machine.call(call_id) for call_id in self.machine.calls}
        expected.update(self.model.forgotten)
        if sorted(rows) != sorted(expected):
            raise AssertionError(
                f"history holds calls {sorted(set(rows) - set(expected))} that were never "
                f"journaled, and lacks {sorted(set(expected) - set(rows))}"
            )
        for call_id, row in rows.items():
            if row != expected[call_id]:
                raise AssertionError(
                    f"GetCall({call_id}) from history: {row}, state: {expected[call_id]}"
                )

    # ------------------------------------------------------------ the real journal

    def _real_directory(self) -> Path:
        if self._directory is not None:
            return self._directory
        if self._own_directory is None:
            self._own_directory = tempfile.mkdtemp(prefix="callcredit-vopr-")
        return Path(self._own_directory)

    def _real_url(self) -> str:
        return f"sqlite:///{self._real_directory() / f'journal-{self.seed}.db'}"

    def _snapshot_dir(self) -> Path:
        return self._real_directory() / f"snapshots-{self.seed}"

    def _verify(self) -> None:
        """recovery.verify() on the SQLite journal finds nothing wrong."""
        assert self.real is not None
        result = verify(self.real, self._snapshot_dir())
        if result.problems or not result.history_checked:
            raise AssertionError(f"verify(): {result.problems}, history: {result.history_checked}")

    def _open_real_journal(self) -> None:
        self.real = Journal(self._real_url())
        self.projector = None


def run_seed(seed: int, steps: int = DEFAULT_STEPS, directory: Path | None = None) -> Summary:
    return Simulation(seed, directory=directory).run(steps)
