"""The notifier's TOML configuration file (docs/operations.md shows one)."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from callcredit_server.notify.delivery import Endpoint, RetryPolicy

MAX_ENDPOINTS = 1_000
_KINDS = frozenset(
    {
        "ACCOUNT_CREATED",
        "ACCOUNT_UPDATED",
        "BALANCE_CHANGED",
        "CALL_STARTED",
        "CALL_ENDED",
        "LOW_BALANCE",
        "BALANCE_RESTORED",
    }
)
_TOP_KEYS = frozenset({"target", "token_env", "tls", "ca_file", "state", "delivery", "endpoints"})
_DELIVERY_KEYS = frozenset(
    {"max_attempts", "first_retry_seconds", "max_retry_seconds", "timeout_seconds", "concurrency"}
)
_ENDPOINT_KEYS = frozenset(
    {"name", "url", "secret", "secret_env", "accounts", "account_prefix", "kinds"}
)


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or wrong; the message says where."""


@dataclass(frozen=True, slots=True)
class NotifyConfig:
    target: str
    token: str | None
    tls: bool
    ca_file: str | None
    state: Path
    retry: RetryPolicy
    timeout_seconds: float
    concurrency: int
    endpoints: tuple[Endpoint, ...]


def load(path: str | Path, environ: dict[str, str] | None = None) -> NotifyConfig:
    """Read and check the file; ConfigError names every problem found."""
    env = dict(os.environ) if environ is None else environ
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    problems: list[str] = []
    _unknown(problems, "", data, _TOP_KEYS)
    delivery = data.get("delivery", {})
    if not isinstance(delivery, dict):
        problems.append("delivery must be a table")
        delivery = {}
    _unknown(problems, "delivery.", delivery, _DELIVERY_KEYS)
    retry = RetryPolicy(
        max_attempts=_number(problems, delivery, "max_attempts", 8, 1, 100, int),
        first_retry_seconds=_number(problems, delivery, "first_retry_seconds", 1.0, 0.01, 3600.0),
        max_retry_seconds=_number(problems, delivery, "max_retry_seconds", 300.0, 0.01, 86400.0),
    )
    timeout_seconds = _number(problems, delivery, "timeout_seconds", 10.0, 0.01, 300.0)
    concurrency = _number(problems, delivery, "concurrency", 8, 1, 256, int)
    token_env = data.get("token_env", "CALLCREDIT_TOKEN")
    endpoints = _endpoints(problems, data.get("endpoints", []), env)
    target = data.get("target")
    if not isinstance(target, str) or not target:
        problems.append("target (the server, HOST:PORT) is required")
    state = data.get("state", "callcredit-notify.db")
    if not isinstance(state, str):
        problems.append("state must be a path")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return NotifyConfig(
        target=str(target),
        token=env.get(str(token_env)) or None,
        tls=bool(data.get("tls", False)),
        ca_file=data.get("ca_file"),
        state=(Path(path).parent / str(state)),
        retry=retry,
        timeout_seconds=timeout_seconds,
        concurrency=concurrency,
        endpoints=tuple(endpoints),
    )


def _unknown(problems: list[str], where: str, table: dict[str, Any], known: frozenset[str]) -> None:
    for key in sorted(set(table) - known):
        problems.append(f"unknown key {where}{key}")


def _number(
    problems: list[str],
    table: dict[str, Any],
    key: str,
    default: Any,
    low: float,
    high: float,
    kind: type = float,
) -> Any:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        problems.append(f"delivery.{key} must be a number from {low} to {high}")
        return default
    return kind(value)


def _endpoints(problems: list[str], raw: Any, env: dict[str, str]) -> list[Endpoint]:
    if not isinstance(raw, list) or len(raw) > MAX_ENDPOINTS:
        problems.append(f"endpoints must be at most {MAX_ENDPOINTS} [[endpoints]] tables")
        return []
    out: list[Endpoint] = []
    for i, table in enumerate(raw):
        where = f"endpoints[{i}]"
        if not isinstance(table, dict):
            problems.append(f"{where} must be a table")
            continue
        _unknown(problems, f"{where}.", table, _ENDPOINT_KEYS)
        name, url = table.get("name"), table.get("url")
        secret = table.get("secret") or env.get(str(table.get("secret_env", "")), "")
        if not isinstance(name, str) or not name:
            problems.append(f"{where}.name is required")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            problems.append(f"{where}.url must be an http:// or https:// URL")
        if not isinstance(secret, str) or len(secret) < 16:
            problems.append(f"{where} needs a secret (or secret_env) of 16 characters or more")
        kinds = table.get("kinds", [])
        if not isinstance(kinds, list) or not set(kinds) <= _KINDS:
            problems.append(f"{where}.kinds must list names from {sorted(_KINDS)}")
            kinds = []
        accounts = table.get("accounts", [])
        if not isinstance(accounts, list) or not all(isinstance(a, str) for a in accounts):
            problems.append(f"{where}.accounts must be a list of account ids")
            accounts = []
        prefix = table.get("account_prefix", "")
        if not isinstance(prefix, str):
            problems.append(f"{where}.account_prefix must be a string")
            prefix = ""
        out.append(
            Endpoint(
                str(name), str(url), str(secret), frozenset(accounts), prefix, frozenset(kinds)
            )
        )
    names = [e.name for e in out]
    if len(set(names)) != len(names):
        problems.append("endpoint names must be unique")
    return out
