"""A state image (what a snapshot stores) rebuilds a machine that behaves identically."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from enum import Enum

import pytest

from callcredit_server.core import COMPILED, InvariantViolation, Rate, StateMachine
from callcredit_server.core import image as image_format
from callcredit_server.core.model import (
    Account,
    AccountStatus,
    AccountView,
    Call,
    CallState,
    EntryKind,
    Grant,
    ReleaseResult,
    Tariff,
    key_answer,
    new_key_record,
)
from tests.core.helpers import rate
from tests.core.test_properties import OP_CODES, command_of, decode, two_accounts


def _canonical(machine: StateMachine) -> str:
    return json.dumps(machine.image(), sort_keys=True)


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"seed-{s}") for s in range(30)])
def test_an_image_restores_a_machine_that_answers_every_later_command_alike(seed: int) -> None:
    rng = random.Random(seed)

    def any_rate() -> Rate:
        return rate(
            price=rng.randrange(3 * 60_000_000),
            first=rng.choice((1, 6, 30, 60)),
            step=rng.choice((1, 6, 60)),
            fee=rng.choice((0, 0, 10, 100)),
        )

    sim = two_accounts(any_rate(), any_rate(), rng.randrange(400), rng.randrange(400))
    copies: list[StateMachine] = []
    for _ in range(300):
        if rng.random() < 0.05:  # a snapshot here: it must be an exact copy from now on
            image = json.loads(json.dumps(sim.machine.image()))  # through JSON, as on disk
            copies.append(StateMachine.from_image(image))
            assert _canonical(copies[-1]) == _canonical(sim.machine)
        command = command_of(decode(rng.randrange(OP_CODES)), sim.machine)
        if isinstance(command, int):
            sim.advance(ms=command)
            continue
        step = sim.apply(command)
        for copy in copies:
            assert copy.apply(command, sim.now_ms) == step, f"seed {seed}"
    for copy in copies:
        assert _canonical(copy) == _canonical(sim.machine)
        assert copy.audit() == []


def test_a_broken_image_is_refused() -> None:
    sim = two_accounts(rate(price=60_000_000), rate(price=60_000_000), 100, 100)
    image = sim.machine.image()
    image["accounts"][0][7] += 1  # reserved no longer matches the holds of open calls
    with pytest.raises(InvariantViolation, match="reserved"):
        StateMachine.from_image(image)
    image["accounts"][0] = image["accounts"][0][:-1]  # a field short
    with pytest.raises(InvariantViolation, match="malformed"):
        StateMachine.from_image(image)


@pytest.mark.skipif(COMPILED, reason="reads code objects, which compiled functions lack")
@pytest.mark.parametrize(
    ("reader", "row", "first_local"),
    [
        (image_format.rate_of, image_format.RateRow, 4),  # after row, shared, key, rate
        (image_format.account_of, image_format.AccountRow, 2),
        (image_format.call_of, image_format.CallRow, 2),
        (image_format.key_of, image_format.KeyRow, 2),
    ],
)
def test_the_readers_unpack_each_row_into_its_fields_in_order(
    reader: Callable[..., object], row: type[tuple[object, ...]], first_local: int
) -> None:
    fields: tuple[str, ...] = row._fields  # type: ignore[attr-defined]
    names = reader.__code__.co_varnames[first_local : first_local + len(fields)]
    assert names == fields


def _by_name(row: type[tuple[object, ...]], source: object, **given: object) -> list[object]:
    """`row` built by name from `source`'s attributes of the same names (enums by value),
    but the fields `given`."""
    fields: tuple[str, ...] = row._fields  # type: ignore[attr-defined]
    values = {f: given[f] if f in given else getattr(source, f) for f in fields}
    return [v.value if isinstance(v, Enum) else v for v in row(**values)]


def test_the_writers_list_each_row_s_fields_in_order() -> None:
    """Every field of every row a distinct value: a writer that lists two fields out of
    order fails here."""
    price = Rate("84", 21, 22, 23, 24)
    assert image_format.rate_row(price) == _by_name(image_format.RateRow, price)
    tariff = Tariff("T", "VND", (price,))
    rates = [image_format.rate_row(price)]
    assert image_format.tariff_row(tariff) == _by_name(image_format.TariffRow, tariff, rates=rates)
    account = Account("a", "VND", "T", 11, 12, AccountStatus.SUSPENDED, 13, 14)
    account.low_balance_threshold, account.low = 15, True
    assert image_format.account_row(account) == _by_name(image_format.AccountRow, account)
    grant = Grant("c", 31, True, 32, 33)
    ended = ReleaseResult("c", 41, 42, 43, 44, 45)
    call = Call("c", 1, "a", "84901", 2, price, 3, 4, 5, 6, CallState.RELEASED, 7, 8, 9, True,
                10, grant, 16, 17, 18, ended)  # fmt: skip
    assert image_format.call_row(call) == _by_name(
        image_format.CallRow,
        call,
        rate=image_format.rate_row(price),
        last_renew=_by_name(image_format.GrantRow, grant),
        release=_by_name(image_format.ReleaseRow, ended),
    )
    view = AccountView("a", "USD", AccountStatus.CLOSED, "T2", 51, 52, 53 - 52 + 51, 53, 54, 55,
                       56, 57)  # fmt: skip
    record = new_key_record(61, EntryKind.ADJUSTMENT, 62, "why", view)
    assert image_format.key_row("a", "k", record) == [
        *image_format.KeyRow(61, "a", "k", "ADJUSTMENT", 62, "why",
                             _by_name(image_format.ViewRow, key_answer("a", record))),
    ]  # fmt: skip
    assert image_format.key_row("a", "k", record)[-1] == _by_name(image_format.ViewRow, view)
