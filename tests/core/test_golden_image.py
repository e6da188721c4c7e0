"""Images written by released versions keep loading, into the state they held.

tests/core/golden/image-v<N>.json is an image version N wrote of `golden_machine()`:
two tariffs, three accounts (one suspended, one with credit), an open call that has
renewed, an ended call, and remembered top-ups and an adjustment. Each file is kept
forever. When core/image.py changes, bump IMAGE_VERSION and write the new version's
file with `python -m tests.core.test_golden_image` (it never overwrites one).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from callcredit_server.core import (
    AccountResult,
    AccountStatus,
    Adjust,
    CallState,
    Command,
    CreateAccount,
    GrantResult,
    InvariantViolation,
    PutTariff,
    Rate,
    Release,
    ReleaseOutcome,
    Renew,
    Reserve,
    StateMachine,
    Tariff,
    TopUp,
    UpdateAccount,
)
from callcredit_server.core.image import IMAGE_VERSION

GOLDEN = Path(__file__).parent / "golden"
T0_MS = 1_750_000_000_000


def golden_machine() -> StateMachine:
    """The state every golden image holds, built by commands."""
    machine = StateMachine()
    commands: list[Command] = [
        PutTariff(
            Tariff(
                "vn",
                "VND",
                (Rate("84", 1_179_600_000, 6, 6, 0), Rate("", 30_000_000, 60, 60, 100)),
            )
        ),
        PutTariff(Tariff("flat", "USD", (Rate("", 60_000_000, 1, 1, 0),))),
        CreateAccount("acme", "VND", "vn", 0, 5),
        CreateAccount("beta", "VND", "vn", 500, 2),
        CreateAccount("gamma", "USD", "flat", 0, 1),
        TopUp("acme", 20_000, "inv-1", "bank transfer 42"),
        Adjust("beta", -100, "adj-1", "correction"),
        TopUp("gamma", 1_000, "g-1", ""),
        UpdateAccount("gamma", status=AccountStatus.SUSPENDED),
        Reserve("c-open", "acme", "84901234567", 0, 60, 120),
        Reserve("c-ended", "beta", "12025550100", 0, 60, 120),
        Renew("c-open", 1, 30, 0, 60, 120),
        Release("c-ended", 75),
    ]
    for n, command in enumerate(commands):
        step = machine.apply(command, T0_MS + 1_000 * n)
        if not step.changed:
            raise AssertionError(f"{command} was refused: {step.outcome}")
    return machine


def _golden(version: int) -> dict[str, Any]:
    image: dict[str, Any] = json.loads((GOLDEN / f"image-v{version}.json").read_text())
    return image


def _versions() -> list[int]:
    return sorted(int(p.stem.removeprefix("image-v")) for p in GOLDEN.glob("image-v*.json"))


def test_this_version_writes_its_golden_image() -> None:
    assert IMAGE_VERSION in _versions(), "a new IMAGE_VERSION needs its golden image"
    written = json.loads(json.dumps(golden_machine().image()))
    assert written == _golden(IMAGE_VERSION), "the image changed: bump IMAGE_VERSION"


@pytest.mark.parametrize("version", _versions())
def test_every_golden_image_loads_into_the_state_it_holds(version: int) -> None:
    machine = StateMachine.from_image(_golden(version))
    assert machine.audit() == []
    assert machine.now_ms == T0_MS + 12_000
    assert sorted(machine.tariffs) == ["flat", "vn"]
    assert machine.tariffs["vn"].rate_for("84901234567") == Rate("84", 1_179_600_000, 6, 6, 0)
    acme, beta, gamma = (machine.account(a) for a in ("acme", "beta", "gamma"))
    assert acme is not None and beta is not None and gamma is not None
    # c-open: 30 s used, a renewal for 60 s more: 90 s held, at 19.66 per s.
    assert (acme.balance, acme.reserved, acme.available, acme.active_calls) == (
        20_000, 1_770, 18_230, 1,
    )  # fmt: skip
    # c-ended: 75 s billed per minute (2 minutes at 0.5 per s) and a connect fee of 100.
    assert (beta.balance, beta.reserved, beta.available, beta.credit_limit) == (-260, 0, 240, 500)
    assert (gamma.status, gamma.balance, gamma.currency) == (AccountStatus.SUSPENDED, 1_000, "USD")
    open_call = machine.call("c-open")
    ended = machine.call("c-ended")
    assert open_call is not None and ended is not None
    assert (open_call.state, open_call.allowed_seconds, open_call.held) == (
        CallState.ACTIVE, 90, 1_770,
    )  # fmt: skip
    assert (ended.state, ended.charged, ended.ended_at_ms) == (
        CallState.RELEASED, 160, T0_MS + 12_000,
    )  # fmt: skip
    assert machine.next_expiry_ms() == T0_MS + 11_000 + 120_000

    # What the image remembers answers repeats as before, changing nothing.
    later = T0_MS + 20_000
    again = machine.apply(TopUp("acme", 20_000, "inv-1", "bank transfer 42"), later)
    assert not again.changed and isinstance(again.outcome, AccountResult)
    assert again.outcome.account.balance == 20_000
    again = machine.apply(Adjust("beta", -100, "adj-1", "correction"), later)
    assert not again.changed and isinstance(again.outcome, AccountResult)
    released = machine.apply(Release("c-ended", 75), later)
    assert not released.changed and isinstance(released.outcome, ReleaseOutcome)
    assert released.outcome.result.charged == 160
    renewed = machine.apply(Renew("c-open", 1, 30, 0, 60, 120), later)
    assert not renewed.changed and isinstance(renewed.outcome, GrantResult)
    assert renewed.outcome.grant.allowed_seconds == 90
    # And the open call goes on: ended at 40 s, 42 s billed in 6 s steps at 19.66 per s.
    ended_now = machine.apply(Release("c-open", 40), later)
    assert ended_now.changed and isinstance(ended_now.outcome, ReleaseOutcome)
    assert ended_now.outcome.result.charged == 826
    assert machine.audit() == []


def test_an_image_of_an_unknown_version_is_refused_by_name() -> None:
    image = {**_golden(IMAGE_VERSION), "format": IMAGE_VERSION + 1}
    expected = (
        f"unsupported snapshot version {IMAGE_VERSION + 1} \\(this server reads {IMAGE_VERSION}\\)"
    )
    with pytest.raises(InvariantViolation, match=expected):
        StateMachine.from_image(image)


def _write_golden() -> None:
    path = GOLDEN / f"image-v{IMAGE_VERSION}.json"
    if path.exists():
        sys.exit(f"{path} exists: golden images are never rewritten")
    path.write_text(json.dumps(golden_machine().image(), indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    _write_golden()
