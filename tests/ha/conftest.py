"""Fixtures of the hot standby tests: a PostgreSQL schema of their own per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import postgres_schema_url
from tests.faults.conftest import postgres_schema, proxy

__all__ = ["pg_url", "postgres_schema", "proxy"]  # the fault tests' PostgreSQL behind a proxy


@pytest.fixture
def pg_url() -> Iterator[str]:
    """An empty schema on the test PostgreSQL (skipped without CALLCREDIT_TEST_POSTGRES_URL)."""
    with postgres_schema_url("cc_ha", "the hot standby needs PostgreSQL") as url:
        yield url
