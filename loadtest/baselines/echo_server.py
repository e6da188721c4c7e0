"""The ceiling of Python gRPC here: CreditControlService.Control with no state and no journal.

Each Operation is answered at once with an Outcome of the right shape (a Grant for a
reserve or renew, a ReleaseResponse for a release), its numbers computed from the request
alone by the benchmark's tariff, so a client cannot tell it from callcredit on a
workload that never runs out of money. Same gRPC server options and event loop (uvloop
where installed, `callcredit_server.app.run_loop`) as `callcredit-server`. Run as its
own process:

    python -m loadtest.baselines.echo_server --listen 127.0.0.1:0
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from callcredit.v1 import credit_control_pb2, credit_control_pb2_grpc
from callcredit_server.app import MAX_MESSAGE_BYTES, run_loop
from callcredit_server.launch import write_ready_file
from loadtest.baselines.workload import REQUESTED_SECONDS, billed_seconds, cost

VALIDITY_SECONDS = 120
CANNED_BALANCE = 10**12


class EchoServicer(credit_control_pb2_grpc.CreditControlServiceServicer):
    async def Control(
        self,
        request_iterator: AsyncIterator[credit_control_pb2.ControlRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[credit_control_pb2.ControlResponse]:
        async for request in request_iterator:
            response = credit_control_pb2.ControlResponse()
            for operation in request.operations:
                outcome = response.outcomes.add(request_id=operation.request_id)
                kind = operation.WhichOneof("op")
                if kind == "reserve":
                    reserve = operation.reserve
                    allowed = reserve.requested_seconds or REQUESTED_SECONDS
                    grant = outcome.reserve.grant
                    grant.call_id = reserve.call_id
                elif kind == "renew":
                    renew = operation.renew
                    allowed = renew.used_seconds + (renew.requested_seconds or REQUESTED_SECONDS)
                    grant = outcome.renew.grant
                    grant.call_id = renew.call_id
                else:
                    release = operation.release
                    answer = outcome.release
                    answer.call_id = release.call_id
                    answer.billed_seconds = billed_seconds(release.used_seconds)
                    answer.charged = cost(release.used_seconds)
                    answer.balance = CANNED_BALANCE
                    continue
                grant.allowed_seconds = allowed
                grant.validity_seconds = VALIDITY_SECONDS
                grant.held = cost(allowed)
            yield response

    async def Reserve(
        self,
        request: credit_control_pb2.ReserveRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> credit_control_pb2.ReserveResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the echo server serves Control only")

    async def Renew(
        self,
        request: credit_control_pb2.RenewRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> credit_control_pb2.RenewResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the echo server serves Control only")

    async def Release(
        self,
        request: credit_control_pb2.ReleaseRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> credit_control_pb2.ReleaseResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the echo server serves Control only")


async def _serve(listen: str, ready_file: str) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    credit_control_pb2_grpc.add_CreditControlServiceServicer_to_server(EchoServicer(), server)
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"echo-server listening on port {port}", file=sys.stderr, flush=True)
    if ready_file:
        write_ready_file(Path(ready_file), port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--ready-file", default="", help="as callcredit-server's")
    args = parser.parse_args()
    run_loop("auto", _serve(args.listen, args.ready_file))


if __name__ == "__main__":
    main()
