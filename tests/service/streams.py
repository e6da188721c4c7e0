"""A bare Control stream for tests: send operations, collect answers and pushes."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from callcredit.v1 import credit_control_pb2, credit_control_pb2_grpc

Operation = credit_control_pb2.Operation


def reserve_op(
    request_id: str,
    call_id: str,
    account_id: str,
    destination: str = "84901234567",
    seconds: int = 0,
) -> Operation:
    return Operation(
        request_id=request_id,
        reserve=credit_control_pb2.ReserveRequest(
            call_id=call_id,
            account_id=account_id,
            destination=destination,
            requested_seconds=seconds,
        ),
    )


def renew_op(
    request_id: str, call_id: str, sequence: int, used_seconds: int, seconds: int = 0
) -> Operation:
    return Operation(
        request_id=request_id,
        renew=credit_control_pb2.RenewRequest(
            call_id=call_id, sequence=sequence, used_seconds=used_seconds, requested_seconds=seconds
        ),
    )


def release_op(request_id: str, call_id: str, used_seconds: int) -> Operation:
    return Operation(
        request_id=request_id,
        release=credit_control_pb2.ReleaseRequest(call_id=call_id, used_seconds=used_seconds),
    )


class RawStream:
    """One Control stream; a background task files every response it reads."""

    def __init__(self, stub: credit_control_pb2_grpc.CreditControlServiceAsyncStub) -> None:
        self.call: Any = stub.Control()
        self.outcomes: dict[str, credit_control_pb2.Outcome] = {}
        self.grant_updates: list[credit_control_pb2.Grant] = []
        self.terminations: list[credit_control_pb2.CallTermination] = []
        self.messages = 0
        self._changed = asyncio.Condition()
        self._writing = asyncio.Lock()  # grpc.aio allows one write in flight per call
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                async with self._changed:
                    self.messages += 1
                    for outcome in response.outcomes:
                        self.outcomes[outcome.request_id] = outcome
                    self.grant_updates.extend(response.grant_updates)
                    self.terminations.extend(response.terminations)
                    self._changed.notify_all()
        except grpc.aio.AioRpcError:
            pass

    async def send(self, *operations: Operation) -> None:
        async with self._writing:
            await self.call.write(credit_control_pb2.ControlRequest(operations=operations))

    async def ask(
        self, *operations: Operation, timeout: float = 10.0
    ) -> list[credit_control_pb2.Outcome]:
        """Send operations in one message and wait for each answer."""
        await self.send(*operations)
        return await self.answers([op.request_id for op in operations], timeout=timeout)

    async def answers(
        self, request_ids: list[str], timeout: float = 10.0
    ) -> list[credit_control_pb2.Outcome]:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: all(r in self.outcomes for r in request_ids))
            return [self.outcomes[r] for r in request_ids]

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    async def ended(self, timeout: float = 10.0) -> grpc.StatusCode:
        """Wait for the server to end the stream; its status code."""
        await asyncio.wait_for(self._reader, timeout)
        code: grpc.StatusCode = await self.call.code()
        return code

    async def close(self) -> None:
        await self.call.done_writing()
        await asyncio.wait_for(self._reader, 10)
