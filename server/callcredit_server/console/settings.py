"""The console's settings: flags over environment over its TOML file over defaults.

A configuration file (``--config``) may hold every flag's key (``target``, ``listen``,
``tls``, ``ca_file``, ``cert_file``, ``key_file``, ``log_level``) and two that are only
there: ``operator_password_hash`` (from ``callcredit-console hash-password``) and
``token_file`` (a file holding the admin token, so the token itself is in neither the
configuration nor the process list)::

    target = "callcredit.internal:50051"
    listen = "10.0.0.5:8080"
    ca_file = "/etc/callcredit/ca.pem"
    token_file = "/etc/callcredit/console.token"
    operator_password_hash = "scrypt:9f1c...:41d2..."
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from callcredit.admin import check_tls_options

__all__ = ["DEFAULT_LISTEN", "DEFAULT_TARGET", "LOOPBACK_HOSTS", "ConsoleSettings", "load_settings"]

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_LISTEN = "127.0.0.1:8080"
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
"""Where the console serves without a login: the machine's own default addresses. Other
127/8 addresses need the login too, since they are what port forwards and containers
are given to reach from elsewhere."""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_FILE_ONLY = ("operator_password_hash", "token_file")


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    target: str = DEFAULT_TARGET
    listen: str = DEFAULT_LISTEN
    token: str | None = None
    token_file: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    operator_password_hash: str | None = None
    log_level: str = "INFO"

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def login_required(self) -> bool:
        """Anywhere but the machine's own default addresses, people must log in."""
        return self.host.lower() not in LOOPBACK_HOSTS

    def problems(self) -> list[str]:
        """Settings that cannot work, one sentence each (none: the console may start)."""
        problems: list[str] = []
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65_535:
            problems.append(f"--listen {self.listen!r} is not HOST:PORT")
        elif self.login_required and not (self.token or self.operator_password_hash):
            problems.append(
                f"--listen {self.listen} is not on {', '.join(LOOPBACK_HOSTS)}, so the console "
                "needs a login: set operator_password_hash in --config (callcredit-console "
                "hash-password), or give the admin token"
            )
        try:
            check_tls_options(
                self.target,
                tls=self.tls,
                ca_file=self.ca_file,
                cert_file=self.cert_file,
                key_file=self.key_file,
            )
        except ValueError as exc:
            problems.append(str(exc))
        if self.log_level.upper() not in LOG_LEVELS:
            problems.append(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        return problems


def load_settings(explicit: dict[str, Any], config: str = "") -> tuple[ConsoleSettings, list[str]]:
    """Settings from ``explicit`` (flags and environment that were given) over the file.

    Returns the settings and every problem found; a token file is read here.
    """
    values: dict[str, Any] = {}
    if config:
        try:
            values = tomllib.loads(Path(config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            return ConsoleSettings(), [f"--config {config}: {exc}"]
        known = {field.name for field in fields(ConsoleSettings)} - {"token"}
        unknown = sorted(set(values) - known)
        if unknown:
            return ConsoleSettings(), [f"--config {config}: unknown keys {', '.join(unknown)}"]
        wrong = [
            key
            for key, value in values.items()
            if not isinstance(value, bool if key == "tls" else str)
        ]
        if wrong:
            return ConsoleSettings(), [f"--config {config}: wrong type for {', '.join(wrong)}"]
    values.update({key: value for key, value in explicit.items() if key not in _FILE_ONLY})
    settings = ConsoleSettings(**values)
    if settings.token_file and not settings.token:
        try:
            token = Path(settings.token_file).read_text().strip()
        except OSError as exc:
            return settings, [f"token_file: {exc}"]
        settings = replace(settings, token=token or None)
    return settings, settings.problems()
