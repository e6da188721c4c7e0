"""The console's web application: Starlette routes over an AdminClient.

Pages are rendered on the server (Jinja2); htmx re-reads the live part of a page when
the page's server-sent-event stream (``/live``) says its account changed, so a change
shows within a second without a reload. Forms are plain HTML forms, each answered by a
confirmation page, then by a redirect to the account (post/redirect/get).

Every request passes ``guard`` first: a session cookie for everyone, a login where the
settings require one, and headers that keep the pages out of frames and caches. Every
POST route reads its form through ``_posted``, which refuses it without the session's
CSRF token.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from callcredit.admin import AdminClient
from callcredit.errors import CallcreditError
from callcredit.money import format_amount, format_price
from callcredit.v1 import admin_pb2
from callcredit_server.clock import wall_clock_ms
from callcredit_server.console import forms
from callcredit_server.console.burndown import History, burndown_chart
from callcredit_server.console.feed import Changes, Feed, Replays
from callcredit_server.console.security import (
    LoginBrake,
    Sessions,
    check_password,
    csrf_ok,
    csrf_token,
    secret_matches,
)
from callcredit_server.console.settings import ConsoleSettings

__all__ = ["MAX_LIVE_STREAMS", "create_app"]

log = logging.getLogger("callcredit.console")

SESSION_COOKIE = "callcredit_console"
MAX_LIVE_STREAMS = 200
"""Open /live streams (browser tabs); more are answered 503."""
LIVE_MIN_GAP_SECONDS = 0.5
"""A tab is told of changes at most twice a second, however busy its account."""
LIVE_HEARTBEAT_SECONDS = 15.0
"""A comment line this often keeps proxies from closing an idle stream."""
ACCOUNTS_PAGE_SIZE = 50
CALLS_PAGE_SIZE = 20
ENTRIES_PAGE_SIZE = 50
OPEN_CALLS_SHOWN = 100
"""Open calls listed on an account page (the header counts them all)."""

_DONE_NOTICES = {
    "top_up": "Top-up applied.",
    "adjust": "Adjustment applied.",
    "active": "Account resumed.",
    "suspended": "Account suspended.",
}
_STATIC = Path(__file__).parent / "static"
_HTTP_STATUS = {
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 503,
}
"""The page's HTTP status for a server's refusal; any other refusal is 409 Conflict."""


def _status_name(status: admin_pb2.AccountStatus.ValueType) -> str:
    return admin_pb2.AccountStatus.Name(status).removeprefix("ACCOUNT_STATUS_").lower()


def _call_state(state: admin_pb2.CallState.ValueType) -> str:
    return admin_pb2.CallState.Name(state).removeprefix("CALL_STATE_").lower()


def _entry_kind(kind: admin_pb2.EntryKind.ValueType) -> str:
    name = admin_pb2.EntryKind.Name(kind).removeprefix("ENTRY_KIND_")
    return name.replace("_", " ").lower()


def _when(stamp: Timestamp | int) -> str:
    """A timestamp (or milliseconds) as UTC wall time; "" when unset."""
    milliseconds = stamp if isinstance(stamp, int) else stamp.ToMilliseconds()
    if not milliseconds:
        return ""
    moment = datetime.datetime.fromtimestamp(milliseconds / 1000, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: int) -> str:
    hours, rest = divmod(max(0, seconds), 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


class _State:
    """What the routes share: the settings, the admin client, the feed's products and the
    security state. Built by create_app, opened and closed by the app's lifespan."""

    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        self.secret = secrets.token_bytes(32)
        self.sessions = Sessions()
        self.brake = LoginBrake()
        self.history = History()
        self.changes = Changes()
        self.live_streams = 0
        self.admin: AdminClient | None = None
        self.replays_: Replays | None = None
        self.templates = Environment(
            loader=PackageLoader("callcredit_server.console", "templates"),
            autoescape=select_autoescape(default=True),
            auto_reload=False,
        )
        self.templates.filters.update(
            money=format_amount,
            price=format_price,
            when=_when,
            status_name=_status_name,
            call_state=_call_state,
            entry_kind=_entry_kind,
            duration=_duration,
        )

    @property
    def client(self) -> AdminClient:
        if self.admin is None:
            raise RuntimeError("the console's admin client is used outside its lifespan")
        return self.admin

    @property
    def replays(self) -> Replays:
        if self.replays_ is None:
            raise RuntimeError("the console's replays are used outside its lifespan")
        return self.replays_


def create_app(
    settings: ConsoleSettings, on_started: Callable[[], None] = lambda: None
) -> Starlette:
    """The console for ``settings``. Its lifespan opens the channel to the server and
    follows the changefeed (nothing is contacted before), then calls ``on_started``."""
    state = _State(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        admin = AdminClient(
            settings.target,
            token=settings.token,
            tls=settings.tls,
            ca_file=settings.ca_file,
            cert_file=settings.cert_file,
            key_file=settings.key_file,
        )
        state.admin = admin
        state.replays_ = replays = Replays(admin, state.history, state.changes)
        feed = Feed(admin, state.history, state.changes, clock_ms=wall_clock_ms)
        follower = asyncio.create_task(feed.run(), name="changefeed")
        try:
            on_started()
            yield
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            await replays.close()
            await admin.close()

    def render(request: Request, name: str, status_code: int = 200, **values: Any) -> HTMLResponse:
        session_id: str = request.state.session_id
        body = state.templates.get_template(name).render(
            csrf=csrf_token(state.secret, session_id),
            logged_in=request.state.logged_in,
            login_required=request.state.login_required,
            **values,
        )
        return HTMLResponse(body, status_code=status_code)

    def refused(request: Request, error: CallcreditError, back: str) -> HTMLResponse:
        status_code = _HTTP_STATUS.get(error.code, 409)
        unreachable = status_code == 503
        return render(
            request,
            "problem.html",
            status_code=status_code,
            title="The server did not answer" if unreachable else "The server refused",
            reason=error.reason,
            message=error.message,
            back=back,
        )

    def unfit(request: Request, error: forms.FormError, back: str) -> HTMLResponse:
        return render(
            request, "problem.html", 400, title="Check the form", message=error.message, back=back
        )

    async def guard(request: Request, call_next: RequestResponseEndpoint) -> Response:
        now_ms = wall_clock_ms()
        session_id = request.cookies.get(SESSION_COOKIE)
        fresh = session_id is None
        if session_id is None:
            session_id = secrets.token_urlsafe(32)
        request.state.session_id = session_id
        request.state.logged_in = state.sessions.active(session_id, now_ms)
        request.state.login_required = settings.login_required or _proxied(request)
        path = request.url.path
        response: Response
        if (
            request.state.login_required
            and not request.state.logged_in
            and path != "/login"
            and not path.startswith("/static/")
        ):
            if request.method == "GET" and path != "/live":
                response = RedirectResponse("/login", status_code=303)
            else:
                response = HTMLResponse("Log in first.", status_code=401)
        else:
            response = await call_next(request)
        if fresh:
            _set_session_cookie(request, response, session_id)
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
        )
        return response

    async def home(request: Request) -> Response:
        return RedirectResponse("/accounts", status_code=303)

    async def accounts_page(request: Request) -> Response:
        return await _accounts(request, "accounts.html")

    async def accounts_table(request: Request) -> Response:
        return await _accounts(request, "accounts_table.html")

    async def _accounts(request: Request, template: str) -> Response:
        query = request.query_params.get("q", "").strip()
        status = request.query_params.get("status", "")
        page = request.query_params.get("page", "")
        status_value = {
            "active": admin_pb2.ACCOUNT_STATUS_ACTIVE,
            "suspended": admin_pb2.ACCOUNT_STATUS_SUSPENDED,
            "closed": admin_pb2.ACCOUNT_STATUS_CLOSED,
        }.get(status, admin_pb2.ACCOUNT_STATUS_UNSPECIFIED)
        try:
            listing = await state.client.list_accounts(
                account_id_prefix=query,
                status=status_value,
                page_size=ACCOUNTS_PAGE_SIZE,
                page_token=page,
            )
        except CallcreditError as exc:
            return refused(request, exc, "/accounts")
        return render(
            request,
            template,
            accounts=list(listing.accounts),
            next_page=listing.next_page_token,
            q=query,
            status=status,
            page=page,
        )

    async def _account_view(account_id: str) -> dict[str, Any]:
        client = state.client
        version = state.changes.version  # before reading: a change while reading is told
        account = await client.get_account(account_id)
        open_calls = await client.list_calls(account_id, active_only=True, limit=OPEN_CALLS_SHOWN)
        now_ms = wall_clock_ms()
        state.replays.ensure(account_id, now_ms)
        chart = burndown_chart(
            state.history.points(account_id, now_ms),
            now_ms=now_ms,
            available=account.available,
            seconds_until_empty=(
                account.seconds_until_empty if account.HasField("seconds_until_empty") else None
            ),
        )
        return {
            "account": account,
            "open_calls": list(open_calls.calls),
            "chart": chart,
            "version": version,
        }

    async def account_page(request: Request) -> Response:
        account_id = request.path_params["account_id"]
        calls_page = request.query_params.get("calls_page", "")
        after = request.query_params.get("after", "0")
        after_entry_id = int(after) if after.isdigit() and len(after) < 19 else 0
        try:
            view = await _account_view(account_id)
            calls = await state.client.list_calls(
                account_id, limit=CALLS_PAGE_SIZE, page_token=calls_page
            )
            entries = await state.client.list_entries(
                account_id,
                after_entry_id=after_entry_id,
                limit=ENTRIES_PAGE_SIZE,
                newest_first=True,
            )
        except CallcreditError as exc:
            return refused(request, exc, "/accounts")
        return render(
            request,
            "account.html",
            **view,
            calls=list(calls.calls),
            next_calls_page=calls.next_page_token,
            entries=entries,
            next_after=entries[-1].entry_id if len(entries) == ENTRIES_PAGE_SIZE else None,
            request_after=after_entry_id,
            notice=_DONE_NOTICES.get(request.query_params.get("done", "")),
            top_up_key=forms.new_idempotency_key(),
            adjust_key=forms.new_idempotency_key(),
        )

    async def account_live(request: Request) -> Response:
        try:
            view = await _account_view(request.path_params["account_id"])
        except CallcreditError as exc:
            return refused(request, exc, "/accounts")
        return render(request, "account_live.html", **view)

    async def live(request: Request) -> Response:
        """Server-sent events: ``changed`` whenever the account (or, without
        ``?account=``, any account) changed; the page then re-reads what it shows.
        ``?version=`` is the version of the changes the page was drawn at: a change
        between drawing it and opening this stream is told at once."""
        if state.live_streams >= MAX_LIVE_STREAMS:
            return Response("Too many live pages open.", status_code=503)
        account_id = request.query_params.get("account") or None
        drawn_at = request.query_params.get("version", "")

        async def events() -> AsyncIterator[str]:
            # Counted from here, not before: a stream cut before it starts never gets here.
            state.live_streams += 1
            try:
                version = state.changes.version
                if drawn_at.isdigit() and len(drawn_at) < 19:
                    version = min(version, int(drawn_at))
                yield "retry: 1000\n\n"
                while True:
                    try:
                        latest = await asyncio.wait_for(
                            state.changes.wait(version), LIVE_HEARTBEAT_SECONDS
                        )
                    except TimeoutError:
                        yield ": heartbeat\n\n"
                        continue
                    if state.changes.changed_since(account_id, version):
                        yield "event: changed\ndata: \n\n"
                        await asyncio.sleep(LIVE_MIN_GAP_SECONDS)
                    version = latest
            finally:
                state.live_streams -= 1

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def money_action(request: Request, kind: forms.MoneyKind) -> Response:
        account_id = request.path_params["account_id"]
        back = f"/accounts/{quote(account_id)}"
        form = await _posted(request, state.secret)
        if form is None:
            return _forbidden()
        try:
            account = await state.client.get_account(account_id)
        except CallcreditError as exc:
            return refused(request, exc, back)
        action = forms.parse_money_form(kind, form, account.currency)
        if isinstance(action, forms.FormError):
            return unfit(request, action, back)
        if not action.confirmed:
            return render(
                request,
                "confirm.html",
                question=action.describe(account_id, account.currency) + "?",
                action=request.url.path,
                fields={
                    "amount": form.get("amount", ""),
                    "note": action.note,
                    "idempotency_key": action.idempotency_key,
                },
                back=back,
            )
        try:
            if kind is forms.MoneyKind.top_up:
                await state.client.top_up(
                    account_id,
                    action.amount,
                    idempotency_key=action.idempotency_key,
                    reference=action.note,
                )
            else:
                await state.client.adjust(
                    account_id,
                    action.amount,
                    idempotency_key=action.idempotency_key,
                    reason=action.note,
                )
        except CallcreditError as exc:
            return refused(request, exc, back)
        log.info("%s of %d on %s (key %s)", kind, action.amount, account_id, action.idempotency_key)
        return RedirectResponse(f"{back}?done={kind}", status_code=303)

    async def top_up(request: Request) -> Response:
        return await money_action(request, forms.MoneyKind.top_up)

    async def adjust(request: Request) -> Response:
        return await money_action(request, forms.MoneyKind.adjust)

    async def set_status(request: Request) -> Response:
        account_id = request.path_params["account_id"]
        back = f"/accounts/{quote(account_id)}"
        form = await _posted(request, state.secret)
        if form is None:
            return _forbidden()
        action = forms.parse_status_form(form)
        if isinstance(action, forms.FormError):
            return unfit(request, action, back)
        if not action.confirmed:
            return render(
                request,
                "confirm.html",
                question=action.describe(account_id) + "?",
                action=request.url.path,
                fields={"status": action.status.value},
                back=back,
            )
        status = (
            admin_pb2.ACCOUNT_STATUS_ACTIVE
            if action.status is forms.StatusChoice.active
            else admin_pb2.ACCOUNT_STATUS_SUSPENDED
        )
        try:
            await state.client.update_account(account_id, status=status)
        except CallcreditError as exc:
            return refused(request, exc, back)
        log.info("status of %s set to %s", account_id, action.status)
        return RedirectResponse(f"{back}?done={action.status}", status_code=303)

    async def login_page(request: Request) -> Response:
        if request.state.logged_in or not request.state.login_required:
            return RedirectResponse("/accounts", status_code=303)
        return render(
            request, "login.html", no_login=not (settings.token or settings.operator_password_hash)
        )

    async def login(request: Request) -> Response:
        now_ms = wall_clock_ms()
        wait_ms = state.brake.wait_ms(now_ms)
        if wait_ms:
            message = f"Too many failed logins; try again in {wait_ms // 1000 + 1} s."
            return render(request, "login.html", 429, error=message)
        form = await _posted(request, state.secret)
        if form is None:
            return _forbidden()
        secret = form.get("secret", "")
        stored = settings.operator_password_hash
        valid = secret_matches(secret, settings.token) or (
            stored is not None and await asyncio.to_thread(check_password, secret, stored)
        )
        if not valid:
            state.brake.failed(now_ms)
            log.warning(
                "failed console login from %s", request.client.host if request.client else "?"
            )
            return render(request, "login.html", 401, error="That is not the password.")
        session_id = secrets.token_urlsafe(32)  # a new id at login: no session fixation
        state.sessions.log_out(request.state.session_id)
        state.sessions.log_in(session_id, now_ms)
        response = RedirectResponse("/accounts", status_code=303)
        _set_session_cookie(request, response, session_id)
        return response

    async def logout(request: Request) -> Response:
        if await _posted(request, state.secret) is None:
            return _forbidden()
        state.sessions.log_out(request.state.session_id)
        after = "/login" if request.state.login_required else "/"
        response = RedirectResponse(after, status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    routes = [
        Route("/", home),
        Route("/accounts", accounts_page),
        Route("/accounts-table", accounts_table),
        Route("/accounts/{account_id}", account_page),
        Route("/accounts/{account_id}/live", account_live),
        Route("/accounts/{account_id}/top-up", top_up, methods=["POST"]),
        Route("/accounts/{account_id}/adjust", adjust, methods=["POST"]),
        Route("/accounts/{account_id}/status", set_status, methods=["POST"]),
        Route("/live", live),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Mount("/static", StaticFiles(directory=_STATIC), name="static"),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=guard)],
        lifespan=lifespan,
    )


MAX_FORM_BYTES = 16_384
MAX_FORM_FIELDS = 20
"""A console form is a few short fields; a larger one is refused unread."""


def _forbidden() -> Response:
    return HTMLResponse("Forbidden: the form has expired; reload the page.", status_code=403)


async def _posted(request: Request, secret: bytes) -> Mapping[str, str] | None:
    """The fields of a POSTed form, or None when it does not carry its session's CSRF
    token (or is not a small form): every POST route reads its form through here."""
    length = request.headers.get("content-length", "")
    if not length.isdigit() or int(length) > MAX_FORM_BYTES:
        return None
    form = await request.form(max_files=0, max_fields=MAX_FORM_FIELDS)
    fields = {key: value for key, value in form.items() if isinstance(value, str)}
    if not csrf_ok(secret, request.cookies.get(SESSION_COOKIE), fields.get("csrf")):
        return None
    return fields


def _proxied(request: Request) -> bool:
    """Whether a proxy forwarded the request: then it may come from anywhere, and a
    console on loopback behind a reverse proxy still asks for the login."""
    return any(name in request.headers for name in _FORWARDING_HEADERS)


_FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")


def _set_session_cookie(request: Request, response: Response, session_id: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
