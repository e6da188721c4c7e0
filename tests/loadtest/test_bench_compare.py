"""A short run of loadtest/bench_compare.py: every system runs the workload and passes its
correctness check, and the check catches a design that overdraws. No timing assertions."""

from __future__ import annotations

import shutil

import pytest

from loadtest.baselines.workload import RESERVE_HOLD
from loadtest.bench_compare import Options, Report, _parse, run
from tests.conftest import POSTGRES_ENV, postgres_url
from tests.loadtest.helpers import REDIS, redis_answers


def _options(system: str, **changes: object) -> Options:
    """About a second per variant, a few calls, a small spread layout."""
    options = Options(
        seconds=1.0,
        warmup=0.2,
        calls=20,
        renews=(2,),
        accounts=50,
        only=(system,),
        quiet=True,
        use_uvloop=False,
        raise_errors=True,
        pg_url=postgres_url() or "",
        database_url=(postgres_url() or "") if system == "callcredit-pg" else "",
        redis_url=f"redis://{REDIS[0]}:{REDIS[1]}/0",
        redis_clients=4,
        redis_pipelines=2,
    )
    for name, value in changes.items():
        setattr(options, name, value)
    return options


def _skip_unavailable(system: str) -> None:
    if system in ("postgres", "callcredit-pg") and postgres_url() is None:
        pytest.skip(f"{POSTGRES_ENV} not set: the PostgreSQL runs are skipped")
    if system == "redis" and not redis_answers():
        pytest.skip(f"no Redis answers on {REDIS[0]}:{REDIS[1]}: the Redis design is skipped")
    if system == "redis-aof" and shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed: the private AOF Redis is skipped")


def _describe(report: Report) -> str:
    return "\n".join(f"{r.key} {r.layout}: {r.problems}" for r in report.results)


@pytest.mark.parametrize(
    "system", ["callcredit", "callcredit-pg", "postgres", "redis", "redis-aof", "echo"]
)
async def test_every_system_runs_the_workload_and_adds_up(system: str) -> None:
    _skip_unavailable(system)
    report = await run(_options(system))
    assert not report.skipped
    modes = {"callcredit": 3, "callcredit-pg": 3, "echo": 3, "postgres": 1}.get(system, 2)
    assert len(report.results) == 2 * modes  # both layouts
    for result in report.results:
        assert result.ops > 0, result
        assert result.calls > 0, result
        assert result.refused == 0, result
        assert result.check_ok, _describe(report)


@pytest.mark.parametrize("system", ["postgres", "redis"])
async def test_the_check_catches_a_design_that_overdraws(system: str) -> None:
    """Without the balance condition, concurrent calls on the hot account each hold money
    that is not there, and their charges take the balance below zero."""
    _skip_unavailable(system)
    tiny = 5 * RESERVE_HOLD
    report = await run(_options(system, layouts=("hot",), hot_balance=tiny, unsafe=True))
    assert report.results
    for result in report.results:
        assert not result.check_ok, result
        assert any(problem.startswith("overdraft") for problem in result.problems), result


@pytest.mark.parametrize("system", ["callcredit", "postgres", "redis"])
async def test_refusals_on_a_small_balance_still_add_up(system: str) -> None:
    """The same tiny hot account with the balance condition: reserves are refused, and
    every run still passes the check."""
    _skip_unavailable(system)
    tiny = 5 * RESERVE_HOLD
    report = await run(_options(system, layouts=("hot",), hot_balance=tiny))
    assert report.results
    for result in report.results:
        assert result.refused > 0, result
        assert result.check_ok, _describe(report)


async def test_modes_picks_the_grpc_modes_that_run() -> None:
    options, _ = _parse(["--only", "callcredit", "--modes", "dialer", "--layouts", "hot"])
    assert options.modes == ("dialer",)
    report = await run(_options("callcredit", layouts=("hot",), modes=options.modes))
    assert [r.mode for r in report.results] == ["batched: DialerClient x 1 (1 stream each)"]
    assert report.results[0].check_ok, _describe(report)


def test_modes_refuses_an_unknown_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse(["--modes", "dialer,pipelined"])
    assert "--modes takes a comma-separated subset of single,dialer,batched" in (
        capsys.readouterr().err
    )
