"""Throughput of the Control stream: operations per second, one per message vs batched.

Starts `callcredit-server` as a separate process on a fresh SQLite journal (full
sync, ack after commit: the default), then drives reserve+release pairs over
several Control streams, each keeping a window of messages in flight. Prints one
line per variant and the ratio. Usage:

    python scripts/bench_control.py [--seconds 10] [--streams 4] [--batch 100]
        [--database-url URL] [--security plain|secure|both]

--security secure serves TLS (a throwaway CA made with trustme) and bearer tokens
(admin for the setup, a dialer token scoped to the benchmark's accounts), the way
docs/operations.md deploys; both runs plain then secure, each on a fresh server and
journal, and prints them side by side with the secure/plain ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from callcredit.v1 import admin_pb2, admin_pb2_grpc, credit_control_pb2, credit_control_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from callcredit_server.auth import hash_token, new_token
from callcredit_server.launch import serving
from loadtest.baselines.procs import process_cpu_seconds
from tests.service.processes import server_process

WINDOW_MESSAGES = 8  # messages in flight per stream


@dataclass(frozen=True)
class Security:
    """How the benchmark reaches a secured server: TLS with this CA, these tokens."""

    ca_file: Path
    admin_token: str
    dialer_token: str


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


@contextmanager
def _secure_server(folder: Path, url: str) -> Iterator[tuple[str, Security, int]]:
    """`callcredit-server` with TLS and tokens; yields its target, how to reach it, and its pid."""
    import trustme  # a test dependency: only --security secure|both needs it

    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    files = {"ca": ca.cert_pem, "cert": leaf.cert_chain_pems[0], "key": leaf.private_key_pem}
    for name, blob in files.items():
        blob.write_to_path(str(folder / f"{name}.pem"))
    security = Security(folder / "ca.pem", new_token(), new_token())
    config = folder / "callcredit.toml"
    config.write_text(
        f'tls_cert = "{folder / "cert.pem"}"\ntls_key = "{folder / "key.pem"}"\n'
        '[tenants.bench]\naccount_prefix = "a"\n'
        f'[[tokens]]\nname = "admin"\nrole = "admin"\nhash = "{hash_token(security.admin_token)}"\n'
        f'[[tokens]]\nname = "dialer"\nrole = "dialer"\ntenant = "bench"\n'
        f'hash = "{hash_token(security.dialer_token)}"\n'
    )
    args = ["--config", str(config), "--listen", "127.0.0.1:0", "--database-url", url,
            "--log-level", "WARNING"]  # fmt: skip
    with serving(args, folder / "server.log") as server:
        yield f"localhost:{server.port}", security, server.pid


def _channel(target: str, security: Security | None) -> grpc.aio.Channel:
    if security is None:
        return grpc.aio.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(security.ca_file.read_bytes())
    return grpc.aio.secure_channel(target, credentials)


@dataclass
class Result:
    name: str
    operations: int
    messages: int
    seconds: float
    server_cpu_seconds: float | None = None  # the server process's user + system CPU time

    def line(self) -> str:
        cpu = ""
        if self.server_cpu_seconds is not None:
            cpu = (
                f"  server CPU {self.server_cpu_seconds / self.operations * 1e6:,.1f} us/op, "
                f"{self.server_cpu_seconds / self.messages * 1e6:,.0f} us/msg"
            )
        return (
            f"{self.name:<38} {self.operations / self.seconds:>10,.0f} ops/s "
            f"{self.messages / self.seconds:>9,.0f} msgs/s  ({self.operations:,} ops in "
            f"{self.seconds:.1f} s){cpu}"
        )


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of process `pid` (all its threads); None without one.

    CPU time per operation is steadier than throughput on a shared machine: it does
    not count the time the server waited for a core.
    """
    return None if pid is None else process_cpu_seconds([pid])


async def _setup(channel: grpc.aio.Channel, accounts: int, token: str | None = None) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    auth = _metadata(token)
    rate = admin_pb2.Rate(
        prefix="", price_per_minute_micros=1_179_600_000, first_increment_seconds=6,
        next_increment_seconds=6, connect_fee=0,
    )  # fmt: skip
    await admin.PutTariff(
        admin_pb2.PutTariffRequest(
            tariff=admin_pb2.Tariff(tariff_id="t", currency="VND", rates=[rate])
        ),
        metadata=auth,
    )
    for n in range(accounts):
        await admin.CreateAccount(
            admin_pb2.CreateAccountRequest(account_id=f"a{n}", currency="VND", tariff_id="t"),
            metadata=auth,
        )
        await admin.TopUp(
            admin_pb2.TopUpRequest(account_id=f"a{n}", amount=10**15, idempotency_key="bench"),
            metadata=auth,
        )


async def _drive(
    channel: grpc.aio.Channel,
    name: str,
    batch: int,
    streams: int,
    seconds: float,
    accounts: int,
    token: str | None = None,
    server_pid: int | None = None,
) -> Result:
    stub = credit_control_pb2_grpc.CreditControlServiceStub(channel)
    ids = itertools.count()
    counts = {"ops": 0, "msgs": 0, "refused": 0}
    tag = re.sub(r"[^A-Za-z0-9._:@-]", "_", name)  # the name as an id: "tls+token ..." is not
    deadline = time.perf_counter() + seconds

    async def one_stream(k: int) -> None:
        call = stub.Control(metadata=_metadata(token))
        window = asyncio.Semaphore(WINDOW_MESSAGES)
        done = asyncio.Event()

        async def reader() -> None:
            # The server may answer several messages in one response: every
            # message carries `batch` operations, so count answers, not responses.
            answered = 0
            async for response in call:
                counts["ops"] += len(response.outcomes)
                for outcome in response.outcomes:
                    if outcome.HasField("error"):
                        counts["refused"] += 1
                        if counts["refused"] == 1:
                            print(f"{name}: first refusal: {outcome.error.message}")
                answered += len(response.outcomes)
                while answered >= batch:
                    answered -= batch
                    counts["msgs"] += 1
                    window.release()
            done.set()

        task = asyncio.create_task(reader())
        release_next: list[str] = []
        while time.perf_counter() < deadline:
            await window.acquire()
            ops = []
            if release_next:  # release the calls reserved by the previous message
                for call_id in release_next:
                    ops.append(credit_control_pb2.Operation(
                        request_id=f"x{call_id}",
                        release=credit_control_pb2.ReleaseRequest(call_id=call_id, used_seconds=42),
                    ))  # fmt: skip
                release_next = []
            else:
                for _ in range(batch):
                    call_id = f"{tag}-{k}-{next(ids)}"
                    ops.append(credit_control_pb2.Operation(
                        request_id=f"r{call_id}",
                        reserve=credit_control_pb2.ReserveRequest(
                            call_id=call_id, account_id=f"a{next(ids) % accounts}",
                            destination="84901234567", requested_seconds=60,
                        ),
                    ))  # fmt: skip
                    release_next.append(call_id)
            await call.write(credit_control_pb2.ControlRequest(operations=ops))
        await call.done_writing()
        await task

    cpu_before = cpu_seconds(server_pid)
    start = time.perf_counter()
    await asyncio.gather(*(one_stream(k) for k in range(streams)))
    elapsed = time.perf_counter() - start
    cpu_after = cpu_seconds(server_pid)
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    if counts["refused"]:
        print(f"{name}: {counts['refused']:,} of {counts['ops']:,} operations refused")
    return Result(name, counts["ops"], counts["msgs"], elapsed, cpu)


async def _run(
    args: argparse.Namespace,
    target: str,
    security: Security | None = None,
    server_pid: int | None = None,
) -> tuple[Result, Result]:
    admin_token = security.admin_token if security else None
    dialer_token = security.dialer_token if security else None
    label = "tls+token " if security else ""
    async with _channel(target, security) as channel:
        await _setup(channel, args.accounts, admin_token)
        single = await _drive(
            channel, f"{label}one-op-per-message", 1, args.streams, args.seconds, args.accounts,
            dialer_token, server_pid,
        )  # fmt: skip
        batched = await _drive(
            channel, f"{label}batched-{args.batch}-per-message", args.batch, args.streams,
            args.seconds, args.accounts, dialer_token, server_pid,
        )  # fmt: skip
    return single, batched


def _rate(result: Result) -> float:
    return result.operations / result.seconds


def _report(single: Result, batched: Result) -> None:
    print(single.line())
    print(batched.line())
    print(f"batched / single: {_rate(batched) / _rate(single):.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--target", default="", help="a running server instead of a fresh one")
    parser.add_argument(
        "--security",
        choices=("plain", "secure", "both"),
        default="plain",
        help="plaintext without tokens, TLS with tokens, or both side by side",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="run each variant N times, alternating"
    )
    args = parser.parse_args()
    if args.target:
        if args.security != "plain":
            parser.error("--target runs plaintext only; --security needs a fresh server")
        _report(*asyncio.run(_run(args, args.target)))
        return
    if args.security == "both" and args.database_url:
        parser.error("--security both needs a fresh journal per run: leave out --database-url")
    kinds = ("plain", "secure") if args.security == "both" else (args.security,)
    runs: dict[str, list[tuple[Result, Result]]] = {kind: [] for kind in kinds}
    for _ in range(args.repeat):  # alternating, so a noisy neighbour hits both alike
        for kind in kinds:
            with tempfile.TemporaryDirectory() as tmp:
                url = args.database_url or f"sqlite:///{tmp}/bench.db"
                if kind == "plain":
                    with server_process(url) as (process, target):
                        runs[kind].append(asyncio.run(_run(args, target, None, process.pid)))
                else:
                    with _secure_server(Path(tmp), url) as (target, security, pid):
                        runs[kind].append(asyncio.run(_run(args, target, security, pid)))
            _report(*runs[kind][-1])
    if len(runs) == 2:
        print(f"best of {args.repeat}, tls+token / plain throughput:")
        for which, name in ((0, "one op per message"), (1, f"batched {args.batch} per message")):
            best = {kind: max(_rate(run[which]) for run in runs[kind]) for kind in kinds}
            print(
                f"  {name}: {best['secure']:,.0f} / {best['plain']:,.0f} ops/s = "
                f"{best['secure'] / best['plain']:.2f}x"
            )


if __name__ == "__main__":
    main()
