"""callcredit: the contract (callcredit.v1), the dialer library and the admin client."""

from __future__ import annotations

from callcredit.admin import AdminClient, RateSpec
from callcredit.dialer import DialerCall, DialerClient, Grant, ReleaseResult
from callcredit.errors import CallcreditError, StreamClosedError

__all__ = [
    "AdminClient",
    "CallcreditError",
    "DialerCall",
    "DialerClient",
    "Grant",
    "RateSpec",
    "ReleaseResult",
    "StreamClosedError",
]
