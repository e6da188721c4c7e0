"""callcredit-example-dialer: a small simulated campaign on one DialerClient.

It uses the library the way a real dialer does: many calls at once over one stream, the
talk clock started at answer, renewals left to the library, hang-up when callcredit says
so, and a release for every reserve. Calls ring and talk for simulated (slept) times;
each outcome is printed as the campaign drains, then the account and a summary that
accounts for every call of the campaign (placed, or why not).

A refusal is not always the end. While money is only *held* by calls in progress
(INSUFFICIENT_FUNDS, CONCURRENT_CALL_LIMIT), a line waits for one of them to end and
tries again; it stops when nothing in progress can free any (``after_refusal``).

    callcredit-example-dialer --account acct-1 --calls 20 --concurrency 5

Exit codes: 0 the campaign ran (whatever the refusals), 2 usage, 3 the server cannot be
reached (the line says why), 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import logging
import os
import random
import sys
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from callcredit.admin import AdminClient
from callcredit.connect import DEFAULT_CONNECT_TIMEOUT_SECONDS
from callcredit.dialer import DialerCall, DialerClient
from callcredit.errors import CallcreditError, ErrorReason
from callcredit.money import format_amount

DEFAULT_TARGET = "127.0.0.1:50051"
EXIT_NO_ANSWER = 3
RING_SECONDS_MIN = 0.2
RING_SECONDS_MAX = 2.0
"""Simulated ringing before a call is answered or given up on."""

WAIT_FOR_HOLDS = frozenset(
    ErrorReason.Name(reason)
    for reason in (ErrorReason.INSUFFICIENT_FUNDS, ErrorReason.CONCURRENT_CALL_LIMIT)
)
"""Refusals that a call in progress can lift by ending (its hold or its slot is freed)."""

WAIT_RECHECK_SECONDS = 1.0
"""A line waiting for a call to end tries again after this at the latest."""

_NO_ANSWER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class Next(enum.Enum):
    """What a line of the campaign does after a refused reserve."""

    RETRY_WHEN_A_CALL_ENDS = "retry when a call ends"
    STOP = "stop placing calls"


def after_refusal(reason: str, calls_in_progress: int) -> Next:
    """Wait for a call in progress to free money (or a slot) and try again, or stop:
    no call is in progress that could, or the refusal is not about held money at all
    (ACCOUNT_SUSPENDED, NO_RATE_FOR_DESTINATION, ...), which every call would get."""
    if reason in WAIT_FOR_HOLDS and calls_in_progress > 0:
        return Next.RETRY_WHEN_A_CALL_ENDS
    return Next.STOP


@dataclass(frozen=True, slots=True)
class Campaign:
    """What to dial and how to connect, parsed from the command line."""

    target: str
    account_id: str
    calls: int
    concurrency: int
    destination: str
    talk_seconds_min: float
    talk_seconds_max: float
    requested_seconds: int
    answer_ratio: float
    seed: int | None
    token: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS


@dataclass(slots=True)
class Tally:
    """Counts for the closing summary; charged is minor units."""

    placed: int = 0
    answered: int = 0
    charged: int = 0
    waits: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    in_progress: int = 0


def parse_talk_seconds(text: str) -> tuple[float, float]:
    """Parse MIN:MAX (seconds, 0 <= MIN <= MAX)."""
    low, separator, high = text.partition(":")
    try:
        talk_min, talk_max = float(low), float(high if separator else low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX seconds, got {text!r}") from None
    if not 0 <= talk_min <= talk_max:
        raise argparse.ArgumentTypeError(f"expected 0 <= MIN <= MAX, got {text!r}")
    return talk_min, talk_max


def parse_args(argv: Sequence[str] | None) -> Campaign:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="callcredit-example-dialer",
        description="Simulate a small outbound campaign against a callcredit server.",
    )
    parser.add_argument(
        "--target",
        default=env("CALLCREDIT_TARGET", DEFAULT_TARGET),
        help="server address host:port, or host:port,host:port,... for a primary and its "
        "hot standbys (env CALLCREDIT_TARGET; default %(default)s)",
    )
    parser.add_argument("--account", required=True, help="the account that pays")
    parser.add_argument("--calls", type=int, default=20, help="calls to place (%(default)s)")
    parser.add_argument("--concurrency", type=int, default=5, help="calls at once (%(default)s)")
    parser.add_argument(
        "--destination", default="+84901234567", help="number to dial (%(default)s)"
    )
    parser.add_argument(
        "--talk-seconds",
        type=parse_talk_seconds,
        default=(3.0, 15.0),
        metavar="MIN:MAX",
        help="simulated talk time of an answered call (default 3:15)",
    )
    parser.add_argument(
        "--requested-seconds",
        type=int,
        default=0,
        help="seconds asked per grant; 0 = server default (%(default)s)",
    )
    parser.add_argument(
        "--answer-ratio",
        type=float,
        default=0.8,
        help="share of calls that are answered, 0-1 (%(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed for the simulated ring and talk times"
    )
    parser.add_argument(
        "--token",
        default=env("CALLCREDIT_TOKEN"),
        help="dialer bearer token (better: env CALLCREDIT_TOKEN, hidden from process lists)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        default=bool(env("CALLCREDIT_TLS")),
        help="use TLS with the system's CAs (env CALLCREDIT_TLS)",
    )
    parser.add_argument(
        "--ca-file", default=env("CALLCREDIT_CA_FILE"), help="PEM CA of the server (TLS)"
    )
    parser.add_argument(
        "--cert-file", default=env("CALLCREDIT_CERT_FILE"), help="PEM client cert (mutual TLS)"
    )
    parser.add_argument("--key-file", default=env("CALLCREDIT_KEY_FILE"), help="its PEM key")
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=DEFAULT_CONNECT_TIMEOUT_SECONDS,
        help="seconds to wait for the server before giving up with exit 3 (%(default)s)",
    )
    args = parser.parse_args(argv)
    if args.calls < 0:
        parser.error("--calls must be >= 0")
    if args.concurrency < 1:
        parser.error("--concurrency must be >= 1")
    if not 0 <= args.requested_seconds <= 86_400:
        parser.error("--requested-seconds must be within 0-86400")
    if not 0.0 <= args.answer_ratio <= 1.0:
        parser.error("--answer-ratio must be within 0-1")
    if args.connect_timeout <= 0:
        parser.error("--connect-timeout must be positive")
    if bool(args.cert_file) != bool(args.key_file):
        parser.error("--cert-file and --key-file go together")
    talk_min, talk_max = args.talk_seconds
    return Campaign(
        target=args.target,
        account_id=args.account,
        calls=args.calls,
        concurrency=args.concurrency,
        destination=args.destination,
        talk_seconds_min=talk_min,
        talk_seconds_max=talk_max,
        requested_seconds=args.requested_seconds,
        answer_ratio=args.answer_ratio,
        seed=args.seed,
        token=args.token or None,
        tls=args.tls,
        ca_file=args.ca_file or None,
        cert_file=args.cert_file or None,
        key_file=args.key_file or None,
        connect_timeout_seconds=args.connect_timeout,
    )


async def wait_or_hang_up(call: DialerCall, seconds: float) -> str | None:
    """Let `seconds` pass unless callcredit orders a hang-up first; return its reason."""
    try:
        async with asyncio.timeout(seconds):
            return await call.must_hang_up()
    except TimeoutError:
        return None


async def converse(call: DialerCall, campaign: Campaign, rng: random.Random) -> str:
    """Ring, maybe answer, talk; return how the call ended."""
    reason = await wait_or_hang_up(call, rng.uniform(RING_SECONDS_MIN, RING_SECONDS_MAX))
    if reason is not None:
        return f"hung up while ringing: {reason}"
    if rng.random() >= campaign.answer_ratio:
        return "no answer"
    call.answered()
    talk_seconds = rng.uniform(campaign.talk_seconds_min, campaign.talk_seconds_max)
    reason = await wait_or_hang_up(call, talk_seconds)
    return "completed" if reason is None else f"hung up: {reason}"


class Dialing:
    """The campaign's shared state: the numbers left, the tally, and "a call ended"."""

    def __init__(self, campaign: Campaign, dialer: DialerClient, currency: str) -> None:
        self.campaign = campaign
        self.dialer = dialer
        self.currency = currency
        self.tally = Tally()
        self.rng = random.Random(campaign.seed)
        # Call ids must stay unique for the idempotency window (24 h), across runs too.
        self.run_id = uuid.uuid4().hex[:8]
        self.numbers = iter(range(1, campaign.calls + 1))  # each line takes the next
        self.stopped: str | None = None  # why no more calls are placed
        self.unreachable: CallcreditError | None = None  # the server went away
        self.call_ended = asyncio.Condition()
        self.width = len(f"example-{self.run_id}-{campaign.calls}")

    async def line(self) -> None:
        """One line of the campaign: place calls one after another until none are left."""
        for number in self.numbers:
            if self.stopped is not None:
                return
            call_id = f"example-{self.run_id}-{number}"
            while True:
                outcome = await self.place(call_id)
                if outcome is None:
                    break
                # Refused: wait for a call in progress to end, or stop the campaign.
                if after_refusal(outcome, self.tally.in_progress) is Next.STOP:
                    self.tally.refused[outcome] += 1
                    self.stopped = outcome
                    print(f"{call_id:<{self.width}}  refused: {outcome}", flush=True)
                    return
                self.tally.waits += 1
                async with self.call_ended:
                    # Bounded: a call that ended while this line took the lock is not
                    # missed for longer than this.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(WAIT_RECHECK_SECONDS):
                            await self.call_ended.wait()
                if self.stopped is not None:
                    return

    async def place(self, call_id: str) -> str | None:
        """One call from reserve to release; None once done, or the refusal's reason."""
        campaign = self.campaign
        try:
            call = await self.dialer.reserve(
                call_id, campaign.account_id, campaign.destination, campaign.requested_seconds
            )
        except CallcreditError as err:
            if err.code not in _NO_ANSWER_CODES:
                return err.reason
            self.unreachable = err
            self.stopped = err.reason
            return None
        tally = self.tally
        tally.placed += 1
        tally.in_progress += 1
        try:
            try:
                how = await converse(call, campaign, self.rng)
            except BaseException:
                # Interrupted (Ctrl-C): release anyway, or the hold expires charged in full.
                await call.release()
                raise
            result = await call.release()
        finally:
            tally.in_progress -= 1
            async with self.call_ended:
                self.call_ended.notify_all()
        if result.used_seconds > 0:
            tally.answered += 1
        tally.charged += result.charged
        line = (
            f"{call_id:<{self.width}}  {how:<38} used {result.used_seconds:>4} s  "
            f"billed {result.billed_seconds:>4} s  charged "
            f"{format_amount(result.charged, self.currency):>10}"
        )
        if result.shortfall:
            line += f"  shortfall {format_amount(result.shortfall, self.currency)}"
        print(line, flush=True)
        return None


def summary(campaign: Campaign, tally: Tally, currency: str, stopped: str | None) -> list[str]:
    """The closing lines: every call of the campaign is placed, refused or not tried."""
    refused = sum(tally.refused.values())
    not_tried = campaign.calls - tally.placed - refused
    lines = []
    if stopped is not None:
        lines.append(
            f"stopped placing calls: {stopped}, and no call in progress could free any money"
        )
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(tally.refused.items()))
    lines.append(
        f"{campaign.calls} calls: {tally.placed} placed ({tally.answered} answered), "
        f"{refused} refused{f' ({reasons})' if reasons else ''}, {not_tried} not tried; "
        f"charged {format_amount(tally.charged, currency)}"
    )
    if tally.waits:
        lines.append(
            f"{tally.waits} times a call waited for money held by calls in progress, then went on"
        )
    return lines


async def run(campaign: Campaign) -> int:
    bound = campaign.connect_timeout_seconds
    admin = AdminClient(
        campaign.target,
        timeout_seconds=bound,
        token=campaign.token,
        tls=campaign.tls,
        ca_file=campaign.ca_file,
        cert_file=campaign.cert_file,
        key_file=campaign.key_file,
    )
    async with admin:

        async def describe() -> tuple[str, str]:
            account = await admin.get_account(campaign.account_id)
            currency = account.currency

            def money(amount: int) -> str:
                return format_amount(amount, currency)

            return currency, (
                f"{account.account_id}: balance {money(account.balance)}, "
                f"reserved {money(account.reserved)}, available {money(account.available)}, "
                f"active calls {account.active_calls}"
            )

        try:
            currency, before = await describe()
        except CallcreditError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return EXIT_NO_ANSWER if err.code in _NO_ANSWER_CODES else 1
        print(before, flush=True)
        dialer = DialerClient(
            campaign.target,
            connect_timeout_seconds=bound,
            token=campaign.token,
            tls=campaign.tls,
            ca_file=campaign.ca_file,
            cert_file=campaign.cert_file,
            key_file=campaign.key_file,
        )
        async with dialer:
            dialing = Dialing(campaign, dialer, currency)
            async with asyncio.TaskGroup() as lines:
                for _ in range(min(campaign.concurrency, campaign.calls)):
                    lines.create_task(dialing.line())
        if dialing.unreachable is not None:
            print(f"error: {dialing.unreachable}", file=sys.stderr, flush=True)
            return EXIT_NO_ANSWER
        for text in summary(campaign, dialing.tally, currency, dialing.stopped):
            print(text, flush=True)
        try:
            print((await describe())[1], flush=True)
        except CallcreditError as err:
            print(f"balance unavailable: {err}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (callcredit-example-dialer)."""
    campaign = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return asyncio.run(run(campaign))
    except KeyboardInterrupt:
        return 130
