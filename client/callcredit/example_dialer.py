"""callcredit-example-dialer: a small simulated campaign on one DialerClient.

It uses the library the way a real dialer does: many calls at once over one stream, the
talk clock started at answer, renewals left to the library, hang-up when callcredit says
so, a release for every reserve, and no new calls once the account cannot take them.
Calls ring and talk for simulated (slept) times; each outcome and the account's balance
(read with AdminService.GetAccount) are printed as the campaign drains.

    callcredit-example-dialer --account acct-1 --calls 20 --concurrency 5
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc

from callcredit.dialer import DialerCall, DialerClient
from callcredit.errors import CallcreditError, ErrorReason
from callcredit.v1 import admin_pb2, admin_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
RING_SECONDS_MIN = 0.2
RING_SECONDS_MAX = 2.0
"""Simulated ringing before a call is answered or given up on."""

STOP_PLACING_REASONS = frozenset(
    {
        ErrorReason.INSUFFICIENT_FUNDS,
        ErrorReason.ACCOUNT_SUSPENDED,
        ErrorReason.ACCOUNT_CLOSED,
        ErrorReason.ACCOUNT_NOT_FOUND,
        ErrorReason.NO_RATE_FOR_DESTINATION,
    }
)
"""Reserve refusals that every further call would get too, so the campaign stops placing."""


@dataclass(frozen=True, slots=True)
class Campaign:
    """What to dial, parsed from the command line."""

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


@dataclass(slots=True)
class Tally:
    """Counts for the closing summary; charged is minor units."""

    placed: int = 0
    answered: int = 0
    refused: int = 0
    charged: int = 0


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
    parser = argparse.ArgumentParser(
        prog="callcredit-example-dialer",
        description="Simulate a small outbound campaign against a callcredit server.",
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("CALLCREDIT_TARGET", DEFAULT_TARGET),
        help="server address host:port (env CALLCREDIT_TARGET; default %(default)s)",
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
    args = parser.parse_args(argv)
    if args.calls < 0:
        parser.error("--calls must be >= 0")
    if args.concurrency < 1:
        parser.error("--concurrency must be >= 1")
    if not 0 <= args.requested_seconds <= 86_400:
        parser.error("--requested-seconds must be within 0-86400")
    if not 0.0 <= args.answer_ratio <= 1.0:
        parser.error("--answer-ratio must be within 0-1")
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


async def place_call(
    dialer: DialerClient,
    campaign: Campaign,
    call_id: str,
    rng: random.Random,
    tally: Tally,
    stop_placing: asyncio.Event,
) -> str:
    """One call from reserve to release; returns the line to print."""
    try:
        call = await dialer.reserve(
            call_id, campaign.account_id, campaign.destination, campaign.requested_seconds
        )
    except CallcreditError as err:
        tally.refused += 1
        if err.error_reason in STOP_PLACING_REASONS:
            stop_placing.set()
        return f"{call_id}  refused: {err.reason}"
    tally.placed += 1
    try:
        how = await converse(call, campaign, rng)
    except BaseException:
        # Interrupted (Ctrl-C): release anyway, or the hold expires charged in full.
        await call.release()
        raise
    result = await call.release()
    if result.used_seconds > 0:
        tally.answered += 1
    tally.charged += result.charged
    line = (
        f"{call_id}  {how:<36} used {result.used_seconds:>4} s  "
        f"billed {result.billed_seconds:>4} s  charged {result.charged}"
    )
    if result.shortfall:
        line += f"  shortfall {result.shortfall}"
    return line


async def describe_balance(admin: admin_pb2_grpc.AdminServiceAsyncStub, account_id: str) -> str:
    try:
        response: admin_pb2.GetAccountResponse = await admin.GetAccount(
            admin_pb2.GetAccountRequest(account_id=account_id)
        )
    except grpc.aio.AioRpcError as err:
        return f"    balance unavailable: {CallcreditError.from_rpc_error(err)}"
    account = response.account
    return (
        f"    {account.account_id}: balance {account.balance} {account.currency} "
        f"(minor units), reserved {account.reserved}, available {account.available}, "
        f"active calls {account.active_calls}"
    )


async def dial(
    dialer: DialerClient,
    admin: admin_pb2_grpc.AdminServiceAsyncStub,
    campaign: Campaign,
    numbers: Iterator[int],
    run_id: str,
    rng: random.Random,
    tally: Tally,
    stop_placing: asyncio.Event,
) -> None:
    """One line of the campaign: place calls one after another until none are left."""
    for number in numbers:
        if stop_placing.is_set():
            return
        call_id = f"example-{run_id}-{number}"
        print(await place_call(dialer, campaign, call_id, rng, tally, stop_placing), flush=True)
        print(await describe_balance(admin, campaign.account_id), flush=True)


async def run(campaign: Campaign) -> int:
    # Call ids must stay unique for the idempotency window (24 h), across runs too.
    run_id = uuid.uuid4().hex[:8]
    rng = random.Random(campaign.seed)
    tally = Tally()
    stop_placing = asyncio.Event()
    numbers = iter(range(1, campaign.calls + 1))  # shared: each line takes the next number
    async with grpc.aio.insecure_channel(campaign.target) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        print(await describe_balance(admin, campaign.account_id), flush=True)
        async with DialerClient(channel) as dialer, asyncio.TaskGroup() as lines:
            for _ in range(min(campaign.concurrency, campaign.calls)):
                lines.create_task(
                    dial(dialer, admin, campaign, numbers, run_id, rng, tally, stop_placing)
                )
    if stop_placing.is_set():
        print("stopped placing calls: the account refuses new ones", flush=True)
    print(
        f"placed {tally.placed}, answered {tally.answered}, refused {tally.refused}, "
        f"charged {tally.charged} (minor units)",
        flush=True,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (callcredit-example-dialer)."""
    campaign = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return asyncio.run(run(campaign))
    except KeyboardInterrupt:
        return 130
