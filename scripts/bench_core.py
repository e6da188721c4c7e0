"""Operations per second of the pure state machine (`StateMachine.apply`), no I/O.

Mixes (commands are built before the clock starts; only `apply` is timed):

- calls-1k, calls-10k: call lifecycles (Reserve, two Renews, Release) spread over
  1,000 / 10,000 accounts, `--in-flight` calls open at once, on a tariff of
  `--rates` prefixes; each op is one command;
- calls-hot: the same lifecycle, every call on one account;
- create-accounts: CreateAccount for `--create` accounts (what a start builds);
- from-image: `StateMachine.from_image` of `--create` accounts with an open call on
  every tenth, through orjson as a snapshot is (accounts restored per second).

Each mix runs `--repeat` times in a fresh machine; the best and the median are
printed. To compare two versions of the core side by side in one run, extract the
old package somewhere and name its parent directory with `--compare`; each
repetition then runs the old and the new version alternately, in child processes:

    git archive HEAD~3 server/callcredit_server | tar -x -C /tmp/old
    python scripts/bench_core.py --compare /tmp/old/server

`--writer` runs the machine as the server's writer does: events off (no events, no
call records), and the cyclic collector set as a server sets it
(recovery.settle_heap); without it, events are on, as the projector runs it. To count
instructions rather than time them (a noisy machine), run one mix once in this
process under cachegrind, then the same with `--build-only` (everything built,
nothing applied), and divide the difference by the operations:

    PYTHONHASHSEED=0 valgrind --tool=cachegrind --cache-sim=no \
        python scripts/bench_core.py --one calls-hot --calls 20000 --in-flight 500 --writer
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import orjson

from callcredit_server.core import (
    Command,
    CreateAccount,
    PutTariff,
    Rate,
    Release,
    Renew,
    Reserve,
    StateMachine,
    Tariff,
    TopUp,
)

START_MS = 1_790_000_000_000
VALIDITY_SECONDS = 120
GRANT_SECONDS = 60
OPS_PER_MS = 100  # the clock moves 1 ms every this many commands: no call expires


def _tariff(rates: int) -> Tariff:
    """A default rate and `rates - 1` country/operator prefixes, as a real tariff has."""
    out = [Rate("", 1_179_600_000, 6, 6, 0)]
    for n in range(1, rates):
        prefix = str(840 + n)[: 2 + n % 4] + str(n)
        out.append(Rate(prefix, 600_000_000 + n * 1_000, 1 if n % 2 else 6, 1 if n % 2 else 6, 0))
    unique = {r.prefix: r for r in out}
    return Tariff("t", "VND", tuple(unique.values()))


def _setup(accounts: int, rates: int, events: bool = True) -> tuple[StateMachine, int]:
    machine = StateMachine(events=events)
    now_ms = START_MS
    machine.apply(PutTariff(_tariff(rates)), now_ms)
    for n in range(accounts):
        machine.apply(CreateAccount(f"acc-{n}", "VND", "t", 0, 0), now_ms)
        machine.apply(TopUp(f"acc-{n}", 10**13, "seed", "initial"), now_ms)
    return machine, now_ms


def _call_commands(calls: int, accounts: int, in_flight: int) -> list[Command]:
    """Lifecycles in waves of `in_flight` calls: reserve all, renew all twice, release all."""
    out: list[Command] = []
    for wave in range(0, calls, in_flight):
        ids = [f"call-{n}" for n in range(wave, min(wave + in_flight, calls))]
        for n, call_id in enumerate(ids, wave):
            out.append(
                Reserve(
                    call_id,
                    f"acc-{n * 7919 % accounts}",
                    f"+84{n % 1000:03d}{n:07d}"[:13],
                    0,
                    GRANT_SECONDS,
                    VALIDITY_SECONDS,
                )
            )
        for sequence, used in ((1, 25), (2, 55)):
            for call_id in ids:
                out.append(Renew(call_id, sequence, used, 0, GRANT_SECONDS, VALIDITY_SECONDS))
        for n, call_id in enumerate(ids):
            out.append(Release(call_id, 70 + n % 40))
    return out


def _time_apply(machine: StateMachine, commands: list[Command], now_ms: int) -> float:
    apply = machine.apply
    gc.collect()
    started = time.perf_counter()
    for start in range(0, len(commands), OPS_PER_MS):
        now_ms += 1
        for command in commands[start : start + OPS_PER_MS]:
            apply(command, now_ms)
    return time.perf_counter() - started


def mix_calls(
    accounts: int, calls: int, in_flight: int, rates: int, writer: bool, build_only: bool
) -> float:
    machine, now_ms = _setup(accounts, rates, events=not writer)
    commands = _call_commands(calls, accounts, in_flight)
    if writer:
        from callcredit_server.recovery import settle_heap  # sqlalchemy and all: only here

        settle_heap()
    if build_only:
        return 0.0
    return len(commands) / _time_apply(machine, commands, now_ms)


def mix_create(count: int) -> float:
    machine = StateMachine()
    machine.apply(PutTariff(_tariff(1)), START_MS)
    commands: list[Command] = [CreateAccount(f"acc-{n}", "VND", "t", 0, 0) for n in range(count)]
    return len(commands) / _time_apply(machine, commands, START_MS)


def mix_from_image(count: int) -> float:
    machine, now_ms = _setup(0, 10)
    for n in range(count):
        machine.apply(CreateAccount(f"acc-{n}", "VND", "t", 0, 0), now_ms)
    for n in range(0, count, 10):
        machine.apply(TopUp(f"acc-{n}", 10**9, "seed", ""), now_ms)
        machine.apply(Reserve(f"call-{n}", f"acc-{n}", "84901234567", 0, 60, 86_400), now_ms)
    data = orjson.dumps(machine.image())
    del machine
    image = orjson.loads(data)
    gc.collect()
    started = time.perf_counter()
    StateMachine.from_image(image)
    return count / (time.perf_counter() - started)


def _mixes(args: argparse.Namespace) -> dict[str, Callable[[], float]]:
    calls, in_flight, rates = args.calls, args.in_flight, args.rates
    writer, build_only = args.writer, args.build_only
    return {
        "calls-1k": lambda: mix_calls(1_000, calls, in_flight, rates, writer, build_only),
        "calls-10k": lambda: mix_calls(10_000, calls, in_flight, rates, writer, build_only),
        "calls-hot": lambda: mix_calls(1, calls, in_flight, rates, writer, build_only),
        "create-accounts": lambda: mix_create(args.create),
        "from-image": lambda: mix_from_image(args.create),
    }


def _run_one(args: argparse.Namespace) -> None:
    """Child mode: one run of one mix, its ops/s as JSON on stdout."""
    print(json.dumps({"ops_per_second": _mixes(args)[args.one]()}))


def _child(args: argparse.Namespace, mix: str, path: str | None) -> float:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    argv = [sys.executable, __file__, "--one", mix, *_shared_argv(args)]
    done = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
    ops: float = json.loads(done.stdout.splitlines()[-1])["ops_per_second"]
    return ops


def _shared_argv(args: argparse.Namespace) -> list[str]:
    return [
        f"--calls={args.calls}",
        f"--in-flight={args.in_flight}",
        f"--rates={args.rates}",
        f"--create={args.create}",
        *(["--writer"] if args.writer else []),
    ]


def _summary(values: list[float]) -> str:
    return f"best {max(values):>10,.0f}  median {statistics.median(values):>10,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50_000, help="call lifecycles per mix")
    parser.add_argument("--in-flight", type=int, default=5_000, help="calls open at once")
    parser.add_argument("--rates", type=int, default=200, help="prefixes in the tariff")
    parser.add_argument("--create", type=int, default=200_000, help="accounts to build")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--mix", action="append", help="only these mixes (repeatable)")
    parser.add_argument("--compare", metavar="DIR", help="parent dir of an old callcredit_server")
    parser.add_argument(
        "--writer", action="store_true", help="events off and the server's collector settings"
    )
    parser.add_argument("--one", metavar="MIX", help="run MIX once here, print its ops/s as JSON")
    parser.add_argument(
        "--build-only", action="store_true", help="with --one calls-*: build, apply nothing"
    )
    args = parser.parse_args()
    if args.one:
        _run_one(args)
        return
    names = args.mix or list(_mixes(args))
    print(
        f"ops/s of StateMachine.apply; {args.calls:,} lifecycles x 4 commands, "
        f"{args.in_flight:,} in flight, {args.rates} rates; {args.create:,} accounts built"
    )
    for mix in names:
        if args.compare is None:
            results: dict[str, list[float]] = {"new": []}
        else:
            results = {"old": [], "new": []}
        for _ in range(args.repeat):
            for version in results:
                path = args.compare if version == "old" else None
                results[version].append(_child(args, mix, path))
        for version, values in results.items():
            print(f"{mix:<16} {version:<4} {_summary(values)}", flush=True)
        if args.compare is not None:
            ratio = statistics.median(results["new"]) / statistics.median(results["old"])
            print(f"{mix:<16} x{ratio:.2f} (median new / median old)", flush=True)


if __name__ == "__main__":
    main()
