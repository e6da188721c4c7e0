"""Assembly: recover the state from the journal, start the writer, serve gRPC.

`start(settings)` returns a `RunningServer` bound to its port (port 0 picks a
free one, as tests do); `RunningServer.stop()` drains and makes everything durable.

`Settings` is the one configuration model: `load_settings` merges flags and
environment (cli.py) over an optional TOML file over the defaults, and
`Settings.problems()` refuses what cannot work (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import logging
import os
import tomllib
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from sqlalchemy.engine import make_url

from callcredit.v1 import admin_pb2, credit_control_pb2
from callcredit_server.auth import Authenticator, AuthInterceptor, Token, tokens_from_config
from callcredit_server.changefeed import Changefeed
from callcredit_server.clock import wall_clock_ms
from callcredit_server.convert import GrantPolicy
from callcredit_server.core import COMPILED
from callcredit_server.handlers import register
from callcredit_server.journal import Journal
from callcredit_server.lease import Lease, LeaseSettings, Role
from callcredit_server.logs import JsonFormatter
from callcredit_server.metrics import Metrics, parse_listen
from callcredit_server.projector import FeedPoller, ProjectorProcess
from callcredit_server.recovery import recover
from callcredit_server.service import AdminServicer, CreditControlServicer
from callcredit_server.standby import HotStandby, PrimaryGate, new_owner
from callcredit_server.writer import Writer

log = logging.getLogger(__name__)

CREDIT_CONTROL_SERVICE = credit_control_pb2.DESCRIPTOR.services_by_name["CreditControlService"]
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]

T = TypeVar("T")

MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # a full 10,000-operation ControlRequest fits
HISTORY_READ_THREADS = 2
DEFAULT_DATABASE_URL = "sqlite:///./data/callcredit.db"
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DRAIN_POLL_SECONDS = 0.2  # how often a drain checks whether any call is still open
# A drain with no Control stream connected for this long ends: no dialer is left to
# serve. Longer than the dialer library's longest reconnect backoff (5 s).
DRAIN_IDLE_SECONDS = 6.0
MAX_DRAIN_SECONDS = 3_600


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server is configured with (see cli.py for flags and defaults)."""

    listen: str = "127.0.0.1:50051"
    database_url: str = DEFAULT_DATABASE_URL
    grant_seconds: int = 60
    max_grant_seconds: int = 600
    validity_seconds: int = 120
    retention_seconds: int = 86_400
    tick_interval_ms: int = 250
    snapshot_dir: str = ""  # "" = beside a SQLite journal, else the state directory
    snapshot_every_records: int = 100_000  # 0 = never
    event_loop: str = "auto"  # uvloop where installed, else asyncio
    log_level: str = "INFO"
    tls_cert: str = ""  # PEM certificate chain; TLS is on when set (with tls_key)
    tls_key: str = ""  # PEM private key of tls_cert
    tls_client_ca: str = ""  # PEM CA bundle: mutual TLS, clients need a cert it signed
    insecure: bool = False  # allow a non-loopback listen without TLS and tokens
    tokens: tuple[Token, ...] = ()  # from the config file only; none = no auth
    metrics_listen: str = ""  # HOST:PORT of the Prometheus exporter; "" = off
    drain_seconds: float = 30.0  # on SIGTERM: keep answering renewals/releases this long
    ha: bool = False  # hot standby: a primary and standbys on one PostgreSQL journal
    lease_seconds: float = 5.0  # --ha: the primary's lease (docs/operations.md)
    lease_renew_seconds: float = 1.0  # --ha: the primary renews it this often
    advertise: str = ""  # --ha: HOST:PORT clients should use; "" = --listen's

    @property
    def auth_enabled(self) -> bool:
        return bool(self.tokens)

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert)

    def lease_settings(self) -> LeaseSettings:
        return LeaseSettings(
            round(self.lease_seconds * 1000), round(self.lease_renew_seconds * 1000)
        )

    def snapshot_root(self, environ: Mapping[str, str] = os.environ) -> Path:
        """Where snapshots go: the flag, else beside a SQLite file, else the state
        directory, whatever the working directory: systemd's ``$STATE_DIRECTORY`` (a unit
        with ``StateDirectory=``), else ``$XDG_STATE_HOME/callcredit``, else
        ``~/.local/state/callcredit``; then ``snapshots/`` in it.

        Each journal keeps its snapshots in a subfolder named by its journal_id,
        so journals sharing a root can never read each other's snapshots.
        """
        if self.snapshot_dir:
            return Path(self.snapshot_dir)
        url = make_url(self.database_url)
        if url.get_backend_name() == "sqlite" and url.database:
            return Path(url.database).parent / "snapshots"
        # systemd may list several directories, separated by colons: the first is ours.
        state = environ.get("STATE_DIRECTORY", "").split(":")[0]
        if not state:
            xdg = Path(environ.get("XDG_STATE_HOME", ""))
            home = environ.get("HOME", "") or str(Path.home())
            # A relative XDG_STATE_HOME is invalid (XDG spec) and would depend on the cwd.
            base = xdg if xdg.is_absolute() else Path(home) / ".local" / "state"
            state = str(base / "callcredit")
        return Path(state) / "snapshots"

    def problems(self) -> list[str]:
        """What makes these settings unusable, in words for the operator."""
        out = []
        if not 1 <= self.max_grant_seconds <= 86_400:
            out.append("--max-grant-seconds must be between 1 and 86400")
        if not 1 <= self.grant_seconds <= self.max_grant_seconds:
            out.append("--grant-seconds must be between 1 and --max-grant-seconds")
        if not 1 <= self.validity_seconds <= 86_400:
            out.append("--validity-seconds must be between 1 and 86400")
        if self.retention_seconds < self.validity_seconds:
            out.append("--retention-seconds must be at least --validity-seconds")
        if not 10 <= self.tick_interval_ms <= 60_000:
            out.append("--tick-interval-ms must be between 10 and 60000")
        if self.event_loop not in EVENT_LOOPS:
            out.append("--event-loop must be auto, uvloop or asyncio")
        elif self.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
            out.append("--event-loop uvloop: uvloop is not installed (use asyncio)")
        if self.snapshot_every_records < 0:
            out.append("--snapshot-every-records must not be negative (0 turns snapshots off)")
        if self.log_level.upper() not in LOG_LEVELS:
            out.append(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        if bool(self.tls_cert) != bool(self.tls_key):
            out.append("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_client_ca and not (self.tls_cert and self.tls_key):
            out.append("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        for flag, path, marker in (
            ("--tls-cert", self.tls_cert, "CERTIFICATE-----"),
            ("--tls-key", self.tls_key, "PRIVATE KEY-----"),
            ("--tls-client-ca", self.tls_client_ca, "CERTIFICATE-----"),
        ):
            problem = _pem_problem(flag, path, marker) if path else None
            if problem:
                out.append(problem)
        if not (is_loopback(self.listen) or self.insecure):
            missing = [
                what
                for what, present in (
                    ("TLS (--tls-cert, --tls-key)", self.tls_enabled),
                    ("tokens (--config)", self.auth_enabled),
                )
                if not present
            ]
            if missing:
                out.append(
                    f"--listen {self.listen} is not a loopback address: serving it needs "
                    f"{' and '.join(missing)}, or --insecure to serve it without"
                )
        if self.metrics_listen and parse_listen(self.metrics_listen) is None:
            out.append("--metrics-listen must be HOST:PORT")
        if not 0 <= self.drain_seconds <= MAX_DRAIN_SECONDS:
            out.append(f"--drain-seconds must be between 0 and {MAX_DRAIN_SECONDS}")
        if self.ha:
            if make_url(self.database_url).get_backend_name() != "postgresql":
                out.append(
                    "--ha needs a PostgreSQL --database-url: the lease and the fencing "
                    "live in the journal's database, which every server must reach"
                )
            out.extend(self.lease_settings().problems())
            if self.advertise and parse_listen(self.advertise) is None:
                out.append("--advertise must be HOST:PORT")
        return out

    def describe(self) -> list[str]:
        """The settings as `key = value` lines, tokens by name only (--check-config)."""
        lines = [
            f"{f.name} = {getattr(self, f.name)!r}"
            for f in fields(self)
            if f.name not in ("tokens", "database_url")
        ]
        lines.insert(1, f"database_url = {_safe_url(self.database_url)!r}")  # no password
        for token in self.tokens:
            scope = f" tenant={token.tenant.name}" if token.tenant else ""
            lines.append(f"token {token.name!r}: role={token.role}{scope}")
        return lines


# Keys of the configuration file: the flags, with '_' for '-' (tick_interval_ms is
# for tests only), plus the [[tokens]] and [tenants.NAME] tables.
_FILE_KEYS: dict[str, type] = {
    f.name: type(getattr(Settings(), f.name))
    for f in fields(Settings)
    if f.name not in ("tokens", "tick_interval_ms")
}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def is_loopback(listen: str) -> bool:
    """Whether a --listen address can only be reached from this machine."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return True
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, "" or 0.0.0.0-like wildcard forms: reachable from outside
        return False


def _pem_problem(flag: str, path: str, marker: str) -> str | None:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"{flag}: cannot read {path}: {exc.strerror}"
    if marker not in text:
        return f"{flag}: {path} holds no PEM {marker.rstrip('-')}"
    return None


def read_config_file(path: str) -> tuple[dict[str, Any], tuple[Token, ...], list[str]]:
    """The settings a TOML file gives, its tokens, and its problems (one line each)."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        return {}, (), [f"--config {path}: cannot read it: {exc.strerror}"]
    except tomllib.TOMLDecodeError as exc:
        return {}, (), [f"--config {path}: not valid TOML: {exc}"]
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("tokens", "tenants"):
            continue
        expected = _FILE_KEYS.get(key)
        if expected is None:
            problems.append(f"--config {path}: unknown key {key!r}")
        elif type(value) is int and expected is float:
            values[key] = float(value)  # drain_seconds = 10: TOML reads 10 as an integer
        elif type(value) is not expected:
            problems.append(f"--config {path}: {key} must be {_TYPE_NAMES[expected]}")
        else:
            values[key] = value
    tokens, token_problems = tokens_from_config(data.get("tokens", []), data.get("tenants", {}))
    problems += [f"--config {path}: {problem}" for problem in token_problems]
    return values, tokens, problems


def load_settings(explicit: dict[str, Any], config: str = "") -> tuple[Settings, list[str]]:
    """Settings from flags and environment (`explicit`) over the file over the defaults.

    Returns the settings and every problem found (file first, then `problems()`).
    """
    values: dict[str, Any] = {}
    tokens: tuple[Token, ...] = ()
    problems: list[str] = []
    if config:
        values, tokens, problems = read_config_file(config)
        if problems:
            return Settings(), problems
    values.update(explicit)
    settings = Settings(**values, tokens=tokens)
    return settings, settings.problems()


def run_loop(event_loop: str, main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on the chosen event loop. uvloop runs the same asyncio code (grpc.aio
    included) with less CPU per message; see docs/benchmarks.md for the measurement."""
    if event_loop == "uvloop" or (
        event_loop == "auto" and importlib.util.find_spec("uvloop") is not None
    ):
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


@dataclass(slots=True)
class RunningServer:
    server: grpc.aio.Server
    port: int
    writer: Writer
    journal: Journal
    health: HealthServicer
    history: ThreadPoolExecutor
    control: CreditControlServicer | None = None
    metrics: Metrics | None = None
    standby: HotStandby | None = None  # --ha
    standby_task: asyncio.Task[None] | None = None
    projector: ProjectorProcess | None = None  # the changefeed's (projector.py)
    feed_task: asyncio.Task[None] | None = None

    async def drain(self, grace_seconds: float) -> None:
        """Health NOT_SERVING, refuse new reserves (UNAVAILABLE), and keep answering
        everything else until grace_seconds has passed, or no call is open, or no Control
        stream has been connected for DRAIN_IDLE_SECONDS. Then call stop()."""
        if self.standby is not None and self.standby.lease.role is not Role.PRIMARY:
            return  # a standby's (or deposed primary's) open calls are not its own
        await self.health.enter_graceful_shutdown()
        if self.control is not None:
            self.control.draining = True
        if self.metrics is not None:
            self.metrics.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds
        open_calls = self.writer.gauges().open_calls
        log.info(
            "draining: new reserves refused; up to %.0f s for %d open calls",
            grace_seconds,
            open_calls,
            extra={"drain_seconds": grace_seconds, "open_calls": open_calls},
        )
        idle_since = loop.time()
        while not self.writer.failed and loop.time() < deadline:
            open_calls = self.writer.gauges().open_calls
            if open_calls == 0:
                break
            if self.control is not None and self.control.open_streams:
                idle_since = loop.time()
            elif loop.time() - idle_since >= DRAIN_IDLE_SECONDS:
                break
            await asyncio.sleep(min(DRAIN_POLL_SECONDS, max(deadline - loop.time(), 0)))
        log.info("drain over: %d calls still open", open_calls, extra={"open_calls": open_calls})

    async def stop(self, grace_seconds: float = 5.0) -> None:
        if self.standby_task is not None:
            self.standby_task.cancel()  # no takeover, no renewal: this server is going
            await asyncio.gather(self.standby_task, return_exceptions=True)
        await self.health.enter_graceful_shutdown()
        stopping = asyncio.ensure_future(self.server.stop(grace_seconds))  # no new RPCs from now
        if self.control is not None:
            self.control.end_streams()  # each ends once its answers in flight are sent
        await stopping
        await self.writer.stop()
        if self.standby is not None:
            await self.standby.stopped()
        if self.feed_task is not None:
            self.feed_task.cancel()
            await asyncio.gather(self.feed_task, return_exceptions=True)
        if self.projector is not None:
            await asyncio.to_thread(self.projector.stop)
        self.history.shutdown(wait=True)
        self.journal.close()
        if self.metrics is not None:
            self.metrics.close()


async def start(
    settings: Settings, *, clock_ms: Callable[[], int] = wall_clock_ms
) -> RunningServer:
    """Bind settings.listen, recover, then serve. Raises if either fails.

    The port is bound first: a second server started by mistake fails there,
    before it reads (or writes) the journal that the first one owns.
    """
    problems = settings.problems()
    if problems:
        raise ValueError("; ".join(problems))
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if settings.tokens:
        interceptors.append(AuthInterceptor(Authenticator(settings.tokens)))
    gate = PrimaryGate() if settings.ha else None  # refuses RPCs until this is primary
    if gate is not None:
        interceptors.append(gate)
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.so_reuseport", 0),
        ],
    )
    credentials = _server_credentials(settings)
    if credentials is None:
        port = server.add_insecure_port(settings.listen)
    else:
        port = server.add_secure_port(settings.listen, credentials)
    owner = new_owner() if settings.ha else ""
    journal = Journal(settings.database_url, owner=owner)
    try:
        snapshot_dir = settings.snapshot_root() / journal.journal_id
        recovered = await asyncio.to_thread(recover, journal, snapshot_dir)
    except BaseException:
        journal.close()
        raise
    writer = Writer(
        recovered.machine,
        journal,
        clock_ms=clock_ms,
        retention_ms=settings.retention_seconds * 1000,
        tick_interval_seconds=settings.tick_interval_ms / 1000,
    )
    health = HealthServicer()
    history = ThreadPoolExecutor(HISTORY_READ_THREADS, thread_name_prefix="history")
    policy = GrantPolicy(
        settings.grant_seconds, settings.max_grant_seconds, settings.validity_seconds
    )
    metrics = Metrics()
    writer.observer = metrics
    metrics.watch(writer)
    # The writer builds no events: the projector derives them from the journal.
    recovered.machine.events = False
    feed = Changefeed(
        recovered.snapshot_seq + recovered.replayed,
        await asyncio.to_thread(journal.projected_through),
    )
    writer.on_durable = feed.durable
    writer.on_failure(lambda _: feed.close())
    metrics.feed = feed
    metrics.snapshot_dir = snapshot_dir
    control = CreditControlServicer(writer, policy, metrics)
    register(server, control, CREDIT_CONTROL_SERVICE, credit_control_pb2)
    admin = AdminServicer(writer, journal, history, metrics, feed)
    register(server, admin, ADMIN_SERVICE, admin_pb2)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    services = (
        CREDIT_CONTROL_SERVICE.full_name,
        ADMIN_SERVICE.full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(services, server)
    listen = parse_listen(settings.metrics_listen) if settings.metrics_listen else None
    if listen is not None:
        try:
            metrics_port = metrics.serve(*listen)
        except OSError as exc:
            journal.close()
            raise RuntimeError(f"cannot serve metrics on {settings.metrics_listen}: {exc}") from exc
        log.info(
            "metrics on http://%s:%d/metrics", listen[0], metrics_port, extra={"port": metrics_port}
        )
    if gate is None:
        writer.start()
    await server.start()
    loop = asyncio.get_running_loop()
    projector = ProjectorProcess(
        settings.database_url,
        snapshot_dir,
        settings.snapshot_every_records,
        settings.log_level,
        _log_format(),
    )
    projector.start()
    feed_task = loop.create_task(
        FeedPoller(journal, feed, history, projector).run(), name="changefeed-poll"
    )

    marking: set[asyncio.Task[None]] = set()

    async def mark_not_serving() -> None:
        for service in ("", *services[:2]):
            await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    def not_serving(_: BaseException) -> None:
        task = loop.create_task(mark_not_serving())
        marking.add(task)
        task.add_done_callback(marking.discard)

    writer.on_failure(not_serving)

    async def set_serving(serving: bool) -> None:
        serving_status = health_pb2.HealthCheckResponse.SERVING
        status = serving_status if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", *services[:2]):
            await health.set(service, status)

    standby = standby_task = None
    if gate is None:
        await set_serving(True)
    else:
        await set_serving(False)
        standby = HotStandby(
            Lease(settings.lease_settings(), owner),
            journal,
            recovered.machine,
            writer,
            gate,
            advertise=settings.advertise or f"{settings.listen.rpartition(':')[0]}:{port}",
            applied_seq=recovered.snapshot_seq + recovered.replayed,
            set_serving=set_serving,
        )
        standby_task = loop.create_task(standby.run(), name="hot-standby")
        log.info("hot standby: owner %s, waiting for the lease", owner, extra={"owner": owner})
    tls = "off" if not settings.tls_enabled else "mutual" if settings.tls_client_ca else "on"
    log.info(
        "callcredit serving on port %d, journal %s, TLS %s, auth %s, core %s",
        port,
        _safe_url(settings.database_url),
        tls,
        f"on ({len(settings.tokens)} tokens)" if settings.tokens else "off",
        "compiled (mypyc)" if COMPILED else "pure Python",
        extra={"core_compiled": COMPILED},
    )
    return RunningServer(
        server,
        port,
        writer,
        journal,
        health,
        history,
        control,
        metrics,
        standby,
        standby_task,
        projector,
        feed_task,
    )


def _log_format() -> str:
    """The log format this process was configured with (logs.configure), for its children."""
    handlers = logging.getLogger().handlers
    return "json" if any(isinstance(h.formatter, JsonFormatter) for h in handlers) else "text"


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from the PEM files, requiring client certificates when a client CA is set."""
    if not settings.tls_enabled:
        return None
    client_ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _safe_url(url: str) -> str:
    """The database URL without its password, for logs."""
    return make_url(url).render_as_string(hide_password=True)
