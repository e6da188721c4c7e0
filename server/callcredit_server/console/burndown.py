"""The burn-down chart's numbers: available funds over the last hour, and the
projection to empty at the current burn rate. Pure: time is an argument.

``History`` keeps, per account, the ``available`` that each changefeed event reported,
keyed by the event's place in the journal (seq, index): the live feed records events
as they come, and a replay of the account's stored events (``merge``) fills in what
happened before the console started, without repeating an event both saw. It is
bounded twice: points per account and accounts kept. ``burndown_chart`` turns those
points, the account as it is now and the server's ``seconds_until_empty`` into the
coordinates of an inline SVG::

    history ────────────┐
    (step line: available holds its value until the next event)
                        └──────┐ now
                                ╲ projection: available falls to 0
                                 ╲ at seconds_until_empty (clipped
                                  ╲ at the chart's right edge)

The line starts at the left edge with the value of the last event before the window
(the account's available then), or, when none is known, at the first event inside it.
Coordinates are integers computed with integer arithmetic: the chart is drawn from
money and never turns money into a float.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

__all__ = [
    "CHART_HEIGHT",
    "CHART_WIDTH",
    "HISTORY_MS",
    "MAX_ACCOUNTS",
    "MAX_POINTS_PER_ACCOUNT",
    "Chart",
    "EventKey",
    "History",
    "Point",
    "burndown_chart",
]

HISTORY_MS = 3_600_000
"""The chart shows at most the last hour, and at most as far ahead as it shows back."""

MAX_POINTS_PER_ACCOUNT = 3_600
"""Points kept per account: one a second for an hour; a busier account keeps the newest."""

MAX_ACCOUNTS = 10_000
"""Accounts whose history is kept; the one changed longest ago is forgotten first."""

CHART_WIDTH = 600
CHART_HEIGHT = 200
"""The SVG's viewBox, in user units; the page scales it to its width."""


@dataclass(frozen=True, slots=True)
class Point:
    """``available`` (minor units) as it stood from ``at_ms`` on."""

    at_ms: int
    available: int


EventKey = tuple[int, int]
"""An event's place in the journal: (seq, index), the changefeed's order."""


class History:
    """Recent ``available`` values of each account, from the changefeed."""

    def __init__(
        self,
        *,
        max_points_per_account: int = MAX_POINTS_PER_ACCOUNT,
        max_accounts: int = MAX_ACCOUNTS,
    ) -> None:
        if max_points_per_account < 1 or max_accounts < 1:
            raise ValueError("a history needs room for one point of one account")
        self._max_points = max_points_per_account
        self._max_accounts = max_accounts
        self._points: OrderedDict[str, deque[tuple[EventKey, Point]]] = OrderedDict()
        self._replayed: set[str] = set()

    def _account(self, account_id: str) -> deque[tuple[EventKey, Point]]:
        points = self._points.get(account_id)
        if points is None:
            points = self._points[account_id] = deque(maxlen=self._max_points)
            if len(self._points) > self._max_accounts:
                forgotten, _ = self._points.popitem(last=False)
                self._replayed.discard(forgotten)
        else:
            self._points.move_to_end(account_id)
        return points

    def record(self, account_id: str, key: EventKey, at_ms: int, available: int) -> None:
        """Note ``available`` at ``at_ms`` after event ``key``. Events arrive in journal
        order: one at or before the newest kept was seen already (by a replay) and is
        skipped; a time older than the newest one's (a clock step back) is moved up to it."""
        points = self._account(account_id)
        if points:
            newest_key, newest = points[-1]
            if key <= newest_key:
                return
            at_ms = max(at_ms, newest.at_ms)
        points.append((key, Point(at_ms, available)))

    def merge(self, account_id: str, replayed: list[tuple[EventKey, Point]]) -> bool:
        """Add the account's ``replayed`` events (read back from the journal), each once
        however many times the live feed saw it too, and note the account as replayed.
        Whether that changed its points (the live feed may have seen them all)."""
        points = self._account(account_id)
        before = list(points)
        merged = dict(points)
        merged.update(replayed)
        points.clear()
        points.extend(sorted(merged.items())[-self._max_points :])
        self._replayed.add(account_id)
        return list(points) != before

    def replayed(self, account_id: str) -> bool:
        """Whether ``merge`` filled in this account's past (and it was not forgotten since)."""
        return account_id in self._replayed

    def points(self, account_id: str, now_ms: int, window_ms: int = HISTORY_MS) -> list[Point]:
        """The points inside the window before ``now_ms``, and the last one before it
        (the value the window starts with), oldest first."""
        points = [point for _, point in self._points.get(account_id, ())]
        start_ms = now_ms - window_ms
        inside = [point for point in points if start_ms <= point.at_ms <= now_ms]
        before = [point for point in points if point.at_ms < start_ms]
        return ([before[-1]] if before else []) + inside

    def __len__(self) -> int:
        return len(self._points)


@dataclass(frozen=True, slots=True)
class Chart:
    """What the template draws. ``history`` and ``projection`` are SVG ``points``
    attributes ("x,y x,y ..."); ``projection`` is empty when nothing burns."""

    history: str
    projection: str
    y_max: int
    """The money the top edge stands for (minor units): the highest value and a tenth."""
    now_x: int
    """Where "now" is: left of it is the past hour, right of it the projection."""
    window_ms: int
    """How far back the left edge is."""
    ahead_ms: int
    """How far ahead the right edge is (at most ``window_ms``)."""
    empty_at_ms: int | None
    """When available reaches 0 at the current burn rate; None when nothing burns."""


def burndown_chart(
    points: list[Point],
    *,
    now_ms: int,
    available: int,
    seconds_until_empty: int | None,
    window_ms: int = HISTORY_MS,
    width: int = CHART_WIDTH,
    height: int = CHART_HEIGHT,
) -> Chart:
    """The chart of ``points`` (from ``History.points``) ending at ``now_ms`` with the
    account's current ``available``, and the projection to empty.

    ``seconds_until_empty`` is the server's (Account.seconds_until_empty: ``available``
    at the open calls' burn rate, rounded down; None when nothing burns). The right
    edge is as far ahead as the projection reaches, at most ``window_ms``; with nothing
    burning it is "now" and the history fills the chart.
    """
    if width < 2 or height < 2 or window_ms < 1:
        raise ValueError("a chart needs a size and a window")
    empty_in_ms = None if seconds_until_empty is None else max(0, seconds_until_empty) * 1000
    ahead_ms = 0 if empty_in_ms is None else min(max(empty_in_ms, 1), window_ms)
    start_ms = now_ms - window_ms
    span_ms = window_ms + ahead_ms
    top = max([max(0, available), *(max(0, point.available) for point in points)])
    y_max = max(1, top + top // 10)  # a tenth of headroom above the highest value

    def x(at_ms: int) -> int:
        return (min(max(at_ms, start_ms), now_ms + ahead_ms) - start_ms) * width // span_ms

    def y(value: int) -> int:
        return height - max(0, value) * height // y_max

    steps: list[tuple[int, int]] = []
    for point in points:
        if steps:
            steps.append((x(point.at_ms), steps[-1][1]))
        steps.append((x(point.at_ms), y(point.available)))
    if steps:
        steps.append((x(now_ms), steps[-1][1]))
    steps.append((x(now_ms), y(available)))
    if not points:
        steps.insert(0, (0, y(available)))

    projection = ""
    empty_at_ms = None
    if empty_in_ms is not None:
        empty_at_ms = now_ms + empty_in_ms
        # Linear from (now, available) to (empty_at, 0), cut at the right edge.
        left_at_edge = available - available * ahead_ms // max(empty_in_ms, 1)
        projection = _svg_points([(x(now_ms), y(available)), (width, y(left_at_edge))])
    return Chart(
        history=_svg_points(_without_repeats(steps)),
        projection=projection,
        y_max=y_max,
        now_x=x(now_ms),
        window_ms=window_ms,
        ahead_ms=ahead_ms,
        empty_at_ms=empty_at_ms,
    )


def _without_repeats(coordinates: list[tuple[int, int]]) -> list[tuple[int, int]]:
    kept: list[tuple[int, int]] = []
    for coordinate in coordinates:
        if not kept or kept[-1] != coordinate:
            kept.append(coordinate)
    return kept


def _svg_points(coordinates: list[tuple[int, int]]) -> str:
    return " ".join(f"{x},{y}" for x, y in coordinates)
