"""Run the deterministic simulation (tests/simulation/vopr.py) for any number of seeds.

Each seed prints one line of what it exercised; the first failure prints its seed
and step and exits 1. A failing seed replays exactly:

    python scripts/simulate.py --seed 1234            # one seed
    python scripts/simulate.py --seeds 200 --start 1000 --steps 5000
    python scripts/simulate.py --seeds 50 --real-journal always

`--real-journal auto` (the default) writes a real SQLite journal for the seeds the
test suite does (`uses_real_journal`), so a seed fails here exactly as it did there.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from pathlib import Path

# Run as a file from anywhere: the repository root holds the `tests` package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.simulation.vopr import DEFAULT_STEPS, Simulation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--seed", type=int, help="run this one seed")
    which.add_argument("--seeds", type=int, default=10, help="how many seeds (default 10)")
    parser.add_argument("--start", type=int, default=1, help="the first seed (default 1)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="steps per seed")
    parser.add_argument(
        "--real-journal",
        choices=("auto", "always", "never"),
        default="auto",
        help="also write a real SQLite journal (auto: the seeds the tests choose)",
    )
    parser.add_argument("--traceback", action="store_true", help="print a failure's traceback")
    args = parser.parse_args(argv)
    # Recovery warns when it deletes a snapshot a crash outran: expected here, by the hundred.
    logging.getLogger("callcredit_server").setLevel(logging.ERROR)
    seeds = [args.seed] if args.seed is not None else range(args.start, args.start + args.seeds)
    real = {"auto": None, "always": True, "never": False}[args.real_journal]
    started = time.perf_counter()
    for seed in seeds:
        seed_started = time.perf_counter()
        try:
            summary = Simulation(seed, real_journal=real).run(args.steps)
        except AssertionError as failure:
            if args.traceback:
                traceback.print_exc()
            print(f"FAILED {failure}", flush=True)
            print(
                f"reproduce: python scripts/simulate.py --seed {seed} --steps {args.steps}"
                + ("" if args.real_journal == "auto" else f" --real-journal {args.real_journal}"),
                flush=True,
            )
            return 1
        print(f"{summary.line()} [{time.perf_counter() - seed_started:.1f} s]", flush=True)
    print(f"{len(seeds)} seeds passed in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
