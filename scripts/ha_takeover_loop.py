"""A long takeover loop: SIGKILL the primary of a hot standby pair many times under load.

The harness of tests/ha/test_takeover.py (the crash campaign against a primary and a
standby, tests/ha/cluster.py), for as many takeovers as you like: client processes
retry every operation across both servers, each SIGKILL of the primary is a takeover by
the standby (the killed server comes back as the next standby), and at the end the
final state is checked against every client's log and `callcredit-server verify`
replays the journal. Prints the campaign's summary and the takeover times (SIGKILL to
the standby serving, p50 and max); exits 1 on any violation. Usage:

    python scripts/ha_takeover_loop.py --takeovers 200 \\
        --database-url postgresql+psycopg://postgres@127.0.0.1/cc [--lease-seconds 2]

The journal gets a fresh schema of its own in that database (dropped afterwards).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tests` from a checkout

from crash_loop import _drop_schema, _fresh_schema, verdict  # scripts/ is sys.path[0]

from tests.ha.cluster import run_ha_campaign, takeover_line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--takeovers", type=int, default=200)
    parser.add_argument("--database-url", required=True, help="a PostgreSQL URL")
    parser.add_argument("--lease-seconds", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=3, help="client processes")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="logs (default: a temp dir)")
    args = parser.parse_args()

    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="callcredit-ha-"))
    url, schema = _fresh_schema(args.database_url)
    print(f"takeover loop: {args.takeovers} takeovers, seed {seed}, workdir {workdir}", flush=True)
    try:
        report, cluster = run_ha_campaign(
            url,
            workdir,
            kills=args.takeovers,
            lease_seconds=args.lease_seconds,
            seed=seed,
            clients=args.clients,
            progress=lambda line: print(line, flush=True),
        )
    finally:
        _drop_schema(args.database_url, schema)
    print(report.summary(max_violations=100))
    print(takeover_line(cluster, args.lease_seconds))
    return verdict(report, workdir)


if __name__ == "__main__":
    sys.exit(main())
