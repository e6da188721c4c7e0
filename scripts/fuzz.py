"""Run the hostile-input properties of tests/fuzz much longer than CI does.

    .venv/bin/python scripts/fuzz.py --examples 5000
    .venv/bin/python scripts/fuzz.py --examples 2000 -k Control --seed 7

The properties are the CI ones (tests/fuzz/test_fuzz_rpcs.py); only the number
of examples per property changes (CALLCREDIT_FUZZ_EXAMPLES). The reproducers of
known findings and the limit tests run once: they do not draw examples.
A failure prints the shrunk example and a @reproduce_failure blob to paste.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2_000, help="examples per property")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default random)")
    parser.add_argument("-k", dest="keyword", default="", help="pytest -k expression")
    parser.add_argument("--all", action="store_true", help="also run limits and findings")
    args = parser.parse_args()
    target = "tests/fuzz" if args.all else "tests/fuzz/test_fuzz_rpcs.py"
    command = [sys.executable, "-m", "pytest", target, "-q", "-x", "--timeout=0",
               "-p", "no:cacheprovider", "--hypothesis-show-statistics"]  # fmt: skip
    if args.keyword:
        command += ["-k", args.keyword]
    if args.seed is not None:
        command.append(f"--hypothesis-seed={args.seed}")
    env = {**os.environ, "CALLCREDIT_FUZZ_EXAMPLES": str(args.examples)}
    print(" ".join(command), f"(CALLCREDIT_FUZZ_EXAMPLES={args.examples})", flush=True)
    return subprocess.call(command, cwd=ROOT, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
