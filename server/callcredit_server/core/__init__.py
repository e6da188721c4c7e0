"""The pure balance state machine: no grpc, sqlalchemy, asyncio or clock.

Every operation is a function of (state, now_ms, command). Time is an argument,
results are values (see outcomes.py), and exceptions are bugs (InvariantViolation).
"""

from __future__ import annotations

from callcredit_server.core.commands import (
    Adjust,
    Command,
    CreateAccount,
    PutTariff,
    Release,
    Renew,
    Reserve,
    Takeover,
    Tick,
    TopUp,
    UpdateAccount,
)
from callcredit_server.core.machine import InvariantViolation, StateMachine, Step
from callcredit_server.core.model import (
    COMPILED,
    AccountStatus,
    AccountView,
    CallRecord,
    CallState,
    EntryKind,
    Grant,
    LedgerEntry,
    Rate,
    ReleaseResult,
    Tariff,
)
from callcredit_server.core.outcomes import (
    AccountResult,
    GrantPush,
    GrantResult,
    Outcome,
    Push,
    Reason,
    Refused,
    ReleaseOutcome,
    TakeoverResult,
    TariffResult,
    Termination,
    TickResult,
)
from callcredit_server.core.rating import billed_seconds, cost, max_affordable_seconds

__all__ = [
    "COMPILED",
    "AccountResult",
    "AccountStatus",
    "AccountView",
    "Adjust",
    "CallRecord",
    "CallState",
    "Command",
    "CreateAccount",
    "EntryKind",
    "Grant",
    "GrantPush",
    "GrantResult",
    "InvariantViolation",
    "LedgerEntry",
    "Outcome",
    "Push",
    "PutTariff",
    "Rate",
    "Reason",
    "Refused",
    "Release",
    "ReleaseOutcome",
    "ReleaseResult",
    "Renew",
    "Reserve",
    "StateMachine",
    "Step",
    "Takeover",
    "TakeoverResult",
    "Tariff",
    "TariffResult",
    "Termination",
    "Tick",
    "TickResult",
    "TopUp",
    "UpdateAccount",
    "billed_seconds",
    "cost",
    "max_affordable_seconds",
]
