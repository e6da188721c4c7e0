"""The servers of the service and security tests, for changefeed tests."""

from tests.security.conftest import secured
from tests.service.conftest import harness

__all__ = ["harness", "secured"]
