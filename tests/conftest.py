"""Fixtures shared by every test folder: journal database URLs for each backend."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import sqlalchemy

from callcredit_server.journal import engine_url

# tests/core/helpers.py asserts too, and tests outside tests/core import it (changefeed,
# writer, simulation): register its rewrite here, before any of them is collected.
pytest.register_assert_rewrite("tests.core.helpers")

POSTGRES_ENV = "CALLCREDIT_TEST_POSTGRES_URL"


def missing_component(reason: str) -> NoReturn:
    """Skip a test whose real component (Kamailio, Chromium, systemd) is missing, saying
    why; under CI=true fail instead: .ci/run installs them all, so a skip there would
    hide a test that never ran."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: this test must run, but {reason}")
    pytest.skip(reason)


def postgres_url() -> str | None:
    return os.environ.get(POSTGRES_ENV) or None


@pytest.fixture(
    params=[pytest.param("sqlite", id="sqlite"), pytest.param("postgresql", id="postgresql")]
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty journal database on each backend.

    PostgreSQL runs only where CALLCREDIT_TEST_POSTGRES_URL is set (.ci/run sets
    it); each test gets a schema of its own, dropped afterwards.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'journal.db'}"
        return
    with postgres_schema_url("cc_test", "PostgreSQL journal tests skipped") as url:
        yield url


@contextlib.contextmanager
def postgres_schema_url(prefix: str, skipped: str) -> Iterator[str]:
    """The test PostgreSQL's URL with search_path set to a new, empty schema (named
    `prefix` and a random suffix), dropped afterwards; the test is skipped, saying
    `skipped`, where CALLCREDIT_TEST_POSTGRES_URL is not set."""
    base = postgres_url()
    if base is None:
        pytest.skip(f"{POSTGRES_ENV} not set: {skipped}")
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
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
