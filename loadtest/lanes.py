"""Control streams as a load generator drives them: one `Lane` per stream.

A lane holds the items (calls, slots) whose next operation is ready to send, writes
them as messages of at most `max_batch` operations, and keeps at most `window`
messages unanswered. Its owner's receiver calls `answered(message)` for each outcome,
which reopens the window once a message is fully answered. Every benchmark of
loadtest/ and scripts/ that drives raw Control streams uses this one.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar

from callcredit.v1 import credit_control_pb2

if TYPE_CHECKING:
    import grpc

    ControlCall: TypeAlias = grpc.aio.StreamStreamCall[
        credit_control_pb2.ControlRequest, credit_control_pb2.ControlResponse
    ]

Item = TypeVar("Item")


class Lane(Generic[Item]):
    """One Control stream: items ready to send, and the messages it has in flight."""

    def __init__(self, call: ControlCall, *, window: int, max_batch: int) -> None:
        self.call = call
        self.window = window  # messages unanswered at most
        self.max_batch = max_batch  # operations per message at most
        self.ready: collections.deque[Item] = collections.deque()
        self.wake = asyncio.Event()
        self.window_open = asyncio.Event()
        self.in_flight = 0
        self.unanswered: dict[int, int] = {}  # message number -> operations unanswered
        self.next_message = 0
        self.messages = 0  # sent, ever
        self.operations = 0  # sent, ever

    def push(self, item: Item) -> None:
        self.ready.append(item)
        self.wake.set()

    async def send(
        self,
        operation: Callable[[Item, int], credit_control_pb2.Operation],
        drained: asyncio.Event | None = None,
    ) -> None:
        """Write the ready items, each as `operation(item, message number)`, until
        `drained` is set with nothing ready (then close the sending side); without
        `drained`, until cancelled."""
        ready = self.ready
        while True:
            if not ready:
                if drained is not None and drained.is_set():
                    break
                self.wake.clear()
                await self.wake.wait()
                continue
            if self.in_flight >= self.window:
                self.window_open.clear()
                await self.window_open.wait()
                continue
            count = min(len(ready), self.max_batch)
            number = self.next_message
            self.next_message = number + 1
            operations = [operation(ready.popleft(), number) for _ in range(count)]
            self.unanswered[number] = count
            self.in_flight += 1
            self.messages += 1
            self.operations += count
            await self.call.write(credit_control_pb2.ControlRequest(operations=operations))
        await self.call.done_writing()

    def answered(self, message: int) -> None:
        """One operation of `message` has its outcome."""
        left = self.unanswered[message] - 1
        if left:
            self.unanswered[message] = left
        else:
            del self.unanswered[message]
            self.in_flight -= 1
            self.window_open.set()


async def run_lanes(
    lanes: Sequence[Lane[Any]],
    drained: asyncio.Event,
    send: Callable[[Lane[Any]], Coroutine[Any, Any, None]],
    receive: Callable[[Lane[Any]], Coroutine[Any, Any, None]],
) -> None:
    """Run every lane's sender and receiver until `drained` is set; a stream that ends
    before that is an error, raised with its cause."""
    tasks = [asyncio.create_task(send(lane)) for lane in lanes]
    tasks += [asyncio.create_task(receive(lane)) for lane in lanes]
    waiting = asyncio.create_task(drained.wait())
    await asyncio.wait([waiting, *tasks], return_when=asyncio.FIRST_COMPLETED)
    if not waiting.done():  # a stream ended early: say why
        waiting.cancel()
        for task in tasks:
            if task.done():
                task.result()
        raise RuntimeError("a Control stream ended before the workload drained")
    for lane in lanes:
        lane.wake.set()
    await asyncio.gather(*tasks)
