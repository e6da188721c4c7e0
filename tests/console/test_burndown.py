"""The burn-down chart's numbers: history kept, steps drawn, projection to empty."""

from __future__ import annotations

import pytest

from callcredit_server.console.burndown import (
    CHART_HEIGHT,
    CHART_WIDTH,
    HISTORY_MS,
    MIN_WINDOW_MS,
    History,
    Point,
    burndown_chart,
    chart_window_ms,
)

NOW_MS = 1_800_000_000_000


def coordinates(points: str) -> list[tuple[int, int]]:
    return [(int(x), int(y)) for x, y in (pair.split(",") for pair in points.split())]


def test_history_keeps_the_window_and_the_value_it_starts_with() -> None:
    history = History()
    history.record("a", NOW_MS - HISTORY_MS - 5_000, 900)
    history.record("a", NOW_MS - HISTORY_MS - 1_000, 800)
    history.record("a", NOW_MS - 60_000, 700)
    history.record("b", NOW_MS - 60_000, 1)
    assert history.points("a", NOW_MS) == [
        Point(NOW_MS - HISTORY_MS - 1_000, 800),
        Point(NOW_MS - 60_000, 700),
    ]
    assert history.points("unknown", NOW_MS) == []


def test_history_is_bounded_per_account_and_in_accounts() -> None:
    history = History(max_points_per_account=3, max_accounts=2)
    for i in range(10):
        history.record("a", NOW_MS + i, i)
    assert [point.available for point in history.points("a", NOW_MS + 10)] == [7, 8, 9]
    history.record("b", NOW_MS, 1)
    history.record("a", NOW_MS + 11, 10)  # a is now the most recently changed
    history.record("c", NOW_MS, 1)  # so b, changed longest ago, goes
    assert len(history) == 2
    assert history.points("b", NOW_MS + 20) == []
    assert history.points("a", NOW_MS + 20)[-1].available == 10


def test_a_point_from_before_the_newest_one_is_placed_at_the_newest_time() -> None:
    history = History()
    history.record("a", NOW_MS, 5)
    history.record("a", NOW_MS - 10_000, 4)  # the server's clock stepped back
    assert history.points("a", NOW_MS) == [Point(NOW_MS, 5), Point(NOW_MS, 4)]


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


@pytest.mark.parametrize(
    ("followed_ms", "window"),
    [
        pytest.param(0, MIN_WINDOW_MS, id="just-started"),
        pytest.param(20 * 60_000, 20 * 60_000, id="twenty-minutes"),
        pytest.param(5 * HISTORY_MS, HISTORY_MS, id="hours"),
    ],
)
def test_the_chart_reaches_back_as_far_as_the_console_has_followed(
    followed_ms: int, window: int
) -> None:
    assert chart_window_ms(NOW_MS, NOW_MS - followed_ms) == window


def test_a_shorter_window_keeps_the_projection_no_longer_than_itself() -> None:
    chart = burndown_chart(
        [], now_ms=NOW_MS, available=100, seconds_until_empty=3600, window_ms=MIN_WINDOW_MS
    )
    assert chart.window_ms == chart.ahead_ms == MIN_WINDOW_MS
    assert chart.now_x == CHART_WIDTH // 2
