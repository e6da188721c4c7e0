"""The lease and fencing sketch of docs/scaling.md, on PostgreSQL.

Not server code: the statements a sharded deployment would run, shown to do what the
design says. One row per shard in `shard_leases(shard_id, owner, epoch, expires_at)`:

- a server takes a shard with a conditional UPDATE (free or expired lease only), which
  raises the epoch: of two servers racing, exactly one wins;
- every journal commit first reads its shard's lease row `FOR SHARE` in the same
  transaction and goes on only if the epoch is still its own; a server whose epoch is
  stale is refused (it must fail stop) and nothing of its commit is written;
- the share lock orders a takeover after any commit in progress, so the new owner's
  replay, which starts after its takeover committed, sees every record the old owner
  managed to commit, and the old owner commits nothing after it.

Runs only where CALLCREDIT_TEST_POSTGRES_URL is set (CI sets it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy
from sqlalchemy import Connection, Engine, text

from callcredit_server.journal import engine_url
from tests.conftest import postgres_schema_url

LEASE_SECONDS = 10.0

SCHEMA = """
CREATE TABLE shard_leases (
    shard_id   integer PRIMARY KEY,
    owner      text NOT NULL,
    epoch      bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE TABLE journal (
    seq   bigint PRIMARY KEY,
    epoch bigint NOT NULL,
    body  text NOT NULL
);
INSERT INTO shard_leases VALUES (7, '', 0, '-infinity');
"""


class FencedOut(Exception):
    """This server no longer owns the shard: it must stop serving it (fail stop)."""


def take_lease(conn: Connection, shard: int, owner: str) -> int | None:
    """The new epoch if `owner` took the shard (its lease was free or expired), else None."""
    row = conn.execute(
        text(
            "UPDATE shard_leases SET owner = :owner, epoch = epoch + 1, "
            "expires_at = now() + make_interval(secs => :ttl) "
            "WHERE shard_id = :shard AND expires_at < now() RETURNING epoch"
        ),
        {"owner": owner, "ttl": LEASE_SECONDS, "shard": shard},
    ).first()
    return None if row is None else int(row[0])


def renew_lease(conn: Connection, shard: int, owner: str, epoch: int) -> bool:
    """Extend our own lease; False: it is no longer ours (fenced)."""
    result = conn.execute(
        text(
            "UPDATE shard_leases SET expires_at = now() + make_interval(secs => :ttl) "
            "WHERE shard_id = :shard AND owner = :owner AND epoch = :epoch"
        ),
        {"ttl": LEASE_SECONDS, "shard": shard, "owner": owner, "epoch": epoch},
    )
    return result.rowcount == 1


def check_epoch(conn: Connection, shard: int, epoch: int) -> None:
    """Inside a journal commit's transaction: hold the lease row FOR SHARE (a takeover
    waits for this transaction) and refuse if the epoch moved on."""
    current = conn.execute(
        text("SELECT epoch FROM shard_leases WHERE shard_id = :shard FOR SHARE"),
        {"shard": shard},
    ).scalar_one()
    if current != epoch:
        raise FencedOut(f"shard {shard} is at epoch {current}, this writer holds {epoch}")


def commit_records(engine: Engine, shard: int, epoch: int, records: list[tuple[int, str]]) -> None:
    """A group commit, fenced: all of `records` under `epoch`, or FencedOut and none."""
    with engine.begin() as conn:
        check_epoch(conn, shard, epoch)
        conn.execute(
            text("INSERT INTO journal (seq, epoch, body) VALUES (:seq, :epoch, :body)"),
            [{"seq": seq, "epoch": epoch, "body": body} for seq, body in records],
        )


def journal(engine: Engine) -> list[tuple[int, int, str]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT seq, epoch, body FROM journal ORDER BY seq")).all()
    return [(int(r[0]), int(r[1]), str(r[2])) for r in rows]


def expire(engine: Engine, shard: int) -> None:
    """Stand-in for time passing while the owner is dead or cut off."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE shard_leases SET expires_at = now() - interval '1 second' "
                "WHERE shard_id = :shard"
            ),
            {"shard": shard},
        )


@pytest.fixture
def engine() -> Iterator[Engine]:
    with postgres_schema_url("cc_lease", "the PostgreSQL lease sketch is skipped") as url:
        scoped = sqlalchemy.create_engine(engine_url(url), pool_size=4)
        try:
            with scoped.begin() as conn:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(text(statement))
            yield scoped
        finally:
            scoped.dispose()


def test_two_servers_racing_for_a_free_shard_one_wins(engine: Engine) -> None:
    barrier = threading.Barrier(2)
    won: dict[str, int | None] = {}

    def race(owner: str) -> None:
        with engine.begin() as conn:
            barrier.wait()
            won[owner] = take_lease(conn, 7, owner)

    threads = [threading.Thread(target=race, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = {owner: epoch for owner, epoch in won.items() if epoch is not None}
    assert len(winners) == 1, won
    assert list(winners.values()) == [1]
    with engine.begin() as conn:  # a live lease cannot be taken
        loser = "a" if "b" in winners else "b"
        assert take_lease(conn, 7, loser) is None


def test_a_commit_with_a_stale_epoch_is_refused_and_writes_nothing(engine: Engine) -> None:
    with engine.begin() as conn:
        epoch_a = take_lease(conn, 7, "a")
    assert epoch_a == 1
    commit_records(engine, 7, epoch_a, [(1, "a1"), (2, "a2")])

    expire(engine, 7)  # a stops renewing (paused, partitioned from the lease, dead)
    with engine.begin() as conn:
        epoch_b = take_lease(conn, 7, "b")
        assert epoch_b == 2
    # b replays 1..2 (all a committed), then serves with epoch 2.
    assert [seq for seq, _, _ in journal(engine)] == [1, 2]
    commit_records(engine, 7, epoch_b, [(3, "b3")])

    with pytest.raises(FencedOut, match="epoch 2"):
        commit_records(engine, 7, epoch_a, [(4, "a4")])
    with engine.begin() as conn:
        assert not renew_lease(conn, 7, "a", epoch_a)
        assert renew_lease(conn, 7, "b", epoch_b)
    assert journal(engine) == [(1, 1, "a1"), (2, 1, "a2"), (3, 2, "b3")]


def test_a_takeover_waits_for_the_commit_in_progress(engine: Engine) -> None:
    """The old owner is inside a commit when the standby takes over: the takeover waits
    for it, so the standby's replay sees that commit, and the old owner's next commit is
    refused. Nothing acknowledged is lost; nothing is written after the takeover."""
    with engine.begin() as conn:
        epoch_a = take_lease(conn, 7, "a")
    assert epoch_a == 1
    expire(engine, 7)  # a's lease ran out while it was busy: it does not know yet

    taken: dict[str, int | None] = {}
    with engine.begin() as conn_a:
        check_epoch(conn_a, 7, 1)  # a's commit has passed the fence
        conn_a.execute(text("INSERT INTO journal VALUES (1, 1, 'a1')"))

        def take() -> None:
            with engine.begin() as conn_b:
                taken["b"] = take_lease(conn_b, 7, "b")

        standby = threading.Thread(target=take)
        standby.start()
        time.sleep(0.5)
        assert standby.is_alive(), "the takeover must wait for the commit holding the row"
    standby.join(timeout=10)
    assert taken == {"b": 2}
    assert journal(engine) == [(1, 1, "a1")]  # what b replays
    with pytest.raises(FencedOut):
        commit_records(engine, 7, epoch_a, [(2, "a2")])
    assert journal(engine) == [(1, 1, "a1")]


def test_for_key_share_would_not_order_the_takeover(engine: Engine) -> None:
    """Why the fence reads FOR SHARE: FOR KEY SHARE does not conflict with the takeover's
    UPDATE (it leaves the key alone), so a takeover would pass a commit in flight."""
    with engine.begin() as conn:
        assert take_lease(conn, 7, "a") == 1
    expire(engine, 7)
    taken: dict[str, int | None] = {}

    def take() -> None:
        with engine.begin() as conn_b:
            taken["b"] = take_lease(conn_b, 7, "b")

    with engine.begin() as conn_a:
        conn_a.execute(text("SELECT epoch FROM shard_leases WHERE shard_id = 7 FOR KEY SHARE"))
        standby = threading.Thread(target=take)
        standby.start()
        standby.join(timeout=5)
        assert not standby.is_alive(), "FOR KEY SHARE held the takeover back after all"
        assert taken == {"b": 2}
