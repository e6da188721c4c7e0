"""Limits on input (docs/design.md, Contract): each bound just inside and just outside.

A value just inside is accepted and the command succeeds; a value just outside is
refused with INVALID_ARGUMENT naming the field, before any other check, changing
nothing. (Request ids and the 10,000 operations per ControlRequest are checked by the
stream servicer, not the state machine.)
"""

from __future__ import annotations

import pytest

from callcredit_server.core import (
    Adjust,
    Command,
    CreateAccount,
    PutTariff,
    Rate,
    Reason,
    Refused,
    Release,
    Tariff,
    TopUp,
    UpdateAccount,
)

from .helpers import Sim, granted, rate, renew, reserve

E15 = 10**15


def put(*rates: Rate, tariff_id: str = "T2", currency: str = "VND") -> PutTariff:
    return PutTariff(Tariff(tariff_id, currency, rates))


def create(
    account_id: str = "B",
    currency: str = "VND",
    tariff_id: str = "T",
    credit_limit: int = 0,
    cap: int = 0,
) -> CreateAccount:
    return CreateAccount(account_id, currency, tariff_id, credit_limit, cap)


def top_up(amount: int = 1, key: str = "k", reference: str = "", account_id: str = "A") -> TopUp:
    return TopUp(account_id, amount, key, reference)


def adjust(amount: int = 1, key: str = "k", reason: str = "", account_id: str = "A") -> Adjust:
    return Adjust(account_id, amount, key, reason)


TEN_THOUSAND_RATES = tuple(rate(f"{i:04d}") for i in range(10_000))
TEN_THOUSAND_AND_ONE_RATES = tuple(rate(f"{i:05d}") for i in range(10_001))
ALL_ID_CHARACTERS = "AZaz09._:@-"
FULL_WIDTH_84 = "\uff18\uff14"  # digits to str.isdigit(), not to [0-9]

LIMITS = [
    # ids: 1-128 characters of [A-Za-z0-9._:@-]
    pytest.param(create(account_id="a" * 128), (), id="account_id-128"),
    pytest.param(create(account_id=ALL_ID_CHARACTERS), (), id="account_id-every-class"),
    pytest.param(create(account_id="a" * 129), ("account_id",), id="account_id-129"),
    pytest.param(create(account_id=""), ("account_id",), id="account_id-empty"),
    pytest.param(create(account_id="a b"), ("account_id",), id="account_id-space"),
    pytest.param(create(account_id="a/b"), ("account_id",), id="account_id-slash"),
    pytest.param(create(account_id="é"), ("account_id",), id="account_id-non-ascii"),
    pytest.param(create(account_id="a\n"), ("account_id",), id="account_id-newline"),
    pytest.param(create(tariff_id="t" * 129), ("tariff_id",), id="create-tariff_id-129"),
    pytest.param(UpdateAccount("A", tariff_id="V"), (), id="update-tariff_id"),
    pytest.param(UpdateAccount("A", tariff_id=""), ("tariff_id",), id="update-tariff_id-empty"),
    pytest.param(UpdateAccount("a" * 129), ("account_id",), id="update-account_id-129"),
    pytest.param(top_up(key="k" * 128), (), id="idempotency_key-128"),
    pytest.param(top_up(key="k" * 129), ("idempotency_key",), id="idempotency_key-129"),
    pytest.param(adjust(key=""), ("idempotency_key",), id="idempotency_key-empty"),
    pytest.param(top_up(account_id="a" * 129), ("account_id",), id="top-up-account_id-129"),
    pytest.param(reserve("c" * 128), (), id="call_id-128"),
    pytest.param(reserve("c" * 129), ("call_id",), id="call_id-129"),
    pytest.param(reserve("r", account_id=""), ("account_id",), id="reserve-account_id-empty"),
    pytest.param(renew("", 1, 0), ("call_id",), id="renew-call_id-empty"),
    pytest.param(Release("x y", 0), ("call_id",), id="release-call_id-space"),
    pytest.param(put(tariff_id="t" * 128), (), id="tariff_id-128"),
    pytest.param(put(tariff_id="t" * 129), ("tariff.tariff_id",), id="tariff_id-129"),
    # destination: 1-32 digits after an optional '+'
    pytest.param(reserve("r", destination="1" * 32), (), id="destination-32"),
    pytest.param(reserve("r", destination="+" + "1" * 32), (), id="destination-plus-32"),
    pytest.param(reserve("r", destination="1"), (), id="destination-1"),
    pytest.param(reserve("r", destination="1" * 33), ("destination",), id="destination-33"),
    pytest.param(reserve("r", destination=""), ("destination",), id="destination-empty"),
    pytest.param(reserve("r", destination="+"), ("destination",), id="destination-plus-only"),
    pytest.param(reserve("r", destination="++84"), ("destination",), id="destination-plus-plus"),
    pytest.param(reserve("r", destination="84+90"), ("destination",), id="destination-inner-plus"),
    pytest.param(reserve("r", destination="84 90"), ("destination",), id="destination-space"),
    pytest.param(reserve("r", destination=FULL_WIDTH_84), ("destination",), id="full-width-digits"),
    # TopUp amount 1-10^15
    pytest.param(top_up(1), (), id="top-up-1"),
    pytest.param(top_up(E15), (), id="top-up-1e15"),
    pytest.param(top_up(0), ("amount",), id="top-up-0"),
    pytest.param(top_up(-1), ("amount",), id="top-up-negative"),
    pytest.param(top_up(E15 + 1), ("amount",), id="top-up-1e15+1"),
    # Adjust amount non-zero within ±10^15
    pytest.param(adjust(E15), (), id="adjust-1e15"),
    pytest.param(adjust(-E15), (), id="adjust-minus-1e15"),
    pytest.param(adjust(-1), (), id="adjust-minus-1"),
    pytest.param(adjust(0), ("amount",), id="adjust-0"),
    pytest.param(adjust(E15 + 1), ("amount",), id="adjust-1e15+1"),
    pytest.param(adjust(-E15 - 1), ("amount",), id="adjust-minus-1e15-1"),
    # credit_limit 0-10^15
    pytest.param(create(credit_limit=E15), (), id="create-credit_limit-1e15"),
    pytest.param(create(credit_limit=E15 + 1), ("credit_limit",), id="create-credit_limit-over"),
    pytest.param(create(credit_limit=-1), ("credit_limit",), id="create-credit_limit-negative"),
    pytest.param(UpdateAccount("A", credit_limit=0), (), id="update-credit_limit-0"),
    pytest.param(UpdateAccount("A", credit_limit=E15), (), id="update-credit_limit-1e15"),
    pytest.param(
        UpdateAccount("A", credit_limit=E15 + 1), ("credit_limit",), id="update-credit_limit-over"
    ),
    pytest.param(
        UpdateAccount("A", credit_limit=-1), ("credit_limit",), id="update-credit_limit-negative"
    ),
    # currency: three upper-case letters
    pytest.param(create(currency="USD", tariff_id="U"), (), id="currency-USD"),
    pytest.param(create(currency="usd", tariff_id="U"), ("currency",), id="currency-lower"),
    pytest.param(create(currency="US", tariff_id="U"), ("currency",), id="currency-2"),
    pytest.param(create(currency="USDX", tariff_id="U"), ("currency",), id="currency-4"),
    pytest.param(create(currency="U5D", tariff_id="U"), ("currency",), id="currency-digit"),
    pytest.param(put(currency="vnd"), ("tariff.currency",), id="tariff-currency-lower"),
    # prefixes: 0-16 digits, unique within a tariff
    pytest.param(put(rate("1" * 16)), (), id="prefix-16"),
    pytest.param(put(rate("")), (), id="prefix-empty"),
    pytest.param(put(rate("1" * 17)), ("tariff.rates[0].prefix",), id="prefix-17"),
    pytest.param(put(rate("8a")), ("tariff.rates[0].prefix",), id="prefix-letter"),
    pytest.param(put(rate("+84")), ("tariff.rates[0].prefix",), id="prefix-plus"),
    pytest.param(put(rate("84"), rate("84")), ("tariff.rates[1].prefix",), id="prefix-duplicate"),
    pytest.param(put(rate(""), rate("")), ("tariff.rates[1].prefix",), id="default-duplicate"),
    # price_per_minute_micros 0-10^12
    pytest.param(put(rate(price=0)), (), id="price-0"),
    pytest.param(put(rate(price=10**12)), (), id="price-1e12"),
    pytest.param(
        put(rate(price=-1)), ("tariff.rates[0].price_per_minute_micros",), id="price-negative"
    ),
    pytest.param(
        put(rate(price=10**12 + 1)), ("tariff.rates[0].price_per_minute_micros",), id="price-over"
    ),
    # increments 1-3,600
    pytest.param(put(rate(first=1, step=1)), (), id="increments-1"),
    pytest.param(put(rate(first=3_600, step=3_600)), (), id="increments-3600"),
    pytest.param(put(rate(first=0)), ("tariff.rates[0].first_increment_seconds",), id="first-0"),
    pytest.param(
        put(rate(first=3_601)), ("tariff.rates[0].first_increment_seconds",), id="first-3601"
    ),
    pytest.param(put(rate(step=0)), ("tariff.rates[0].next_increment_seconds",), id="next-0"),
    pytest.param(
        put(rate(step=3_601)), ("tariff.rates[0].next_increment_seconds",), id="next-3601"
    ),
    # connect_fee 0-10^9
    pytest.param(put(rate(fee=0)), (), id="connect_fee-0"),
    pytest.param(put(rate(fee=10**9)), (), id="connect_fee-1e9"),
    pytest.param(put(rate(fee=-1)), ("tariff.rates[0].connect_fee",), id="connect_fee-negative"),
    pytest.param(put(rate(fee=10**9 + 1)), ("tariff.rates[0].connect_fee",), id="connect_fee-over"),
    # at most 10,000 rates per tariff
    pytest.param(put(*TEN_THOUSAND_RATES), (), id="rates-10000"),
    pytest.param(put(*TEN_THOUSAND_AND_ONE_RATES), ("tariff.rates",), id="rates-10001"),
    # seconds 0-86,400
    pytest.param(reserve("r", requested_seconds=0), (), id="reserve-requested-0"),
    pytest.param(reserve("r", requested_seconds=86_400), (), id="reserve-requested-86400"),
    pytest.param(
        reserve("r", requested_seconds=86_401), ("requested_seconds",), id="reserve-requested-over"
    ),
    pytest.param(
        reserve("r", requested_seconds=-1), ("requested_seconds",), id="reserve-requested-negative"
    ),
    pytest.param(renew("c", 1, 86_400, 86_400), (), id="renew-seconds-86400"),
    pytest.param(renew("c", 1, 86_401), ("used_seconds",), id="renew-used-over"),
    pytest.param(renew("c", 1, -1), ("used_seconds",), id="renew-used-negative"),
    pytest.param(renew("c", 1, 0, 86_401), ("requested_seconds",), id="renew-requested-over"),
    pytest.param(renew("c", 1, 0, -1), ("requested_seconds",), id="renew-requested-negative"),
    pytest.param(Release("c", 86_400), (), id="release-used-86400"),
    pytest.param(Release("c", 0), (), id="release-used-0"),
    pytest.param(Release("c", 86_401), ("used_seconds",), id="release-used-over"),
    pytest.param(Release("c", -1), ("used_seconds",), id="release-used-negative"),
    # limits of the code beyond docs/design.md's list
    pytest.param(renew("c", 0, 0), ("sequence",), id="renew-sequence-0"),
    pytest.param(renew("c", 2**63 - 1, 0), (), id="renew-sequence-int64-max"),
    pytest.param(renew("c", 2**63, 0), ("sequence",), id="renew-sequence-over-int64"),
    pytest.param(top_up(reference="r" * 256), (), id="reference-256"),
    pytest.param(top_up(reference="r" * 257), ("reference",), id="reference-257"),
    pytest.param(adjust(reason="r" * 257), ("reason",), id="reason-257"),
    pytest.param(create(cap=1_000_000), (), id="max_concurrent_calls-1e6"),
    pytest.param(create(cap=1_000_001), ("max_concurrent_calls",), id="max_concurrent_calls-over"),
    pytest.param(create(cap=-1), ("max_concurrent_calls",), id="max_concurrent_calls-negative"),
    pytest.param(
        UpdateAccount("A", max_concurrent_calls=-1),
        ("max_concurrent_calls",),
        id="update-max_concurrent_calls-negative",
    ),
    # every violation is named, in the order of the fields
    pytest.param(
        TopUp("", 0, "", "r" * 257),
        ("account_id", "amount", "idempotency_key", "reference"),
        id="top-up-all-wrong",
    ),
    pytest.param(
        put(rate("x", price=-1, first=0, step=3_601, fee=-1), tariff_id="", currency=""),
        (
            "tariff.tariff_id",
            "tariff.currency",
            "tariff.rates[0].prefix",
            "tariff.rates[0].price_per_minute_micros",
            "tariff.rates[0].first_increment_seconds",
            "tariff.rates[0].next_increment_seconds",
            "tariff.rates[0].connect_fee",
        ),
        id="tariff-all-wrong",
    ),
    pytest.param(
        put(rate("1"), rate("2", fee=-1)),
        ("tariff.rates[1].connect_fee",),
        id="tariff-second-rate-named",
    ),
    # validation comes before any other check
    pytest.param(create("A", currency="vnd"), ("currency",), id="before-ACCOUNT_EXISTS"),
    pytest.param(create(tariff_id="t" * 129), ("tariff_id",), id="before-TARIFF_NOT_FOUND"),
    pytest.param(top_up(0, account_id="nobody"), ("amount",), id="before-ACCOUNT_NOT_FOUND"),
    pytest.param(renew("nobody", 0, 0), ("sequence",), id="before-CALL_NOT_FOUND"),
    pytest.param(reserve("c", destination="x"), ("destination",), id="before-known-call-id-repeat"),
    pytest.param(
        put(rate(fee=-1), tariff_id="U"),
        ("tariff.rates[0].connect_fee",),
        id="before-CURRENCY_MISMATCH",
    ),
]


@pytest.fixture
def world() -> Sim:
    """Tariffs T, V (VND) and U (USD); account A (VND, credit 5) with 2 * 10^15; call "c"."""
    w = Sim()
    w.put_tariff()
    w.put_tariff(tariff_id="V")
    w.put_tariff(tariff_id="U", currency="USD")
    w.open_account(balance=E15, credit_limit=5)
    w.top_up(E15)
    granted(w.reserve("c"))
    return w


@pytest.mark.parametrize(("command", "fields"), LIMITS)
def test_input_limits(world: Sim, command: Command, fields: tuple[str, ...]) -> None:
    if fields:
        refused = world.refuse(command, Reason.INVALID_ARGUMENT)
        assert tuple(name for name, _ in refused.field_violations) == fields
        for name in fields:
            assert name in refused.message
    else:
        step = world.apply(command)
        assert not isinstance(step.outcome, Refused), step.outcome
        assert step.changed


def test_balance_ceiling_refuses_top_up_as_invalid_argument() -> None:
    """The code keeps balances under 10^18 (int64 headroom): a limit beyond docs/design.md."""
    w = Sim(check_every_step=False)
    w.put_tariff()
    w.open_account()
    for _ in range(1_000):
        w.top_up(E15)
    w.check()
    assert w.view().balance == 10**18
    refused = w.refuse(top_up(1, key="over"), Reason.INVALID_ARGUMENT)
    assert [name for name, _ in refused.field_violations] == ["amount"]
    w.adjust(-1)
    assert w.top_up(1).balance == 10**18
