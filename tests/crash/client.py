"""One client process of the crash test: a dialer campaign that outlives server kills.

    python -m tests.crash.client '<ClientConfig as JSON>'

Call workers place calls (reserve, a few renews, release) over one multiplexed
Control stream or the unary RPCs, chosen per attempt; a money worker tops up and
adjusts with idempotency keys and reads balances. Every operation is retried
with the same ids until it is answered or refused; with a small probability an
operation whose answer was lost is given up instead (logged `unanswered`, never
sent again), so the checks see operations that may or may not have happened.
Answered operations are sometimes sent again: in the same ControlRequest, right
away, or after the next reconnect. When the server is lost the client re-reads
`<workdir>/target` and reconnects; a target file naming several servers
(`a:1,b:2`, a hot standby setup) is tried in turn, and a NOT_PRIMARY refusal is a
lost answer like UNAVAILABLE (the operation is sent again, to the next server).
When `<workdir>/stop` appears it stops placing calls, releases the calls it has
(or leaves some open, logged), waits for what is in flight, and exits. Everything
it learns is in `<workdir>/client-<id>.events` (see harness.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from callcredit.v1 import admin_pb2, admin_pb2_grpc, credit_control_pb2, credit_control_pb2_grpc
from tests.crash.harness import (
    DESTINATIONS,
    DOMAIN,
    EVENTS_SUFFIX,
    STOP_FILE,
    ClientConfig,
    EventLog,
    account_answer,
    read_target,
)

CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
FAILURES_BEFORE_NEW_CHANNEL = 3  # on one target, and only if the channel is older than:
CHANNEL_MIN_AGE_SECONDS = 2.0
OLD_CHANNEL_GRACE_SECONDS = 2.0  # then an abandoned channel is closed (its calls have failed)


class Lost(Exception):
    """No answer: the operation may or may not have been applied."""


def _reraise_if_cancelled() -> None:
    """Inside `except CancelledError`: re-raise when this task itself is being cancelled.

    grpc.aio raises CancelledError in the caller when a call is cancelled under it
    (its stream closed); that is a lost answer, not a request to stop.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise


class Refusal(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def refusal_reason(status: status_pb2.Status | None) -> str | None:
    """The callcredit reason of a refusal; None for anything that is not one."""
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == DOMAIN and info.reason not in ("UNAVAILABLE", "NOT_PRIMARY"):
                return str(info.reason)
    return None


def grant_answer(grant: credit_control_pb2.Grant) -> dict[str, Any]:
    return {
        "allowed": grant.allowed_seconds,
        "final": grant.final,
        "validity": grant.validity_seconds,
        "held": grant.held,
    }


def release_answer(release: credit_control_pb2.ReleaseResponse) -> dict[str, Any]:
    return {
        "billed": release.billed_seconds,
        "charged": release.charged,
        "shortfall": release.shortfall,
        "balance": release.balance,
    }


@dataclass(frozen=True, slots=True)
class Op:
    """One operation; `req` is the same on every attempt (the ids make it idempotent)."""

    kind: str  # reserve | renew | release | topup | adjust
    req: dict[str, Any]

    def operation(self, request_id: str) -> credit_control_pb2.Operation:
        r = self.req
        if self.kind == "reserve":
            return credit_control_pb2.Operation(
                request_id=request_id,
                reserve=credit_control_pb2.ReserveRequest(
                    call_id=r["call"],
                    account_id=r["account"],
                    destination=r["dest"],
                    requested_seconds=r["seconds"],
                ),
            )
        if self.kind == "renew":
            return credit_control_pb2.Operation(
                request_id=request_id,
                renew=credit_control_pb2.RenewRequest(
                    call_id=r["call"],
                    sequence=r["seq"],
                    used_seconds=r["used"],
                    requested_seconds=r["seconds"],
                ),
            )
        if self.kind == "release":
            return credit_control_pb2.Operation(
                request_id=request_id,
                release=credit_control_pb2.ReleaseRequest(
                    call_id=r["call"], used_seconds=r["used"]
                ),
            )
        raise ValueError(f"{self.kind} does not go over the Control stream")


@dataclass(frozen=True, slots=True)
class Result:
    status: str  # ack | refused | unanswered
    ans: dict[str, Any]
    reason: str = ""


class ControlStream:
    """One Control stream: answers matched by request id, pushes logged, loss detected."""

    def __init__(
        self, stub: credit_control_pb2_grpc.CreditControlServiceAsyncStub, client: Client
    ) -> None:
        self._client = client
        self.call: Any = stub.Control()
        self.pending: dict[str, asyncio.Future[credit_control_pb2.Outcome]] = {}
        self.dead = False
        self._writing = asyncio.Lock()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                for outcome in response.outcomes:
                    future = self.pending.pop(outcome.request_id, None)
                    if future is not None and not future.done():
                        future.set_result(outcome)
                for grant in response.grant_updates:
                    self._client.stats["pushes"] += 1
                    self._client.log.write("push", call=grant.call_id, **grant_answer(grant))
                for termination in response.terminations:
                    self._client.log.write(
                        "termination", call=termination.call_id, reason=termination.reason
                    )
        except Exception:  # the stream failed (AioRpcError): every answer on it is lost
            self._client.stats["streams_lost"] += 1
        finally:
            self._die()

    def _die(self) -> None:
        self.dead = True
        for future in self.pending.values():
            future.cancel()  # its waiter raises Lost
        self.pending.clear()

    async def ask(
        self, operations: list[credit_control_pb2.Operation], timeout: float
    ) -> list[credit_control_pb2.Outcome]:
        if self.dead:
            raise Lost("stream ended")
        loop = asyncio.get_running_loop()
        futures = []
        for operation in operations:
            future: asyncio.Future[credit_control_pb2.Outcome] = loop.create_future()
            self.pending[operation.request_id] = future
            futures.append(future)
        try:
            async with self._writing:
                await self.call.write(credit_control_pb2.ControlRequest(operations=operations))
        except (Exception, asyncio.CancelledError) as exc:  # any failure to write: lost
            _reraise_if_cancelled()
            self.close()
            raise Lost(f"write failed: {exc!r}") from exc
        outcomes = []
        try:
            async with asyncio.timeout(timeout):
                for future in futures:
                    try:
                        outcomes.append(await future)
                    except asyncio.CancelledError:
                        _reraise_if_cancelled()  # the timeout, or the task's own cancel
                        raise Lost("stream ended") from None
        except TimeoutError as exc:
            self._client.stats["timeouts"] += 1
            self.close()
            raise Lost("no answer in time") from exc
        return outcomes

    def close(self) -> None:
        self.call.cancel()
        self._die()


class Connection:
    """The channel to the server named in the target file, and the one Control stream."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._workdir = Path(client.cfg.workdir)
        self._lock = asyncio.Lock()
        self.target: str | None = None
        self.channel: grpc.aio.Channel | None = None
        self.stream: ControlStream | None = None
        self.generation = 0  # grows with every new channel or stream: a reconnect
        self._turn = 0  # which of several targets is next
        self._failures = 0
        self._opened_at = 0.0
        self._closing: set[asyncio.Task[None]] = set()

    async def _open(self) -> grpc.aio.Channel:
        while True:
            targets = read_target(self._workdir)
            if targets is not None:
                choices = targets.split(",")
                target = choices[self._turn % len(choices)]
                break
            await asyncio.sleep(0.05)
        if self.channel is not None:  # closed a little later: closing cancels calls on it
            closing = asyncio.create_task(_close_later(self.channel, OLD_CHANNEL_GRACE_SECONDS))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        self.target = target
        self._opened_at = time.monotonic()
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stream = None
        self.generation += 1
        self._client.stats["channels"] += 1
        self._failures = 0
        return self.channel

    async def get_channel(self) -> grpc.aio.Channel:
        async with self._lock:
            if self.channel is None:
                return await self._open()
            return self.channel

    async def get_stream(self) -> ControlStream:
        async with self._lock:
            channel = self.channel if self.channel is not None else await self._open()
            if self.stream is None or self.stream.dead:
                self.stream = ControlStream(
                    credit_control_pb2_grpc.CreditControlServiceStub(channel), self._client
                )
                self.generation += 1
                self._client.stats["streams"] += 1
            return self.stream

    async def lost(self, channel: grpc.aio.Channel | None) -> None:
        """An answer was lost on `channel`: look for the server again if need be."""
        async with self._lock:
            if channel is not self.channel:
                return  # someone replaced it already
            self._failures += 1
            targets = read_target(self._workdir) or ""
            stuck = (
                self._failures >= FAILURES_BEFORE_NEW_CHANNEL
                and time.monotonic() - self._opened_at > CHANNEL_MIN_AGE_SECONDS
            )
            if "," in targets:  # several servers: the next one may be the primary
                self._turn += 1
                await self._open()
            elif targets != self.target or stuck:
                await self._open()

    def answered(self) -> None:
        self._failures = 0

    async def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        if self.channel is not None:
            await self.channel.close()
        await asyncio.gather(*self._closing, return_exceptions=True)


async def _close_later(channel: grpc.aio.Channel, delay_seconds: float) -> None:
    await asyncio.sleep(delay_seconds)
    await channel.close()


class Client:
    def __init__(self, cfg: ClientConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.log = EventLog(Path(cfg.workdir) / f"client-{cfg.client_id}{EVENTS_SUFFIX}")
        self.stats: Counter[str] = Counter()
        self.conn = Connection(self)
        self.stopping = asyncio.Event()
        self.deadline: float | None = None
        self._calls = 0
        self._keys = 0
        self._replays: list[tuple[int, Op, dict[str, Any]]] = []
        self._attempts = 0
        self._workers_done = asyncio.Event()

    # ------------------------------------------------------------ sending

    def _past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def _via(self, op: Op) -> str:
        if op.kind in ("topup", "adjust") or self.rng.random() < self.cfg.unary_probability:
            return "unary"
        return "stream"

    async def perform(self, op: Op, *, batch_duplicate: bool = False) -> Result:
        """Send until answered or refused; give up only as the config says (logged)."""
        vias: list[str] = []
        give_up: bool | None = None  # decided at the first lost answer
        while True:
            via = self._via(op)
            vias.append(via)
            self.stats["sent"] += 1
            if len(vias) > 1:
                self.stats["retried"] += 1
            channel = self.conn.channel
            try:
                ans = await self._send(op, via, batch_duplicate and via == "stream")
            except Lost as exc:
                self.stats["lost"] += 1
                if give_up is None:
                    give_up = self.rng.random() < self.cfg.abandon_probability
                if give_up or self._past_deadline():
                    self.log.write("unanswered", op=op.kind, req=op.req, attempts=len(vias),
                                   via=vias, abandoned=give_up, why=str(exc)[:200])  # fmt: skip
                    return Result("unanswered", {})
                await self.conn.lost(channel)
                await asyncio.sleep(min(0.5, 0.05 * len(vias)) * self.rng.uniform(0.5, 1.5))
                continue
            except Refusal as refusal:
                self.conn.answered()
                self.log.write("refused", op=op.kind, req=op.req, reason=refusal.reason,
                               attempts=len(vias), via=vias)  # fmt: skip
                return Result("refused", {}, refusal.reason)
            self.conn.answered()
            self.log.write("ack", op=op.kind, req=op.req, ans=ans, attempts=len(vias), via=vias)
            return Result("ack", ans)

    def _request_id(self, op: Op) -> str:
        self._attempts += 1
        return f"{op.kind}.{self._attempts}"

    async def _send(self, op: Op, via: str, batch_duplicate: bool = False) -> dict[str, Any]:
        """One attempt; raises Lost (no answer) or Refusal."""
        if via == "stream":
            stream = await self.conn.get_stream()
            operations = [op.operation(self._request_id(op))]
            if batch_duplicate:
                operations.append(op.operation(self._request_id(op)))
            outcomes = await stream.ask(operations, self.cfg.op_timeout_seconds)
            results = [self._outcome(op, outcome) for outcome in outcomes]
            if batch_duplicate and all(r is not None for r in results):
                self.stats["duplicates"] += 1
                self.log.write("dup", op=op.kind, req=op.req, batch=True,
                               first=results[0], again=results[1])  # fmt: skip
            first = results[0]
            if first is None:
                raise Lost("the server answered UNAVAILABLE")
            if "refused" in first:
                raise Refusal(first["refused"], "")
            return first
        channel = await self.conn.get_channel()
        try:
            return await self._unary(op, channel)
        except asyncio.CancelledError:
            _reraise_if_cancelled()
            raise Lost("call cancelled under us") from None
        except grpc.aio.AioRpcError as error:
            try:
                status = rpc_status.from_call(error)  # type: ignore[arg-type]
            except ValueError:
                status = None
            reason = refusal_reason(status)
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                self.stats["timeouts"] += 1
            if reason is None:
                raise Lost(f"{error.code().name}: {error.details()}") from error
            raise Refusal(reason, error.details() or "") from error

    def _outcome(self, op: Op, outcome: credit_control_pb2.Outcome) -> dict[str, Any] | None:
        """An outcome as logged: the answer, {"refused": reason}, or None (UNAVAILABLE)."""
        which = outcome.WhichOneof("result")
        if which == "error":
            reason = refusal_reason(outcome.error)
            return None if reason is None else {"refused": reason}
        if which == "reserve":
            return grant_answer(outcome.reserve.grant)
        if which == "renew":
            return grant_answer(outcome.renew.grant)
        if which == "release":
            return release_answer(outcome.release)
        self.log.write("violation", what=f"{op.kind} answered with {which}")
        return None

    async def _unary(self, op: Op, channel: grpc.aio.Channel) -> dict[str, Any]:
        r, timeout = op.req, self.cfg.op_timeout_seconds
        dialer = credit_control_pb2_grpc.CreditControlServiceStub(channel)
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        if op.kind == "reserve":
            reserved = await dialer.Reserve(op.operation("").reserve, timeout=timeout)
            return grant_answer(reserved.grant)
        if op.kind == "renew":
            renewed = await dialer.Renew(op.operation("").renew, timeout=timeout)
            return grant_answer(renewed.grant)
        if op.kind == "release":
            return release_answer(await dialer.Release(op.operation("").release, timeout=timeout))
        if op.kind == "topup":
            topped = await admin.TopUp(
                admin_pb2.TopUpRequest(account_id=r["account"], amount=r["amount"],
                                       idempotency_key=r["key"], reference=r["reference"]),
                timeout=timeout,
            )  # fmt: skip
            return account_answer(topped.account)
        adjusted = await admin.Adjust(
            admin_pb2.AdjustRequest(account_id=r["account"], amount=r["amount"],
                                    idempotency_key=r["key"], reason=r["reference"]),
            timeout=timeout,
        )  # fmt: skip
        return account_answer(adjusted.account)

    async def duplicate(self, op: Op, first: dict[str, Any], *, after_reconnect: bool) -> bool:
        """Send an answered op once more; log both answers. False if this answer was lost."""
        try:
            again = await self._send(op, self._via(op))
        except Lost:
            return False
        except Refusal as refusal:
            again = {"refused": refusal.reason}
        self.stats["duplicates"] += 1
        self.log.write("dup", op=op.kind, req=op.req, first=first, again=again,
                       after_reconnect=after_reconnect)  # fmt: skip
        return True

    async def _maybe_duplicate(self, op: Op, result: Result) -> None:
        if result.status != "ack":
            return
        if self.rng.random() < self.cfg.duplicate_probability:
            await self.duplicate(op, result.ans, after_reconnect=False)
        if op.kind in ("release", "topup", "adjust") and (
            self.rng.random() < self.cfg.replay_probability
        ):
            self._replays.append((self.conn.generation, op, result.ans))

    # ------------------------------------------------------------ workers

    async def call_worker(self) -> None:
        cfg, rng = self.cfg, self.rng
        while not self.stopping.is_set():
            self._calls += 1
            call_id = f"{cfg.tag}.c{cfg.client_id}-{self._calls}"
            reserve = Op("reserve", {"call": call_id, "account": rng.choice(cfg.accounts),
                                     "dest": rng.choice(DESTINATIONS),
                                     "seconds": rng.choice([0, 5, 15, 30])})  # fmt: skip
            result = await self.perform(
                reserve, batch_duplicate=rng.random() < cfg.batch_duplicate_probability
            )
            await self._maybe_duplicate(reserve, result)
            if result.reason == "CALL_ALREADY_ENDED":  # placed, then expired while we retried
                await self.perform(Op("release", {"call": call_id, "used": 0}))  # late: refund
            if result.status != "ack":
                await asyncio.sleep(rng.uniform(0.02, 0.2))
                continue
            used = 0
            for sequence in range(1, rng.randint(1, 4)):
                if self.stopping.is_set():
                    break
                await asyncio.sleep(rng.uniform(0.05, 0.3))
                used += rng.randint(1, 12)
                renew = Op("renew", {"call": call_id, "seq": sequence, "used": used,
                                     "seconds": rng.choice([0, 10, 20])})  # fmt: skip
                renewed = await self.perform(renew)
                await self._maybe_duplicate(renew, renewed)
                if renewed.status == "refused":
                    break  # expired while we could not reach the server
            if rng.random() < cfg.leave_open_probability:
                self.log.write("left_open", call=call_id)
                continue
            if rng.random() < cfg.silent_probability:  # silent past validity: it expires,
                with contextlib.suppress(TimeoutError):  # the release comes late (a refund)
                    await asyncio.wait_for(self.stopping.wait(), cfg.silent_seconds)
            used += rng.randint(0, 8)  # sometimes past the allowance: a shortfall
            release = Op("release", {"call": call_id, "used": used})
            await self._maybe_duplicate(release, await self.perform(release))

    async def money_worker(self) -> None:
        cfg, rng = self.cfg, self.rng
        while not self.stopping.is_set():
            await asyncio.sleep(rng.uniform(0.1, 0.4))
            self._keys += 1
            (account,) = rng.choices(cfg.accounts, weights=cfg.top_up_weights)
            key = f"{cfg.tag}.k{cfg.client_id}-{self._keys}"
            if rng.random() < cfg.adjust_probability:
                amount = rng.choice([-1, 1]) * rng.randint(5, 40)
                op = Op("adjust", {"account": account, "key": key, "amount": amount,
                                   "reference": f"adj {key}"})  # fmt: skip
            else:
                amount = rng.randint(10, 120)
                op = Op("topup", {"account": account, "key": key, "amount": amount,
                                  "reference": f"ref {key}"})  # fmt: skip
            result = await self.perform(op)
            await self._maybe_duplicate(op, result)
            if result.status == "ack" and rng.random() < 0.1:
                await self._conflict_probe(op)
            if rng.random() < cfg.read_probability:
                await self._read_balance(account)

    async def _conflict_probe(self, op: Op) -> None:
        """The answered key again with another amount: must be refused, never applied."""
        probe = Op(op.kind, {**op.req, "amount": op.req["amount"] + 1})
        try:
            answer = await self._send(probe, "unary")
        except Lost:
            return
        except Refusal as refusal:
            if refusal.reason != "IDEMPOTENCY_KEY_CONFLICT":
                self.log.write("violation", what="conflicting key refused wrongly",
                               req=probe.req, reason=refusal.reason)  # fmt: skip
            return
        self.log.write("violation", what="conflicting key accepted", req=probe.req, ans=answer)

    async def _read_balance(self, account: str) -> None:
        try:
            channel = await self.conn.get_channel()
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            got = await admin.GetAccount(
                admin_pb2.GetAccountRequest(account_id=account), timeout=self.cfg.op_timeout_seconds
            )
        except grpc.aio.AioRpcError:
            return
        self.log.write("read", account=account, **account_answer(got.account))

    async def replayer(self) -> None:
        """Send answered releases and top-ups again once the connection was renewed."""
        while True:
            final = self.stopping.is_set() and self._workers_done.is_set()
            keep: list[tuple[int, Op, dict[str, Any]]] = []
            for generation, op, first in self._replays:
                due = (final or generation < self.conn.generation) and not self._past_deadline()
                if due and await self.duplicate(op, first, after_reconnect=True):
                    continue
                keep.append((generation, op, first))
            self._replays = keep
            if final:
                return
            await asyncio.sleep(0.2)

    async def watch_stop(self) -> None:
        stop = Path(self.cfg.workdir) / STOP_FILE
        while True:  # a file, polled: the harness is another process
            if stop.exists():
                break
            await asyncio.sleep(0.1)
        self.deadline = time.monotonic() + self.cfg.stop_grace_seconds
        self.stopping.set()

    async def run(self) -> None:
        watcher = asyncio.create_task(self.watch_stop())
        replayer = asyncio.create_task(self.replayer())
        try:
            await asyncio.gather(
                *(self.call_worker() for _ in range(self.cfg.call_workers)), self.money_worker()
            )
            self._workers_done.set()
            await replayer
        finally:
            watcher.cancel()
            replayer.cancel()
            self.log.write("stats", stats=dict(self.stats))
            self.log.close()
            await self.conn.close()


def main() -> None:
    cfg = ClientConfig.from_json(sys.argv[1])
    asyncio.run(Client(cfg).run())


if __name__ == "__main__":
    main()
