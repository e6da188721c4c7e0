"""A long crash campaign: SIGKILL the server many times under real client processes.

The same harness as tests/crash/test_kill9.py, for as long as you like. Prints a
summary (kills, operations acknowledged, retried, checks passed, violations)
and exits 1 if anything acknowledged was lost or doubled, anything
unacknowledged was half-applied, or the money does not add up. Usage:

    python scripts/crash_loop.py --kills 200 [--database-url URL] [--clients 3]
        [--call-workers 3] [--seed N] [--workdir DIR]

Without --database-url the journal is a SQLite file in the work directory. A
PostgreSQL URL gets a fresh schema of its own (dropped afterwards unless --keep),
as the tests do; --reuse-database runs in the database as given (every id is
prefixed with a run tag, so runs do not collide).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import uuid
from pathlib import Path

import sqlalchemy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tests` from a checkout

from callcredit_server.journal import engine_url
from tests.crash.harness import CampaignConfig, CampaignReport, run_campaign


def _fresh_schema(url: str) -> tuple[str, str]:
    """A new PostgreSQL schema; the URL that uses it and the schema's name."""
    schema = f"cc_crash_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(engine_url(url))
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    finally:
        engine.dispose()
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}", schema


def _drop_schema(url: str, schema: str) -> None:
    engine = sqlalchemy.create_engine(engine_url(url))
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        engine.dispose()


def verdict(report: CampaignReport, workdir: Path) -> int:
    """A campaign's last line and exit code: 1 on any violation."""
    if report.violations:
        print(f"FAILED: {len(report.violations)} violations (logs in {workdir})")
        return 1
    print("OK: every check passed")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=200, help="SIGKILLs under load")
    parser.add_argument("--database-url", default="", help="journal (default: SQLite file)")
    parser.add_argument("--clients", type=int, default=3, help="client processes")
    parser.add_argument("--call-workers", type=int, default=3, help="calls at once per client")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="logs (default: a temp dir)")
    parser.add_argument("--min-kill-after", type=float, default=0.3)
    parser.add_argument("--max-kill-after", type=float, default=1.5)
    parser.add_argument("--validity-seconds", type=int, default=6)
    parser.add_argument("--reuse-database", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the PostgreSQL schema")
    args = parser.parse_args()

    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="callcredit-crash-"))
    url, schema = args.database_url, ""
    if not url:
        url = f"sqlite:///{workdir / 'journal.db'}"
    elif engine_url(url).get_backend_name() == "postgresql" and not args.reuse_database:
        url, schema = _fresh_schema(url)
    config = CampaignConfig(
        database_url=url,
        workdir=workdir,
        kills=args.kills,
        clients=args.clients,
        call_workers=args.call_workers,
        seed=seed,
        kill_after_seconds=(args.min_kill_after, args.max_kill_after),
        validity_seconds=args.validity_seconds,
        tag=f"r{uuid.uuid4().hex[:8]}",
    )
    print(f"crash loop: {args.kills} kills, seed {seed}, workdir {workdir}", flush=True)
    try:
        report = run_campaign(config, progress=lambda line: print(line, flush=True))
    finally:
        if schema and not args.keep:
            _drop_schema(args.database_url, schema)
    print(report.summary(max_violations=100))
    return verdict(report, workdir)


if __name__ == "__main__":
    sys.exit(main())
