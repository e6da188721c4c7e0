"""The burn-down chart's numbers: history kept, steps drawn, projection to empty."""

from __future__ import annotations

import pytest

from callcredit_server.console.burndown import (
    CHART_HEIGHT,
    CHART_WIDTH,
    HISTORY_MS,
    History,
    Point,
    burndown_chart,
)

NOW_MS = 1_800_000_000_000


def coordinates(points: str) -> list[tuple[int, int]]:
    return [(int(x), int(y)) for x, y in (pair.split(",") for pair in points.split())]


def test_history_keeps_the_window_and_the_value_it_starts_with() -> None:
    history = History()
    history.record("a", (1, 0), NOW_MS - HISTORY_MS - 5_000, 900)
    history.record("a", (2, 0), NOW_MS - HISTORY_MS - 1_000, 800)
    history.record("a", (3, 0), NOW_MS - 60_000, 700)
    history.record("b", (3, 1), NOW_MS - 60_000, 1)
    assert history.points("a", NOW_MS) == [
        Point(NOW_MS - HISTORY_MS - 1_000, 800),
        Point(NOW_MS - 60_000, 700),
    ]
    assert history.points("unknown", NOW_MS) == []


def test_history_is_bounded_per_account_and_in_accounts() -> None:
    history = History(max_points_per_account=3, max_accounts=2)
    for i in range(10):
        history.record("a", (i + 1, 0), NOW_MS + i, i)
    assert [point.available for point in history.points("a", NOW_MS + 10)] == [7, 8, 9]
    history.record("b", (20, 0), NOW_MS, 1)
    history.record("a", (21, 0), NOW_MS + 11, 10)  # a is now the most recently changed
    history.record("c", (22, 0), NOW_MS, 1)  # so b, changed longest ago, goes
    assert len(history) == 2
    assert history.points("b", NOW_MS + 20) == []
    assert history.points("a", NOW_MS + 20)[-1].available == 10


def test_a_point_from_before_the_newest_one_is_placed_at_the_newest_time() -> None:
    history = History()
    history.record("a", (1, 0), NOW_MS, 5)
    history.record("a", (2, 0), NOW_MS - 10_000, 4)  # the server's clock stepped back
    assert history.points("a", NOW_MS) == [Point(NOW_MS, 5), Point(NOW_MS, 4)]


def test_a_replay_fills_in_the_past_and_no_event_counts_twice() -> None:
    history = History()
    # The console started a minute ago and saw two events live.
    history.record("a", (50, 0), NOW_MS - 60_000, 700)
    history.record("a", (51, 2), NOW_MS - 30_000, 600)
    assert not history.replayed("a")
    # The replay of the journal reads from two hours back to its end: the top-up before
    # the window (the value it starts with), a charge inside it, and the first event
    # the live feed saw too.
    replayed = [
        ((7, 0), Point(NOW_MS - HISTORY_MS - 600_000, 1_000)),
        ((30, 1), Point(NOW_MS - 1_800_000, 800)),
        ((50, 0), Point(NOW_MS - 60_000, 700)),
    ]
    assert history.merge("a", replayed)
    assert history.replayed("a") and not history.replayed("b")
    assert not history.merge("a", replayed[1:])  # nothing new: no page needs redrawing
    assert history.points("a", NOW_MS) == [
        Point(NOW_MS - HISTORY_MS - 600_000, 1_000),
        Point(NOW_MS - 1_800_000, 800),
        Point(NOW_MS - 60_000, 700),
        Point(NOW_MS - 30_000, 600),
    ]
    # The live feed, behind the replay, delivers an event the replay read: skipped.
    history.record("a", (51, 2), NOW_MS - 30_000, 600)
    history.record("a", (52, 0), NOW_MS - 1_000, 500)
    assert [point.available for point in history.points("a", NOW_MS)] == [
        1_000,
        800,
        700,
        600,
        500,
    ]


def test_a_replay_keeps_the_newest_points_and_a_forgotten_account_is_replayed_again() -> None:
    history = History(max_points_per_account=2, max_accounts=1)
    history.merge("a", [((i, 0), Point(NOW_MS - 10 + i, i)) for i in range(1, 6)])
    assert history.points("a", NOW_MS) == [Point(NOW_MS - 6, 4), Point(NOW_MS - 5, 5)]
    history.record("b", (9, 0), NOW_MS, 1)  # room for one account: "a" is forgotten
    assert not history.replayed("a") and history.points("a", NOW_MS) == []


def test_a_replayed_chart_starts_at_the_left_edge_with_the_value_before_the_window() -> None:
    history = History()
    history.merge(
        "a",
        [
            ((3, 0), Point(NOW_MS - HISTORY_MS - 60_000, 2_000)),  # topped up before
            ((9, 0), Point(NOW_MS - HISTORY_MS // 2, 1_500)),  # a call's charge
        ],
    )
    chart = burndown_chart(
        history.points("a", NOW_MS), now_ms=NOW_MS, available=1_500, seconds_until_empty=None
    )
    line = coordinates(chart.history)
    # From the left edge at 2,000 (not from 0, not from the first change inside the
    # hour), a step down to 1,500 half an hour ago, flat to now.
    assert line == [
        (0, chart_y(2_000, chart.y_max)),
        (CHART_WIDTH // 2, chart_y(2_000, chart.y_max)),
        (CHART_WIDTH // 2, chart_y(1_500, chart.y_max)),
        (CHART_WIDTH, chart_y(1_500, chart.y_max)),
    ]
    assert chart_y(2_000, chart.y_max) < CHART_HEIGHT


def test_without_history_the_line_is_flat_at_the_current_value_and_nothing_projects() -> None:
    chart = burndown_chart([], now_ms=NOW_MS, available=500, seconds_until_empty=None)
    assert chart.projection == "" and chart.empty_at_ms is None and chart.ahead_ms == 0
    assert chart.now_x == CHART_WIDTH
    line = coordinates(chart.history)
    assert line[0][0] == 0 and line[-1][0] == CHART_WIDTH
    assert len({y for _, y in line}) == 1
    assert 0 < line[0][1] < CHART_HEIGHT  # below the top edge: the chart has headroom


def test_history_is_drawn_as_steps_ending_at_now_with_the_current_value() -> None:
    points = [Point(NOW_MS - HISTORY_MS // 2, 1_000), Point(NOW_MS - HISTORY_MS // 4, 400)]
    chart = burndown_chart(points, now_ms=NOW_MS, available=300, seconds_until_empty=None)
    y = [chart_y(value, chart.y_max) for value in (1_000, 400, 300)]
    # Each change is a vertical step at its time; the value holds until the next one.
    assert coordinates(chart.history) == [
        (CHART_WIDTH // 2, y[0]),
        (CHART_WIDTH * 3 // 4, y[0]),
        (CHART_WIDTH * 3 // 4, y[1]),
        (CHART_WIDTH, y[1]),
        (CHART_WIDTH, y[2]),
    ]
    assert y[0] < y[1] < y[2]  # less money is lower


def chart_y(value: int, y_max: int) -> int:
    return CHART_HEIGHT - value * CHART_HEIGHT // y_max


@pytest.mark.parametrize(
    ("seconds_until_empty", "ahead_ms", "ends_at_zero"),
    [
        pytest.param(600, 600_000, True, id="empty-within-the-hour"),
        pytest.param(3 * 3600, HISTORY_MS, False, id="empty-after-the-hour-is-clipped"),
        pytest.param(0, 1, True, id="empty-now"),
    ],
)
def test_the_projection_runs_from_now_to_empty(
    seconds_until_empty: int, ahead_ms: int, ends_at_zero: bool
) -> None:
    chart = burndown_chart(
        [], now_ms=NOW_MS, available=6_000, seconds_until_empty=seconds_until_empty
    )
    assert chart.ahead_ms == ahead_ms
    assert chart.empty_at_ms == NOW_MS + seconds_until_empty * 1000
    start, end = coordinates(chart.projection)
    assert start == (chart.now_x, chart_y(6_000, chart.y_max))
    assert end[0] == CHART_WIDTH
    assert (end[1] == CHART_HEIGHT) is ends_at_zero
    if not ends_at_zero:  # three hours to empty: a third of it gone at the edge
        assert end[1] == chart_y(6_000 - 6_000 // 3, chart.y_max)
    # Now sits where the past hour ends on the time axis.
    assert chart.now_x == HISTORY_MS * CHART_WIDTH // (HISTORY_MS + ahead_ms)


def test_negative_money_is_drawn_on_the_zero_line() -> None:
    chart = burndown_chart(
        [Point(NOW_MS - 1_000, -50)], now_ms=NOW_MS, available=0, seconds_until_empty=None
    )
    assert all(y == CHART_HEIGHT for _, y in coordinates(chart.history))


def test_a_chart_without_room_is_a_bug() -> None:
    with pytest.raises(ValueError):
        burndown_chart([], now_ms=NOW_MS, available=1, seconds_until_empty=None, width=0)


def test_a_shorter_window_keeps_the_projection_no_longer_than_itself() -> None:
    window_ms = 300_000
    chart = burndown_chart(
        [], now_ms=NOW_MS, available=100, seconds_until_empty=3600, window_ms=window_ms
    )
    assert chart.window_ms == chart.ahead_ms == window_ms
    assert chart.now_x == CHART_WIDTH // 2
