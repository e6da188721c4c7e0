"""Structured logs: one JSON object per line, extra fields kept, secrets out."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from callcredit.v1 import admin_pb2
from callcredit_server.logs import JsonFormatter, TextFormatter, announce, formatter, scrub
from tests.service.conftest import Harness
from tests.service.streams import RawStream, reserve_op


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Everything logged under callcredit_server while the test runs, as JSON lines."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("callcredit_server")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_a_server_log_about_a_call_is_a_json_line_with_its_call_id(
    harness: Harness, json_lines: io.StringIO
) -> None:
    await harness.funded_account("acc", 100)
    stream = RawStream(harness.dialer)
    await stream.ask(reserve_op("r1", "call-77", "acc"))
    await harness.admin.UpdateAccount(
        admin_pb2.UpdateAccountRequest(account_id="acc", status=admin_pb2.ACCOUNT_STATUS_SUSPENDED)
    )
    await stream.wait_for(lambda: len(stream.terminations) == 1)
    await stream.close()

    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    (termination,) = [line for line in lines if line.get("call_id") == "call-77"]
    assert termination["level"] == "INFO"
    assert termination["logger"] == "callcredit_server.metrics"
    assert termination["reason"] == "ACCOUNT_SUSPENDED"
    assert "call-77" in termination["message"]
    assert termination["time"].endswith("+00:00")
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys()


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord(
        "callcredit_server.x", logging.WARNING, "f.py", 1, message, args, None
    )
    record.__dict__.update(extra)
    return record


def test_json_line_fields_and_redaction() -> None:
    record = _record(
        "journal %s down",
        "postgresql+psycopg://cc:hunter2@db/cc",
        call_id="c-1",
        account_id="a-1",
        token="abc123",
        db_password="hunter2",
        level="not-a-level",
    )
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "journal postgresql+psycopg://cc:[redacted]@db/cc down"
    assert (line["call_id"], line["account_id"]) == ("c-1", "a-1")
    assert line["token"] == line["db_password"] == "[redacted]"
    assert line["level"] == "WARNING"  # an extra field never hides a standard one
    assert "hunter2" not in json.dumps(line)
    assert scrub("Authorization: Bearer eyJhbGciOi.x-y") == "Authorization: Bearer [redacted]"
    assert scrub("refused GetAccount: no bearer token") == "refused GetAccount: no bearer token"


def test_exceptions_become_one_line_and_text_shows_extra_fields() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed", call_id="c-2")
        record.exc_info = sys.exc_info()
    text = JsonFormatter().format(record)
    assert "\n" not in text
    assert "ValueError: boom" in json.loads(text)["exception"]
    first = TextFormatter().format(record).splitlines()[0]
    assert first.endswith("WARNING callcredit_server.x: failed call_id=c-2")
    with pytest.raises(ValueError):
        formatter("yaml")


def test_announce_is_json_in_json_mode(capsys: pytest.CaptureFixture[str]) -> None:
    announce("json", "callcredit-server listening on port 5", port=5)
    announce("text", "callcredit-server listening on port 6", port=6)
    json_line, text_line = capsys.readouterr().err.splitlines()
    assert json.loads(json_line)["port"] == 5
    assert text_line == "callcredit-server listening on port 6"
