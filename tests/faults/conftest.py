"""PostgreSQL behind a proxy the test controls, in a schema of its own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import sqlalchemy
from sqlalchemy.engine import URL

from callcredit_server.journal import engine_url
from tests.conftest import POSTGRES_ENV, postgres_url
from tests.faults.proxy import TcpProxy


@dataclass(frozen=True)
class PostgresSchema:
    """A fresh schema on the test PostgreSQL; `via(port)` is its URL through a proxy."""

    url: URL  # the real server, search_path set to the schema

    def via(self, port: int) -> str:
        proxied = self.url.set(host="127.0.0.1", port=port).update_query_dict(
            {"sslmode": "disable", "gssencmode": "disable"}  # the proxy reads the protocol
        )
        return proxied.render_as_string(hide_password=False)


@pytest.fixture
def postgres_schema() -> Iterator[PostgresSchema]:
    base = postgres_url()
    if base is None:
        pytest.skip(f"{POSTGRES_ENV} not set: PostgreSQL fault tests skipped")
    url = engine_url(base)
    schema = f"cc_fault_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield PostgresSchema(url.update_query_dict({"options": f"-csearch_path={schema}"}))
    finally:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture
def proxy(postgres_schema: PostgresSchema) -> Iterator[TcpProxy]:
    """A proxy to the test PostgreSQL on 127.0.0.1, listening; closed after the test."""
    proxied = TcpProxy(postgres_schema.url.host or "127.0.0.1", postgres_schema.url.port or 5432)
    try:
        proxied.listen()
        yield proxied
    finally:
        proxied.close()
