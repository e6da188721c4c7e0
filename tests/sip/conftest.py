"""The SIP lab as fixtures: skipped without Kamailio and SIPp, except under CI=true."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from callcredit.admin import AdminClient
from callcredit_server.launch import ServerProcess, serving
from tests.conftest import missing_component
from tests.sip.lab import UNIT_PER_SECOND, Lab, carrier, free_port, kamailio, tool

GRANT_SECONDS = 5
"""The server's grant size: short, so calls renew several times within a few seconds."""

VALIDITY_SECONDS = 10


@pytest.fixture(autouse=True)
def sip_tools() -> None:
    missing = [name for name in ("kamailio", "sipp") if tool(name) is None]
    if not missing:
        return
    missing_component(
        f"{' and '.join(missing)} not installed (apt-get install kamailio sip-tester)"
    )


class Authority:
    """callcredit-server on a fixed port, which a test may kill and start again."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port(socket.SOCK_STREAM)
        self.target = f"127.0.0.1:{self.port}"
        self._stack = contextlib.ExitStack()
        self._process: ServerProcess | None = None
        self._starts = 0

    def start(self) -> None:
        self._starts += 1
        args = [
            "--listen",
            self.target,
            "--database-url",
            f"sqlite:///{self.folder / 'journal.db'}",
            "--grant-seconds",
            str(GRANT_SECONDS),
            "--validity-seconds",
            str(VALIDITY_SECONDS),
            "--log-level",
            "WARNING",
        ]
        log = self.folder / f"server-{self._starts}.log"
        self._stack = contextlib.ExitStack()
        self._process = self._stack.enter_context(serving(args, log, kill=True))

    def kill(self) -> None:
        self._stack.close()
        self._process = None

    def pause(self) -> None:
        """SIGSTOP: requests reach it and wait, unanswered, until `resume`."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGCONT)


@pytest.fixture
def authority(tmp_path: Path) -> Iterator[Authority]:
    server = Authority(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def lab(authority: Authority, tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path, authority.target)
    with kamailio(lab), carrier(lab) as lab.carrier:
        lab.start_adapter()
        try:
            yield lab
        finally:
            lab.kill_adapter()


@pytest.fixture
async def admin(authority: Authority) -> AsyncIterator[AdminClient]:
    async with AdminClient(authority.target) as client:
        await client.put_tariff("per-second", "USD", [UNIT_PER_SECOND])
        yield client
