"""callcredit: the contract (callcredit.v1), the dialer library and the admin client."""

from __future__ import annotations

from callcredit.errors import CallcreditError, StreamClosedError

__all__ = ["CallcreditError", "StreamClosedError"]
