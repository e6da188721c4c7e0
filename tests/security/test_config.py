"""Configuration: flags over environment over the --config file over defaults, and every
combination that cannot work refused at start with one line and exit code 2."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from callcredit_server.app import Settings, is_loopback, start
from callcredit_server.auth import hash_token
from callcredit_server.cli import app
from tests.security.conftest import TOKENS_TOML, Pki, write_config

EXIT_USAGE = 2
# No CALLCREDIT_* variable of the developer's shell may leak into these runs.
CLEAN_ENV: dict[str, str | None] = {
    name: None
    for name in (
        "CALLCREDIT_CONFIG", "CALLCREDIT_LISTEN", "CALLCREDIT_DATABASE_URL",
        "CALLCREDIT_GRANT_SECONDS", "CALLCREDIT_MAX_GRANT_SECONDS",
        "CALLCREDIT_VALIDITY_SECONDS", "CALLCREDIT_RETENTION_SECONDS",
        "CALLCREDIT_SNAPSHOT_DIR", "CALLCREDIT_SNAPSHOT_EVERY_RECORDS", "CALLCREDIT_LOG_LEVEL",
        "CALLCREDIT_TLS_CERT", "CALLCREDIT_TLS_KEY", "CALLCREDIT_TLS_CLIENT_CA",
        "CALLCREDIT_INSECURE",
    )
}  # fmt: skip


def run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env={**CLEAN_ENV, **(env or {})}, input=stdin)


def resolved(result: Result) -> dict[str, str]:
    assert result.exit_code == 0, result.output
    pairs = (line.split(" = ", 1) for line in result.stdout.splitlines() if " = " in line)
    return {key: value for key, value in pairs}


def test_defaults_are_todays_simple_server() -> None:
    settings = resolved(run("--check-config"))
    assert settings["listen"] == "'127.0.0.1:50051'"
    assert settings["tls_cert"] == "''"
    assert settings["insecure"] == "False"
    assert "token" not in run("--check-config").stdout


def test_flag_beats_environment_beats_file_beats_default(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        "grant_seconds = 30\nmax_grant_seconds = 300\nvalidity_seconds = 90\n"
        'log_level = "WARNING"\n',
    )
    settings = resolved(
        run(
            "--config", str(config), "--validity-seconds", "100", "--check-config",
            env={"CALLCREDIT_GRANT_SECONDS": "40", "CALLCREDIT_VALIDITY_SECONDS": "80"},
        )
    )  # fmt: skip
    assert settings["validity_seconds"] == "100"  # flag > env > file
    assert settings["grant_seconds"] == "40"  # env > file
    assert settings["max_grant_seconds"] == "300"  # file > default
    assert settings["log_level"] == "'WARNING'"  # file > default
    assert settings["retention_seconds"] == "86400"  # default
    # The file can be named by the environment too.
    from_env = resolved(run("--check-config", env={"CALLCREDIT_CONFIG": str(config)}))
    assert from_env["grant_seconds"] == "30"


def test_check_config_hides_the_database_password() -> None:
    url = "postgresql+psycopg://cc:s3cret-pw@db.internal/cc"
    settings = resolved(run("--database-url", url, "--check-config"))
    assert "s3cret-pw" not in settings["database_url"]
    assert "db.internal/cc" in settings["database_url"]


def test_a_flag_equal_to_the_default_still_beats_the_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, "grant_seconds = 30\n")
    settings = resolved(run("--config", str(config), "--grant-seconds", "60", "--check-config"))
    assert settings["grant_seconds"] == "60"


def test_tokens_and_tenants_come_from_the_file_and_print_by_name_only(tmp_path: Path) -> None:
    config = write_config(tmp_path, TOKENS_TOML)
    result = run("--config", str(config), "--check-config")
    assert result.exit_code == 0, result.output
    assert "token 'ops': role=admin" in result.stdout
    assert "token 'acme-dialers': role=dialer tenant=acme" in result.stdout
    assert "sha256" not in result.stdout


def _tls(pki: Pki) -> list[str]:
    return ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]


def test_non_loopback_needs_tls_and_tokens_or_insecure(tmp_path: Path, pki: Pki) -> None:
    config = str(write_config(tmp_path, TOKENS_TOML))
    result = run("--listen", "0.0.0.0:50051")
    assert result.exit_code == EXIT_USAGE
    assert result.stderr == (
        "error: --listen 0.0.0.0:50051 is not a loopback address: serving it needs TLS "
        "(--tls-cert, --tls-key) and tokens (--config), or --insecure to serve it without\n"
    )
    tls_only = run("--listen", "0.0.0.0:50051", *_tls(pki))
    assert tls_only.exit_code == EXIT_USAGE
    assert "needs tokens (--config), or --insecure" in tls_only.stderr
    tokens_only = run("--listen", "[::]:50051", "--config", config)
    assert tokens_only.exit_code == EXIT_USAGE
    assert "needs TLS (--tls-cert, --tls-key), or --insecure" in tokens_only.stderr
    assert run("--listen", "0.0.0.0:50051", *_tls(pki), "--config", config,
               "--check-config").exit_code == 0  # fmt: skip
    assert run("--listen", "0.0.0.0:50051", "--insecure", "--check-config").exit_code == 0
    assert run("--check-config", env={"CALLCREDIT_LISTEN": "10.1.2.3:1",
                                      "CALLCREDIT_INSECURE": "1"}).exit_code == 0  # fmt: skip


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.1:1", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("unix:/run/callcredit.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":50051", False),
        ("10.0.0.5:50051", False),
        ("callcredit.internal:50051", False),
    ],
)
def test_loopback_addresses(listen: str, loopback: bool) -> None:
    assert is_loopback(listen) is loopback


async def test_start_refuses_what_the_cli_refuses(tmp_path: Path) -> None:
    settings = Settings(listen="0.0.0.0:0", database_url=f"sqlite:///{tmp_path / 'j.db'}")
    with pytest.raises(ValueError, match="not a loopback address"):
        await start(settings)


BAD_FILES = [
    ("listen = [", "not valid TOML"),
    ("colour = 'blue'\n", "unknown key 'colour'"),
    ("tick_interval_ms = 20\n", "unknown key 'tick_interval_ms'"),
    ("grant_seconds = '60'\n", "grant_seconds must be an integer"),
    ("insecure = 1\n", "insecure must be true or false"),
    ("drain_seconds = '10'\n", "drain_seconds must be a number"),
    ('[[tokens]]\nname = "a"\nrole = "admin"\nhash = "sha256:abc"\n',
     "token 'a': 'hash' must be 'sha256:' followed by 64 lowercase hex digits"),
    (f'[[tokens]]\nname = "a"\nrole = "admin"\nhash = "{hash_token("x" * 20).upper()}"\n',
     "token 'a': 'hash' must be"),
    (f'[[tokens]]\nname = "a"\nrole = "root"\nhash = "{hash_token("x" * 20)}"\n',
     "token 'a': 'role' must be 'admin' or 'dialer'"),
    (f'[[tokens]]\nname = "a"\nrole = "dialer"\nhash = "{hash_token("x" * 20)}"\n',
     "token 'a': a dialer token needs 'tenant', one of [tenants.*]"),
    (f'[[tokens]]\nname = "a"\nrole = "dialer"\ntenant = "nope"\nhash = "{hash_token("x" * 20)}"\n',
     "token 'a': a dialer token needs 'tenant'"),
    (f'[tenants.t]\naccounts = ["a"]\n[[tokens]]\nname = "a"\nrole = "admin"\ntenant = "t"\n'
     f'hash = "{hash_token("x" * 20)}"\n', "token 'a': an admin token has no tenant"),
    (f'[[tokens]]\nname = "a"\nrole = "admin"\nhash = "{hash_token("x" * 20)}"\n'
     f'[[tokens]]\nname = "b"\nrole = "admin"\nhash = "{hash_token("x" * 20)}"\n',
     "token 'b': the same hash is configured twice"),
    (f'[[tokens]]\nname = "a"\nrole = "admin"\nhash = "{hash_token("x" * 20)}"\n'
     f'[[tokens]]\nname = "a"\nrole = "admin"\nhash = "{hash_token("y" * 20)}"\n',
     "token 'a': the name is used twice"),
    (f'[[tokens]]\nname = "a"\nrole = "admin"\nsecret = "x"\nhash = "{hash_token("x" * 20)}"\n',
     "token 'a': unknown key 'secret'"),
    ('[[tokens]]\nrole = "admin"\n', "tokens[0]: 'name' must be a non-empty string"),
    ("[tenants.t]\n", "tenants.t needs account_prefix and/or accounts"),
    ("[tenants.t]\naccounts = [1]\n", "tenants.t.accounts must be a list of account ids"),
    ("[tenants.t]\naccount_prefix = 5\n", "tenants.t.account_prefix must be a string"),
    ('[tenants.t]\naccount_prefix = "a"\nregion = "eu"\n', "tenants.t: unknown key 'region'"),
    ("tokens = 5\n", "'tokens' must be an array of [[tokens]] tables"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), BAD_FILES, ids=[m for _, m in BAD_FILES])
def test_each_bad_config_file_is_refused_in_one_line(
    tmp_path: Path, text: str, message: str
) -> None:
    config = write_config(tmp_path, text)
    result = run("--config", str(config))
    assert result.exit_code == EXIT_USAGE, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: --config {config}: ")
    assert message in line
    assert re.search("[0-9a-fA-F]{64}", line) is None  # a hash is never echoed back
    assert result.stdout == ""


@pytest.mark.parametrize("written", ["10", "10.0"])
def test_a_number_setting_takes_an_integer_or_a_float_from_the_file(
    tmp_path: Path, written: str
) -> None:
    config = write_config(tmp_path, f"drain_seconds = {written}\n")
    result = run("--config", str(config), "--check-config")
    assert result.exit_code == 0, result.output
    assert "drain_seconds = 10.0" in result.stdout.splitlines()


def test_a_missing_config_file_is_refused(tmp_path: Path) -> None:
    result = run("--config", str(tmp_path / "absent.toml"))
    assert result.exit_code == EXIT_USAGE
    assert result.stderr == (
        f"error: --config {tmp_path / 'absent.toml'}: cannot read it: No such file or directory\n"
    )


def test_each_bad_combination_of_flags_is_refused_in_one_line(tmp_path: Path, pki: Pki) -> None:
    cert, key, ca = str(pki.server_cert), str(pki.server_key), str(pki.ca)
    cases: list[tuple[list[str], str]] = [
        (["--tls-key", key], "--tls-cert and --tls-key go together: give both or neither"),
        (["--tls-cert", cert], "--tls-cert and --tls-key go together: give both or neither"),
        (["--tls-client-ca", ca], "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key"),
        (["--tls-cert", str(tmp_path / "no.pem"), "--tls-key", key],
         f"--tls-cert: cannot read {tmp_path / 'no.pem'}: No such file or directory"),
        (["--tls-cert", key, "--tls-key", key], f"--tls-cert: {key} holds no PEM CERTIFICATE"),
        (["--tls-cert", cert, "--tls-key", cert], f"--tls-key: {cert} holds no PEM PRIVATE KEY"),
        (["--log-level", "LOUD"],
         "--log-level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        (["--grant-seconds", "0"], "--grant-seconds must be between 1 and --max-grant-seconds"),
    ]  # fmt: skip
    for args, message in cases:
        result = run(*args)
        assert result.exit_code == EXIT_USAGE, (args, result.output)
        assert result.stderr == f"error: {message}\n", args


def test_several_problems_are_each_one_line() -> None:
    result = run("--listen", "0.0.0.0:1", "--tls-client-ca", "x.pem", "--grant-seconds", "0")
    assert result.exit_code == EXIT_USAGE
    lines = result.stderr.splitlines()
    assert len(lines) == 4 and all(line.startswith("error: --") for line in lines), lines


def test_the_help_documents_every_option() -> None:
    text = run("--help", env={"COLUMNS": "200"}).stdout
    for field in Settings.__dataclass_fields__:
        if field in ("tokens", "tick_interval_ms"):
            continue
        flag = "--" + field.replace("_", "-")
        assert flag in text, flag
        assert f"CALLCREDIT_{field.upper()}" in text, field
    assert "--config" in text and "CALLCREDIT_CONFIG" in text
    assert "--check-config" in text and "hash-token" in text


def test_hash_token_reads_stdin_and_generates() -> None:
    token = "a-long-enough-secret-token"
    result = run("hash-token", stdin=token + "\n")
    assert (result.exit_code, result.stdout) == (0, hash_token(token) + "\n")
    assert token not in result.stdout
    short = run("hash-token", stdin="short\n")
    assert short.exit_code == EXIT_USAGE and "at least 16 characters" in short.stderr
    generated = run("hash-token", "--generate")
    lines = dict(line.split(":", 1) for line in generated.stdout.splitlines())
    assert lines["hash"].strip() == hash_token(lines["token"].strip())
    assert len(lines["token"].strip()) >= 40
