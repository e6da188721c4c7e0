"""ListAccounts and ListTariffs on a real server: id order, filters, bounded pages,
opaque tokens that never repeat or skip an item, and refusals for what is not valid."""

from __future__ import annotations

import base64

import grpc
import pytest

from callcredit.v1 import admin_pb2
from tests.service.conftest import Harness

A = admin_pb2


async def _ids(h: Harness, **fields: object) -> list[list[str]]:
    """Every page of ListAccounts(fields), as the ids of each page."""
    pages: list[list[str]] = []
    token = ""
    while True:
        response = await h.admin.ListAccounts(A.ListAccountsRequest(page_token=token, **fields))  # type: ignore[arg-type]
        pages.append([a.account_id for a in response.accounts])
        token = response.next_page_token
        if not token:
            return pages


async def test_pages_in_id_order_filtered_by_prefix_and_status(harness: Harness) -> None:
    h = harness
    for account_id in ("beta", "acme-2", "acme-10", "acme-1", "zed"):
        await h.funded_account(account_id, 100)
    await h.admin.UpdateAccount(
        A.UpdateAccountRequest(account_id="acme-10", status=A.ACCOUNT_STATUS_SUSPENDED)
    )

    assert await _ids(h, page_size=2) == [["acme-1", "acme-10"], ["acme-2", "beta"], ["zed"]]
    assert await _ids(h, account_id_prefix="acme-") == [["acme-1", "acme-10", "acme-2"]]
    assert await _ids(h, status=A.ACCOUNT_STATUS_SUSPENDED) == [["acme-10"]]
    assert await _ids(h, account_id_prefix="nobody") == [[]]
    first = await h.admin.ListAccounts(A.ListAccountsRequest(page_size=1))
    assert first.accounts[0] == await h.account("acme-1")  # whole accounts, balances and all


async def test_a_token_goes_on_after_its_last_id_as_accounts_are_added(harness: Harness) -> None:
    h = harness
    for account_id in ("a", "c"):
        await h.funded_account(account_id, 0)
    first = await h.admin.ListAccounts(A.ListAccountsRequest(page_size=1))
    await h.funded_account("b", 0)  # after the page that holds "a": the next page has it

    second = await h.admin.ListAccounts(
        A.ListAccountsRequest(page_size=5, page_token=first.next_page_token)
    )

    assert [a.account_id for a in second.accounts] == ["b", "c"]
    assert second.next_page_token == ""


async def test_tariffs_page_without_their_rates(harness: Harness) -> None:
    h = harness
    for account_id in ("x", "y", "z"):
        await h.funded_account(account_id, 0)
    first = await h.admin.ListTariffs(A.ListTariffsRequest(page_size=2))
    second = await h.admin.ListTariffs(
        A.ListTariffsRequest(page_size=2, page_token=first.next_page_token)
    )

    assert list(first.tariffs) == [
        A.TariffSummary(tariff_id="t-x", currency="VND", rate_count=1),
        A.TariffSummary(tariff_id="t-y", currency="VND", rate_count=1),
    ]
    assert [t.tariff_id for t in second.tariffs] == ["t-z"]
    assert second.next_page_token == ""


def _token(text: bytes) -> str:
    return base64.urlsafe_b64encode(text).decode()


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (A.ListAccountsRequest(page_size=1001), "page_size"),
        (A.ListAccountsRequest(page_size=-1), "page_size"),
        (A.ListAccountsRequest(page_token="acme"), "page_token"),  # not one the server gave
        (A.ListAccountsRequest(page_token=_token(b"2:acme")), "page_token"),  # another version
        (A.ListAccountsRequest(page_token=_token(b"1:bad id")), "page_token"),
        (A.ListAccountsRequest(page_token="x" * 300), "page_token"),
        (A.ListAccountsRequest(account_id_prefix="a b"), "account_id_prefix"),
        (A.ListAccountsRequest(account_id_prefix="a" * 129), "account_id_prefix"),
        (A.ListAccountsRequest(status=9), "status"),  # type: ignore[arg-type]
    ],
)
async def test_invalid_requests_are_refused(
    harness: Harness, request_: A.ListAccountsRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.admin.ListAccounts(request_)

    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith(f"{field}: ")


async def test_invalid_tariff_pages_are_refused(harness: Harness) -> None:
    for request in (A.ListTariffsRequest(page_size=5000), A.ListTariffsRequest(page_token="?")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await harness.admin.ListTariffs(request)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
