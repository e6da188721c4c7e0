"""callcredit-kamailio: the adapter between Kamailio and callcredit, as a process.

    callcredit-kamailio --target 127.0.0.1:50051 --events 127.0.0.1:8448 \\
        --rpc 127.0.0.1:8090 [--token TOKEN] [--tls] [--ca-file PEM]
        [--cert-file PEM --key-file PEM] [--reserve-timeout 2.0]

--events and --rpc are Kamailio's CC_EVENTS and CC_RPC (integrations/kamailio/
kamailio.cfg). Every option also reads a CALLCREDIT_ variable (CALLCREDIT_TARGET,
CALLCREDIT_TOKEN, ...); prefer CALLCREDIT_TOKEN to --token, which shows in process lists.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Sequence

from callcredit.dialer import DialerClient
from callcredit_server import logs
from callcredit_server.kamailio.adapter import Adapter, RpcClient

DEFAULT_RESERVE_TIMEOUT_SECONDS = 2.0
"""How long an INVITE waits for callcredit's answer before 503 (kamailio.cfg's own
backstop, CC_WAIT_MS, is 3 s: keep this below it)."""

MAX_RESERVE_TIMEOUT_SECONDS = 30.0


def _address(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65_536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="callcredit-kamailio",
        description="Enforce callcredit's grants on the calls through a Kamailio proxy.",
    )
    parser.add_argument(
        "--target",
        default=env("CALLCREDIT_TARGET", "127.0.0.1:50051"),
        help="callcredit server HOST:PORT, or HOST:PORT,HOST:PORT,... for a primary and its "
        "hot standbys (env CALLCREDIT_TARGET; default %(default)s)",
    )
    parser.add_argument(
        "--events",
        type=_address,
        default=env("CALLCREDIT_KAMAILIO_EVENTS", "127.0.0.1:8448"),
        help="Kamailio's evapi HOST:PORT, CC_EVENTS (default %(default)s)",
    )
    parser.add_argument(
        "--rpc",
        type=_address,
        default=env("CALLCREDIT_KAMAILIO_RPC", "127.0.0.1:8090"),
        help="Kamailio's JSON-RPC UDP HOST:PORT, CC_RPC (default %(default)s)",
    )
    parser.add_argument(
        "--token",
        default=env("CALLCREDIT_TOKEN"),
        help="dialer bearer token (prefer the variable CALLCREDIT_TOKEN)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        default=env("CALLCREDIT_TLS", "") not in ("", "0", "false"),
        help="use TLS with the system's CAs (env CALLCREDIT_TLS)",
    )
    parser.add_argument("--ca-file", default=env("CALLCREDIT_CA_FILE"), help="PEM CA (TLS)")
    parser.add_argument(
        "--cert-file", default=env("CALLCREDIT_CERT_FILE"), help="PEM client certificate"
    )
    parser.add_argument("--key-file", default=env("CALLCREDIT_KEY_FILE"), help="PEM key")
    parser.add_argument(
        "--reserve-timeout",
        type=float,
        default=DEFAULT_RESERVE_TIMEOUT_SECONDS,
        help="seconds an INVITE waits for callcredit before 503 (default %(default)s)",
    )
    parser.add_argument(
        "--requested-seconds",
        type=int,
        default=0,
        help="seconds asked per grant; 0 = the server's grant size (default %(default)s)",
    )
    parser.add_argument("--log-level", default=env("CALLCREDIT_LOG_LEVEL", "INFO"))
    parser.add_argument("--log-format", default="text", choices=("text", "json"))
    args = parser.parse_args(argv)
    if not 0 < args.reserve_timeout <= MAX_RESERVE_TIMEOUT_SECONDS:
        parser.error(f"--reserve-timeout must be within 0-{MAX_RESERVE_TIMEOUT_SECONDS}")
    if not 0 <= args.requested_seconds <= 86_400:
        parser.error("--requested-seconds must be within 0-86400")
    if isinstance(args.events, str):
        args.events = _address(args.events)
    if isinstance(args.rpc, str):
        args.rpc = _address(args.rpc)
    return args


async def run(args: argparse.Namespace) -> None:
    rpc = await RpcClient.open(*args.rpc)
    try:
        async with DialerClient(
            args.target,
            token=args.token,
            tls=args.tls,
            ca_file=args.ca_file,
            cert_file=args.cert_file,
            key_file=args.key_file,
        ) as dialer:
            adapter = Adapter(
                dialer,
                rpc,
                args.events,
                reserve_timeout_seconds=args.reserve_timeout,
                requested_seconds=args.requested_seconds,
            )
            logging.getLogger(__name__).info(
                "callcredit-kamailio: callcredit %s, kamailio events %s:%d, rpc %s:%d",
                args.target,
                *args.events,
                *args.rpc,
            )
            await adapter.run()
    finally:
        rpc.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (callcredit-kamailio)."""
    args = parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    return 0
