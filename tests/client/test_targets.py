"""callcredit.targets: where a client with several servers goes next, and when."""

from __future__ import annotations

import pytest

from callcredit.targets import MAX_TARGETS, Failover, Step, parse_targets


def failover(*targets: str, max_attempts: int | None = None) -> Failover:
    return Failover(
        targets, backoff_initial_seconds=0.1, backoff_max_seconds=0.4, max_attempts=max_attempts
    )


def test_parse_targets_takes_a_comma_list_or_a_sequence() -> None:
    assert parse_targets("a:1") == ("a:1",)
    assert parse_targets("a:1, b:2") == ("a:1", "b:2")
    assert parse_targets(["a:1", "b:2"]) == ("a:1", "b:2")


@pytest.mark.parametrize("bad", ["", "a:1,", ",a:1", "a:1,a:1", [], ",".join(["x"] * 2)])
def test_parse_targets_refuses_empty_and_repeated(bad: str | list[str]) -> None:
    with pytest.raises(ValueError):
        parse_targets(bad)


def test_parse_targets_is_bounded() -> None:
    with pytest.raises(ValueError, match="at most"):
        parse_targets([f"h:{port}" for port in range(1, MAX_TARGETS + 2)])


def test_a_failure_moves_to_the_next_target_in_order() -> None:
    choice = failover("a:1", "b:2", "c:3")
    assert choice.current == "a:1"
    assert choice.failed() == Step("b:2", 0.0)
    assert choice.failed() == Step("c:3", 0.0)
    assert choice.failed().target == "a:1"


def test_a_not_primary_hint_naming_a_target_goes_there_first() -> None:
    choice = failover("a:1", "b:2", "c:3")
    assert choice.failed(primary="c:3") == Step("c:3", 0.0)
    choice.reset()
    # A hint naming no target (another address of it, say) or the one that refused: in order.
    assert choice.failed(primary="10.0.0.9:50051").target == "a:1"
    assert choice.failed(primary="a:1").target == "b:2"


def test_the_first_tour_goes_at_once_then_the_backoff_doubles_per_tour() -> None:
    choice = failover("a:1", "b:2")
    assert choice.failed(jitter=0.5).delay_seconds == 0.0
    delays = [choice.failed(jitter=0.0).delay_seconds for _ in range(7)]
    assert delays == [0.05, 0.1, 0.1, 0.2, 0.2, 0.2, 0.2]
    assert choice.failed(jitter=0.999).delay_seconds == pytest.approx(0.4, abs=1e-3)
    choice.reset()
    assert choice.failed().delay_seconds == 0.0
    assert choice.failed().delay_seconds == 0.05


def test_one_target_backs_off_from_the_first_failure() -> None:
    choice = failover("a:1")
    assert choice.failed(jitter=0.0) == Step("a:1", 0.05)
    assert choice.failed(jitter=0.0) == Step("a:1", 0.1)


def test_max_attempts_bounds_the_failures_since_the_last_reset() -> None:
    choice = failover("a:1", "b:2", max_attempts=3)
    choice.failed()
    choice.failed()
    assert not choice.exhausted
    choice.failed()
    assert choice.exhausted
    choice.reset()
    assert not choice.exhausted


@pytest.mark.parametrize(
    ("targets", "initial", "maximum", "attempts"),
    [
        ((), 0.1, 1.0, None),
        (("a:1",), 0.0, 1.0, None),
        (("a:1",), 2.0, 1.0, None),
        (("a:1",), 0.1, 1.0, 0),
    ],
)
def test_nonsense_settings_are_refused(
    targets: tuple[str, ...], initial: float, maximum: float, attempts: int | None
) -> None:
    with pytest.raises(ValueError):
        Failover(
            targets,
            backoff_initial_seconds=initial,
            backoff_max_seconds=maximum,
            max_attempts=attempts,
        )
