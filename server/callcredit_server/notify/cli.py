"""``callcredit-notify``: POST the changefeed's events to webhooks (docs/operations.md).

    callcredit-notify --config notify.toml run            # follow and deliver
    callcredit-notify --config notify.toml dead-letters   # what could not be delivered
    callcredit-notify --config notify.toml requeue EVENT_ID ENDPOINT

The server token is read from the environment variable the file names (``token_env``,
CALLCREDIT_TOKEN by default), never from the file. Exit status: 0, 1 for a refused
command, 2 for a bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import sys
from collections.abc import Sequence

from callcredit_server.clock import wall_clock_ms
from callcredit_server.notify.config import ConfigError, NotifyConfig, load
from callcredit_server.notify.runner import Notifier
from callcredit_server.notify.store import Store

MAX_LISTED = 1_000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="callcredit-notify", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the TOML configuration file")
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="follow the changefeed and deliver its events")
    listing = commands.add_parser("dead-letters", help="list deliveries that gave up")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    requeue = commands.add_parser("requeue", help="try a dead letter again from attempt 1")
    requeue.add_argument("event_id")
    requeue.add_argument("endpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "run":
        return _run(config)
    store = Store(config.state)
    try:
        if args.command == "dead-letters":
            for dead in store.dead_letters(min(max(args.limit, 1), MAX_LISTED)):
                if args.json:
                    row = {
                        "event_id": dead.event_id,
                        "endpoint": dead.endpoint,
                        "attempts": dead.attempts,
                        "last_error": dead.last_error,
                        "dead_at_ms": dead.dead_at_ms,
                        "body": json.loads(dead.body),
                    }
                    print(json.dumps(row, sort_keys=True))
                else:
                    print(
                        f"{dead.event_id}\t{dead.endpoint}\t{dead.attempts} attempts\t"
                        f"{dead.last_error}"
                    )
            return 0
        if not store.requeue(args.event_id, args.endpoint, wall_clock_ms()):
            print(f"error: no dead letter {args.event_id} for {args.endpoint}", file=sys.stderr)
            return 1
        return 0
    finally:
        store.close()


def _run(config: NotifyConfig) -> int:
    lock_path = config.state.with_name(config.state.name + ".lock")
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"error: another callcredit-notify uses {config.state}", file=sys.stderr)
            return 1
        store = Store(config.state)
        try:
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(Notifier(config, store).run())
        finally:
            store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
