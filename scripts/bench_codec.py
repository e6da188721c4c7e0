"""CPU per journal command encoded and decoded (codec.py): what every record costs the
writer's commit thread (encode) and the projector and every start (decode).

The commands are the dialer's lifecycle, as a journal holds it: Reserve, two Renews,
Release, over 10,000 accounts. They, and each one's body, are built before anything is
timed; then `--only` says what runs on them:

    python scripts/bench_codec.py                    # both, timed: best of --repeat
    python scripts/bench_codec.py --only encode --commands 20000 --repeat 1

Timing on a shared machine is noisy. Instructions are not: under valgrind, a run with
`--only none` (the preparation alone) subtracted from one with `--only encode` (or
decode), divided by --commands, is the instructions one command costs:

    valgrind --tool=cachegrind --cache-sim=no python scripts/bench_codec.py \\
        --only encode --commands 20000 --repeat 1       # then --only none, same flags

Another version side by side: the same command with PYTHONPATH naming its server
package's parent folder.
"""

from __future__ import annotations

import argparse
import time

from callcredit_server.codec import decode_command, encode_command
from callcredit_server.core import Command, Release, Renew, Reserve

ACCOUNTS = 10_000


def lifecycles(count: int) -> list[Command]:
    """`count` commands: Reserve, Renew, Renew, Release per call."""
    out: list[Command] = []
    for n in range(count // 4):
        call_id = f"call-{n}"
        out += [
            Reserve(call_id, f"acc-{n % ACCOUNTS}", f"+8490{n:07d}", 0, 60, 120),
            Renew(call_id, 1, 25, 0, 60, 120),
            Renew(call_id, 2, 55, 0, 60, 120),
            Release(call_id, 70 + n % 40),
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=200_000, help="a multiple of 4")
    parser.add_argument("--only", choices=("both", "encode", "decode", "none"), default="both")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    commands = lifecycles(args.commands)
    bodies = [encode_command(command) for command in commands]
    runs: dict[str, list[float]] = {"encode": [], "decode": []}
    for _ in range(args.repeat):
        if args.only in ("both", "encode"):
            started = time.process_time()
            for command in commands:
                encode_command(command)
            runs["encode"].append(time.process_time() - started)
        if args.only in ("both", "decode"):
            started = time.process_time()
            for kind, body in bodies:
                decode_command(kind, body)
            runs["decode"].append(time.process_time() - started)
    for what, seconds in runs.items():
        if seconds:
            print(
                f"{what}: {len(commands):,} commands, best {min(seconds) / len(commands) * 1e6:.2f}"
                f" µs CPU per command of {len(seconds)} runs"
            )


if __name__ == "__main__":
    main()
