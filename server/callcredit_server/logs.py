"""Log output of `callcredit-server`: plain text for people, or one JSON object per line.

JSON lines carry `time` (UTC, ISO 8601, milliseconds), `level`, `logger`, `message`,
and every field the call site passed in `extra=` (`call_id`, `account_id`, `port`, ...);
an exception adds `exception` (the formatted traceback). Text lines show the same
extra fields as `key=value` after the message.

Secrets stay out of both: an extra field whose name says it holds one (password,
token, secret, authorization, ...) is written as "[redacted]", and a URL's password
(`scheme://user:password@host`) or a bearer token inside a message is masked. The
database URL is logged through `make_url(...).render_as_string(hide_password=True)`
already; this is the safety net, not the first line of defence.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "[redacted]"

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime"}
)
_SECRET_NAME = re.compile(r"pass(word|wd)?|secret|token|authorization|api_?key|credential", re.I)
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s]+@")
# Eight characters or more (a server token has at least 16), so that prose such as
# "no bearer token" stays readable.
_BEARER = re.compile(r"(\bbearer\s+)[A-Za-z0-9._~+/=-]{8,}", re.I)


def scrub(text: str) -> str:
    """`text` with URL passwords and bearer tokens masked."""
    if "@" in text:
        text = _URL_PASSWORD.sub(rf"\1{REDACTED}@", text)
    if "earer" in text:
        text = _BEARER.sub(rf"\1{REDACTED}", text)
    return text


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a call site added with `extra=`, secrets redacted."""
    fields: dict[str, Any] = {}
    for key, value in record.__dict__.items():
        if key in _RECORD_ATTRIBUTES or key.startswith("_"):
            continue
        if _SECRET_NAME.search(key):
            fields[key] = REDACTED
        elif isinstance(value, str):
            fields[key] = scrub(value)
        else:
            fields[key] = value
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        for key, value in extra_fields(record).items():
            line.setdefault(key, value)  # never let an extra field hide a standard one
        if record.exc_info:
            line["exception"] = scrub(self.formatException(record.exc_info))
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """The classic line, with extra fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = scrub(super().format(record))
        fields = extra_fields(record)
        if not fields:
            return text
        first, newline, rest = text.partition("\n")  # keep a traceback below the fields
        pairs = " ".join(f"{key}={value}" for key, value in fields.items())
        return f"{first} {pairs}{newline}{rest}"


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return TextFormatter()
    raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {log_format!r}")


def configure(level: str, log_format: str) -> None:
    """Send every log record to stderr in `log_format`, from `level` up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def announce(log_format: str, message: str, **fields: Any) -> None:
    """A line for whatever supervises the process (the listening port), whatever the
    log level: plain text, or a JSON log line in json mode."""
    if log_format == "json":
        record = logging.LogRecord("callcredit_server", logging.INFO, "", 0, message, (), None)
        record.__dict__.update(fields)
        print(JsonFormatter().format(record), file=sys.stderr, flush=True)
    else:
        print(message, file=sys.stderr, flush=True)
