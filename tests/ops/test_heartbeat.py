"""The dialer library finds a stream that went silent without closing, and reconnects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from callcredit.dialer import DialerClient
from tests.ops.blackhole import BlackholeProxy
from tests.ops.conftest import scrape
from tests.service.conftest import Harness

INTERVAL_SECONDS = 0.3
TIMEOUT_SECONDS = 0.5


@pytest.fixture
async def proxy(harness: Harness) -> AsyncIterator[BlackholeProxy]:
    proxy = BlackholeProxy("127.0.0.1", harness.running.port)
    await proxy.start()
    yield proxy
    await proxy.close()


def streams_opened(seen: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    return seen["callcredit_control_streams_opened_total", ()]


async def test_a_black_holed_stream_is_detected_and_calls_continue_on_a_new_one(
    harness: Harness, proxy: BlackholeProxy
) -> None:
    metrics = harness.running.metrics
    assert metrics is not None
    await harness.funded_account("acc", 1_000)
    async with DialerClient(
        f"127.0.0.1:{proxy.port}",
        heartbeat_interval_seconds=INTERVAL_SECONDS,
        heartbeat_timeout_seconds=TIMEOUT_SECONDS,
    ) as dialer:
        call = await dialer.reserve("c-1", "acc", "84901234567")
        call.answered()
        # A quiet but healthy stream: the server answers every probe, nothing reconnects.
        await asyncio.sleep(4 * (INTERVAL_SECONDS + TIMEOUT_SECONDS))
        assert streams_opened(await scrape(metrics.port)) == 1
        assert proxy.accepted == 1

        loop = asyncio.get_running_loop()
        silenced_at = loop.time()
        assert proxy.silence() == 1
        async with asyncio.timeout(10):
            while proxy.accepted < 2:  # the library opened a new connection  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        detected_after = loop.time() - silenced_at
        # Found within interval + timeout (+ one interval for the last answer's age).
        assert detected_after < 2 * INTERVAL_SECONDS + TIMEOUT_SECONDS + 1.0
        # The call is re-attached to the new stream by a Renew (the first: its grant
        # would not need one for 55 s), then goes on and is released.
        renewed = ("callcredit_operations_total", (("kind", "renew"), ("outcome", "OK")))
        async with asyncio.timeout(10):
            while (await scrape(metrics.port)).get(renewed, 0) < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert streams_opened(await scrape(metrics.port)) == 2
        result = await asyncio.wait_for(call.release(7), 10)

    assert (result.call_id, result.charged) == ("c-1", 7)
    account = await harness.account("acc")
    assert (account.balance, account.reserved) == (993, 0)
