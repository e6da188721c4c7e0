"""Who may write the journal: the leadership lease of a hot standby, as decisions only.

Sans-IO: no SQL, sockets, threads or clock. The shell (standby.py) reads the lease
row, tells `Lease` what it saw and when, and runs the statement `Lease` decides on;
time is an argument, in milliseconds of the server's MONOTONIC clock.

Two clocks, each used where it is safe (docs/operations.md, "Hot standby"):

- The lease row's `expires_at` is set and compared on the DATABASE's clock
  (`now()`): every server that might take over judges expiry by one clock, so
  clock skew between machines cannot make two of them think the lease is free.
- The primary judges how long it may still SERVE on its own monotonic clock,
  conservatively: a renewal that succeeded counts from the moment it was SENT,
  which is no later than the database's `now()` that set `expires_at`, minus a
  margin for clock rate drift. So the primary stops answering before any standby
  can take the lease, whatever the network delay of the renewal.

Commits never rely on either clock: each one checks the epoch in its own
transaction (journal.py), so a primary that was paused past its lease commits
nothing after a takeover, whatever it believes about time.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "MAX_LEASE_MS",
    "MIN_LEASE_MS",
    "Action",
    "Lease",
    "LeaseRow",
    "LeaseSettings",
    "Role",
]

MIN_LEASE_MS = 1_000  # shorter, and a busy event loop or a slow commit loses it
MAX_LEASE_MS = 60_000  # longer, and an outage lasts a minute before a takeover
MIN_RENEWALS_PER_LEASE = 2  # a lease outlives at least one failed renewal
# Clock rate drift allowance: quartz is good to ~100 ppm; 1% is generous, plus a
# floor of 100 ms for scheduling jitter between the clock read and the send.
DRIFT_PER_MS = 0.01
MIN_MARGIN_MS = 100
EXPIRY_SLACK_MS = 10  # a standby looks again this long after the lease should expire


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    """--lease-seconds and --lease-renew-seconds, in milliseconds."""

    lease_ms: int
    renew_ms: int

    def problems(self) -> list[str]:
        out = []
        if not MIN_LEASE_MS <= self.lease_ms <= MAX_LEASE_MS:
            out.append(
                f"--lease-seconds must be between {MIN_LEASE_MS / 1000:g} "
                f"and {MAX_LEASE_MS / 1000:g}"
            )
        if not 0 < self.renew_ms * MIN_RENEWALS_PER_LEASE <= self.lease_ms:
            out.append(
                f"--lease-renew-seconds must be above 0 and at most "
                f"1/{MIN_RENEWALS_PER_LEASE} of --lease-seconds"
            )
        return out

    @property
    def margin_ms(self) -> int:
        """How much earlier than the database the primary considers its lease over."""
        return max(MIN_MARGIN_MS, int(self.lease_ms * DRIFT_PER_MS))


@dataclass(frozen=True, slots=True)
class LeaseRow:
    """The lease row as read, with its remaining time on the database's clock."""

    owner: str
    epoch: int
    advertise: str
    remaining_ms: int  # expires_at - now(); zero or less: expired, anyone may take it


class Role(enum.Enum):
    STANDBY = "STANDBY"  # tails the journal, answers NOT_PRIMARY, may take over
    PRIMARY = "PRIMARY"  # holds the lease: serves, renews
    DEPOSED = "DEPOSED"  # was primary and lost the lease: answers nothing, ever


class Action(enum.Enum):
    WAIT = "WAIT"  # nothing to do before the next poll
    TAKE = "TAKE"  # the lease is free or expired: end its owner's sessions, then take it
    RENEW = "RENEW"  # extend our own lease
    STEP_DOWN = "STEP_DOWN"  # the lease is gone (expired by our clock, or taken): stop


class Lease:
    """One server's view of the lease, and what it must do next.

    STANDBY --observe(expired)--> TAKE --taken()--> PRIMARY --due()--> RENEW ...
    PRIMARY --(not renewed in time, renewal refused, or another epoch seen)--> DEPOSED.
    DEPOSED is final: memory may be ahead of the journal, so the process must be
    restarted (it then comes back as a standby, from the journal).
    """

    def __init__(self, settings: LeaseSettings, owner: str) -> None:
        problems = settings.problems()
        if problems:
            raise ValueError("; ".join(problems))
        self.settings = settings
        self.owner = owner
        self.role = Role.STANDBY
        self.epoch = 0  # ours once PRIMARY; the last seen while STANDBY
        self.primary = ""  # the advertised address of the primary, when known
        self._valid_until_ms = 0  # PRIMARY: serve only before this (our clock)
        self._renew_at_ms = 0  # PRIMARY: the next renewal is due at this time

    # ---------------------------------------------------------------- standby

    def observe(self, row: LeaseRow | None, now_ms: int) -> Action:
        """The lease row was read at `now_ms`: take it, step down, or wait."""
        del now_ms  # expiry is the database's judgement (row.remaining_ms)
        if self.role is Role.DEPOSED:
            return Action.WAIT
        if self.role is Role.PRIMARY:
            if row is None or row.epoch != self.epoch or row.owner != self.owner:
                return self._depose()
            return Action.WAIT
        if row is None:
            self.epoch, self.primary = 0, ""
            return Action.TAKE
        self.epoch = row.epoch
        if row.remaining_ms <= 0:
            self.primary = ""
            return Action.TAKE
        self.primary = row.advertise
        return Action.WAIT

    def standby_wait_ms(self, row: LeaseRow | None) -> int:
        """How long a standby waits before it looks at the lease again: the renew
        interval, or less when the lease is about to expire."""
        remaining_ms = 0 if row is None else max(row.remaining_ms, 0)
        return min(self.settings.renew_ms, remaining_ms + EXPIRY_SLACK_MS)

    def next_epoch(self) -> int:
        """The epoch a takeover writes: one above the last seen (0 before the first)."""
        return self.epoch + 1

    def taken(self, epoch: int, sent_at_ms: int, advertise: str) -> None:
        """The take statement, sent at `sent_at_ms`, made us primary at `epoch`."""
        if self.role is not Role.STANDBY or epoch != self.epoch + 1:
            raise ValueError(f"taken epoch {epoch} as {self.role.value} at {self.epoch}")
        self.role = Role.PRIMARY
        self.epoch = epoch
        self.primary = advertise
        self._extend(sent_at_ms)

    # ---------------------------------------------------------------- primary

    def due(self, now_ms: int) -> Action:
        """What the primary must do at `now_ms`."""
        if self.role is not Role.PRIMARY:
            return Action.WAIT
        if now_ms >= self._valid_until_ms:
            return self._depose()
        if now_ms >= self._renew_at_ms:
            return Action.RENEW
        return Action.WAIT

    def renewed(self, ok: bool, sent_at_ms: int) -> Action:
        """A renewal sent at `sent_at_ms` came back: extended (ok) or refused (not ours)."""
        if self.role is not Role.PRIMARY:
            return Action.WAIT
        if not ok:
            return self._depose()
        self._extend(sent_at_ms)
        return Action.WAIT

    def renewal_failed(self, now_ms: int) -> Action:
        """A renewal could not reach the database: retry, until the lease runs out."""
        if self.role is not Role.PRIMARY:
            return Action.WAIT
        self._renew_at_ms = now_ms  # the next poll retries
        return self.due(now_ms)

    def resign(self) -> None:
        """Stop being primary (a clean stop, or the writer failed): DEPOSED, for good."""
        self._depose()

    def serving(self, now_ms: int) -> bool:
        """May this server answer at `now_ms`?"""
        return self.role is Role.PRIMARY and now_ms < self._valid_until_ms

    def valid_for_ms(self, now_ms: int) -> int:
        """How long the primary may still serve without a renewal (0 if not primary)."""
        if self.role is not Role.PRIMARY:
            return 0
        return max(self._valid_until_ms - now_ms, 0)

    # ---------------------------------------------------------------- internal

    def _extend(self, sent_at_ms: int) -> None:
        settings = self.settings
        self._valid_until_ms = sent_at_ms + settings.lease_ms - settings.margin_ms
        self._renew_at_ms = sent_at_ms + settings.renew_ms

    def _depose(self) -> Action:
        self.role = Role.DEPOSED
        self.primary = ""
        return Action.STEP_DOWN
