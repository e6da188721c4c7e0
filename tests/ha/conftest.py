"""Fixtures of the hot standby tests: a PostgreSQL schema of their own per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy

from callcredit_server.journal import engine_url
from tests.conftest import POSTGRES_ENV, postgres_url
from tests.faults.conftest import postgres_schema, proxy

__all__ = ["pg_url", "postgres_schema", "proxy"]  # the fault tests' PostgreSQL behind a proxy


@pytest.fixture
def pg_url() -> Iterator[str]:
    """An empty schema on the test PostgreSQL (skipped without CALLCREDIT_TEST_POSTGRES_URL)."""
    base = postgres_url()
    if base is None:
        pytest.skip(f"{POSTGRES_ENV} not set: the hot standby needs PostgreSQL")
    schema = f"cc_ha_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(engine_url(base))
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in base else "?"
    try:
        yield f"{base}{separator}options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()
