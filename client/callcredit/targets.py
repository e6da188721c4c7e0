"""Which server to try next, when a client is given several (a hot standby setup).

Exactly one of the servers is primary; a standby refuses every RPC ``UNAVAILABLE`` with
reason ``NOT_PRIMARY`` and, when it knows, the primary's advertised address in the
ErrorInfo's ``metadata["primary"]`` (docs/operations.md, "Hot standbys"). ``Failover``
decides, from the answers alone, where a client goes next and how long it waits first:

- a ``NOT_PRIMARY`` whose ``primary`` hint is one of the targets: that one;
- anything else (``UNAVAILABLE``, a disconnect, a hint naming no target): the next
  target in order, round robin;
- the first tour of the targets after a success goes without waiting (a takeover
  leaves the new primary one step away); from then on every step waits a backoff,
  half fixed and half jitter, whose ceiling doubles after each tour up to
  ``backoff_max_seconds``;
- with ``max_attempts``, ``exhausted`` says when the failures have spent them: give up.

No sockets and no clock: the caller does the I/O and the waiting, and passes the
jitter in (a number in [0, 1)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["NOT_PRIMARY", "PRIMARY_KEY", "Failover", "Step", "parse_targets"]

NOT_PRIMARY = "NOT_PRIMARY"
"""The ErrorInfo reason of a standby's refusal."""

PRIMARY_KEY = "primary"
"""The ErrorInfo metadata key of the primary's advertised address."""

MAX_TARGETS = 16
"""Most targets one client takes: a primary and a few standbys, not a fleet."""


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """``"a:1,b:2"`` or ``["a:1", "b:2"]`` as a tuple of addresses (ValueError if none,
    an empty one, a repeated one, or more than MAX_TARGETS)."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    parsed = tuple(item.strip() for item in items)
    if not parsed or any(not item for item in parsed):
        raise ValueError(f"targets must be HOST:PORT[,HOST:PORT...], not {targets!r}")
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"a target is repeated in {targets!r}")
    if len(parsed) > MAX_TARGETS:
        raise ValueError(f"at most {MAX_TARGETS} targets, not {len(parsed)}")
    return parsed


@dataclass(frozen=True, slots=True)
class Step:
    """Try ``target`` next, after ``delay_seconds``."""

    target: str
    delay_seconds: float


class Failover:
    """The target to use now, and where to go when it fails."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        backoff_initial_seconds: float,
        backoff_max_seconds: float,
        max_attempts: int | None = None,
    ) -> None:
        if not targets:
            raise ValueError("a Failover needs at least one target")
        if not 0 < backoff_initial_seconds <= backoff_max_seconds:
            raise ValueError("backoff must be 0 < initial <= max")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.targets = tuple(targets)
        self._initial = backoff_initial_seconds
        self._max = backoff_max_seconds
        self._max_attempts = max_attempts
        self._index = 0
        self._failures = 0  # since the last success
        self._ceiling = backoff_initial_seconds

    @property
    def current(self) -> str:
        """The target to use now."""
        return self.targets[self._index]

    def reset(self) -> None:
        """The current target answered as a primary, or a new request starts: stay,
        and forget the failures."""
        self._failures = 0
        self._ceiling = self._initial

    @property
    def exhausted(self) -> bool:
        """Whether the failures since the last reset have spent max_attempts."""
        return self._max_attempts is not None and self._failures >= self._max_attempts

    def failed(self, *, primary: str = "", jitter: float = 0.0) -> Step:
        """The current target failed (``primary``: a NOT_PRIMARY's hint, else empty):
        where to go next, and after how long."""
        if not 0.0 <= jitter < 1.0:
            raise ValueError("jitter must be in [0, 1)")
        self._failures += 1
        if primary in self.targets and primary != self.current:
            self._index = self.targets.index(primary)
        else:
            self._index = (self._index + 1) % len(self.targets)
        if self._failures < len(self.targets):
            return Step(self.current, 0.0)
        ceiling = self._ceiling
        if self._failures % len(self.targets) == 0:  # a tour ends: wait longer
            self._ceiling = min(ceiling * 2, self._max)
        return Step(self.current, ceiling / 2 + jitter * ceiling / 2)
