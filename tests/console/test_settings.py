"""The console's settings: where a login is required, what cannot start."""

from __future__ import annotations

from pathlib import Path

import pytest

from callcredit_server.console.settings import ConsoleSettings, load_settings


@pytest.mark.parametrize(
    ("listen", "login_required"),
    [
        pytest.param("127.0.0.1:8080", False, id="default"),
        pytest.param("localhost:8080", False, id="localhost"),
        pytest.param("[::1]:8080", False, id="ipv6-loopback"),
        pytest.param("127.0.0.2:8080", True, id="other-127"),
        pytest.param("0.0.0.0:8080", True, id="everywhere"),
        pytest.param("10.0.0.5:8080", True, id="lan"),
        pytest.param("console.internal:8080", True, id="a-name"),
    ],
)
def test_a_login_is_required_off_the_machines_own_address(
    listen: str, login_required: bool
) -> None:
    assert ConsoleSettings(listen=listen).login_required is login_required


def test_a_console_others_can_reach_needs_a_way_to_log_in() -> None:
    problems = ConsoleSettings(listen="0.0.0.0:8080").problems()
    assert len(problems) == 1 and "login" in problems[0]
    assert ConsoleSettings(listen="0.0.0.0:8080", token="t" * 20).problems() == []
    assert ConsoleSettings(listen="0.0.0.0:8080", operator_password_hash="scrypt:").problems() == []


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        pytest.param(ConsoleSettings(listen="8080"), "HOST:PORT", id="no-host"),
        pytest.param(ConsoleSettings(listen="h:99999"), "HOST:PORT", id="port-too-big"),
        pytest.param(ConsoleSettings(cert_file="c.pem"), "key_file", id="half-a-certificate"),
        pytest.param(ConsoleSettings(log_level="LOUD"), "--log-level", id="log-level"),
    ],
)
def test_settings_that_cannot_work_are_named(settings: ConsoleSettings, says: str) -> None:
    assert any(says in problem for problem in settings.problems())


def test_flags_beat_the_file_and_the_token_comes_from_its_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("admin-token-from-file\n")
    config = tmp_path / "console.toml"
    config.write_text(
        f'target = "server:50051"\nlisten = "0.0.0.0:9000"\ntls = true\n'
        f'token_file = "{token_file}"\noperator_password_hash = "scrypt:x:y"\n'
    )
    settings, problems = load_settings({"listen": "127.0.0.1:9001"}, str(config))
    assert problems == []
    assert settings.target == "server:50051" and settings.tls
    assert settings.listen == "127.0.0.1:9001"
    assert settings.token == "admin-token-from-file"
    assert settings.operator_password_hash == "scrypt:x:y"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        pytest.param('token = "secret"\n', "unknown keys token", id="token-in-the-file"),
        pytest.param('tls = "yes"\n', "wrong type for tls", id="wrong-type"),
        pytest.param("target = \n", "--config", id="not-toml"),
        pytest.param('token_file = "/nonexistent/token"\n', "token_file", id="no-token-file"),
    ],
)
def test_a_bad_file_is_named(tmp_path: Path, text: str, says: str) -> None:
    config = tmp_path / "console.toml"
    config.write_text(text)
    _, problems = load_settings({}, str(config))
    assert len(problems) == 1 and says in problems[0]
