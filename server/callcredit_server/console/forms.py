"""The console's forms as decisions, without I/O: what a submitted form asks for, or why
it cannot be done. The server checks everything again; these checks exist so that a
person gets a clear sentence before anything is sent, and so that nothing is sent
without its confirmation.

Every action is two steps: the form, then a confirmation page that repeats it in words
("Top up ₫20,000 to acme?") and posts the same fields with ``confirmed=yes``. Money
forms carry an idempotency key minted when the form was rendered, so submitting the
confirmation twice (a double click, a reload, the back button) moves the money once.

Amounts are typed in the currency's major unit, as people think (``12.50`` dollars,
``20,000`` đồng); ``callcredit.money`` does the conversion, exactly.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from callcredit.money import AmountError, format_amount, parse_amount

__all__ = [
    "MAX_AMOUNT",
    "MAX_NOTE_CHARS",
    "FormError",
    "MoneyAction",
    "MoneyKind",
    "StatusAction",
    "StatusChoice",
    "new_idempotency_key",
    "parse_money_form",
    "parse_status_form",
]

MAX_AMOUNT = 10**15
"""The contract's bound on one top-up or adjustment (minor units)."""

MAX_NOTE_CHARS = 256
"""The contract's bound on a reference or reason."""

MAX_FIELD_CHARS = 1_000
"""Longer form fields are refused unread (the amount is at most ~25 characters)."""

_KEY = re.compile(r"console-[0-9a-f]{32}")


class MoneyKind(StrEnum):
    """The two ways the console moves money."""

    top_up = "top_up"
    adjust = "adjust"


class StatusChoice(StrEnum):
    """The statuses the console sets: suspend and resume (closing stays a CLI act)."""

    active = "active"
    suspended = "suspended"


@dataclass(frozen=True, slots=True)
class MoneyAction:
    kind: MoneyKind
    amount: int
    """Minor units: > 0 for a top-up, non-zero for an adjustment."""
    idempotency_key: str
    note: str
    """The top-up's reference or the adjustment's reason."""
    confirmed: bool

    def describe(self, account_id: str, currency: str) -> str:
        """The action in words, for the confirmation page."""
        money = format_amount(abs(self.amount), currency)
        if self.kind is MoneyKind.top_up:
            return f"Top up {money} to {account_id}"
        verb = "Add" if self.amount > 0 else "Remove"
        return f"{verb} {money} {'to' if self.amount > 0 else 'from'} {account_id} (adjustment)"


@dataclass(frozen=True, slots=True)
class StatusAction:
    status: StatusChoice
    confirmed: bool

    def describe(self, account_id: str) -> str:
        verb = "Resume" if self.status is StatusChoice.active else "Suspend"
        return f"{verb} {account_id}"


@dataclass(frozen=True, slots=True)
class FormError:
    """Why the form cannot be done, in a sentence for the person who filled it in."""

    message: str


def new_idempotency_key() -> str:
    """A key for one rendered money form: resubmitting that form reuses it."""
    return f"console-{uuid.uuid4().hex}"


def _field(form: Mapping[str, str], name: str) -> str:
    return form.get(name, "").strip()


def parse_money_form(
    kind: MoneyKind, form: Mapping[str, str], currency: str
) -> MoneyAction | FormError:
    """A top-up or adjustment from its form fields: ``amount`` (major units),
    ``note``, ``idempotency_key`` (as rendered) and ``confirmed``."""
    if any(len(value) > MAX_FIELD_CHARS for value in form.values()):
        return FormError("A field is too long.")
    text = _field(form, "amount")
    if not text:
        return FormError("Enter an amount.")
    # The CLI reads a plain integer as minor units (for scripts); a person typing
    # "100" in a form labelled USD means $100, so the form always reads major units.
    try:
        amount = parse_amount(text if "." in text else f"{text}.0", currency)
    except (AmountError, ArithmeticError) as exc:
        return FormError(str(exc) if isinstance(exc, AmountError) else f"{text!r}: not a number")
    if kind is MoneyKind.top_up and amount <= 0:
        return FormError("A top-up must be more than zero; use an adjustment to remove money.")
    if amount == 0:
        return FormError("An adjustment must not be zero.")
    if abs(amount) > MAX_AMOUNT:
        return FormError(f"At most {format_amount(MAX_AMOUNT, currency)} at once.")
    note = _field(form, "note")
    if len(note) > MAX_NOTE_CHARS:
        return FormError(f"The note is longer than {MAX_NOTE_CHARS} characters.")
    key = _field(form, "idempotency_key")
    if not _KEY.fullmatch(key):
        return FormError("The form is incomplete; reload the page and fill it in again.")
    return MoneyAction(kind, amount, key, note, _field(form, "confirmed") == "yes")


def parse_status_form(form: Mapping[str, str]) -> StatusAction | FormError:
    """Suspend or resume from the ``status`` and ``confirmed`` fields."""
    try:
        status = StatusChoice(_field(form, "status"))
    except ValueError:
        return FormError("Choose suspend or resume.")
    return StatusAction(status, _field(form, "confirmed") == "yes")
