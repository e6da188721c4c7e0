"""Who may call what: bearer tokens, roles and tenant scopes, checked by one interceptor.

A request carries ``authorization: Bearer <token>`` in its gRPC metadata. The server
knows each token only by its SHA-256 (``sha256:<hex>`` in the configuration file,
``callcredit-server hash-token`` makes one), so the file and the logs never hold a
usable secret. A presented token is hashed and compared with *every* configured hash
with ``hmac.compare_digest``: how long the check takes says nothing about how close a
guess came, nor which token matched.

Roles:

- ``admin`` tokens may call AdminService, and only it;
- ``dialer`` tokens may call CreditControlService, and only it, on the accounts of
  their tenant (an account-id prefix and/or an explicit list of account ids); and
  AdminService.WatchEvents, which then sends only their tenant's events.

Roles do not overlap: an admin token cannot dial (PERMISSION_DENIED), so a token kept
by operators is never needed on a dialer host, and a leaked dialer token cannot move
money. An operator who needs to place a test call uses a dialer token.

Health and reflection stay open (load balancers and ``grpcurl list`` need no token).
No token, an unknown token, or a malformed header: UNAUTHENTICATED. The right token
on the wrong service: PERMISSION_DENIED. Both carry an ErrorInfo (``UNAUTHENTICATED``
or ``PERMISSION_DENIED``) like every other refusal.

The tenant check itself is not here: Reserve names its account, so the servicer checks
it; Renew and Release name only a call, whose account the writer alone knows, so the
writer refuses them before the state machine sees them. Both read the tenant of the
RPC from `current_tenant()`, set by the interceptor (grpc.aio runs an RPC's
interceptors and handler in one fresh contextvars.Context).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeAlias

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status

from callcredit_server.errors import permission_denied, unauthenticated

log = logging.getLogger(__name__)

HASH_PREFIX = "sha256:"
_HASH_PATTERN = re.compile(r"sha256:[0-9a-f]{64}")
MIN_TOKEN_LENGTH = 16  # hash-token refuses shorter ones: an unsalted hash of a guessable
# token could be reversed by trying candidates; random tokens (--generate) cannot.

ADMIN_SERVICE = "callcredit.v1.AdminService"
DIALER_SERVICE = "callcredit.v1.CreditControlService"
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


class Role(StrEnum):
    ADMIN = "admin"
    DIALER = "dialer"


_SERVICE_ROLES = {ADMIN_SERVICE: Role.ADMIN, DIALER_SERVICE: Role.DIALER}
# The one admin method a dialer token may call too: it sees only its tenant's accounts.
TENANT_SCOPED_METHODS = frozenset({f"/{ADMIN_SERVICE}/WatchEvents"})


@dataclass(frozen=True, slots=True)
class Tenant:
    """The accounts a dialer token may act on: ids starting with a prefix, and/or a list.

    ``account_prefix = ""`` covers every account (one tenant: the whole server).
    """

    name: str
    account_prefix: str | None = None
    accounts: frozenset[str] = frozenset()

    def allows(self, account_id: str) -> bool:
        if account_id in self.accounts:
            return True
        return self.account_prefix is not None and account_id.startswith(self.account_prefix)


@dataclass(frozen=True, slots=True)
class Token:
    """A configured token: its name (for logs), role, tenant (dialers) and hash."""

    name: str
    role: Role
    digest: bytes = field(repr=False)  # SHA-256 of the token
    tenant: Tenant | None = None


def hash_token(token: str) -> str:
    """The form the configuration file stores: ``sha256:<64 hex digits>``."""
    return HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A random token (256 bits), URL-safe so it fits a header and a shell variable."""
    return secrets.token_urlsafe(32)


def parse_token_hash(text: str) -> bytes:
    """The digest of a ``sha256:<hex>`` string; ValueError if it is not one."""
    if not _HASH_PATTERN.fullmatch(text):
        raise ValueError("must be 'sha256:' followed by 64 lowercase hex digits")
    return bytes.fromhex(text.removeprefix(HASH_PREFIX))


_current_tenant: ContextVar[Tenant | None] = ContextVar("callcredit_tenant", default=None)


def current_tenant() -> Tenant | None:
    """The tenant of the dialer token of the RPC being served (None: no auth, any account)."""
    return _current_tenant.get()


def tokens_from_config(tokens: object, tenants: object) -> tuple[tuple[Token, ...], list[str]]:
    """Tokens from the configuration file's ``[[tokens]]`` and ``[tenants.NAME]`` tables.

    Returns the tokens and the problems found, one line each (the file is refused if
    there is any). Never echoes a hash back: a message names the token instead.
    """
    problems: list[str] = []
    known: dict[str, Tenant] = {}
    if not isinstance(tenants, Mapping):
        return (), ["'tenants' must be a table of [tenants.NAME] tables"]
    for name, table in tenants.items():
        if not isinstance(table, Mapping):
            problems.append(f"tenants.{name} must be a table")
            continue
        unknown = sorted(set(table) - {"account_prefix", "accounts"})
        if unknown:
            problems.append(f"tenants.{name}: unknown key {unknown[0]!r}")
            continue
        prefix = table.get("account_prefix")
        accounts = table.get("accounts", [])
        if prefix is not None and not isinstance(prefix, str):
            problems.append(f"tenants.{name}.account_prefix must be a string")
            continue
        if not isinstance(accounts, list) or not all(isinstance(a, str) for a in accounts):
            problems.append(f"tenants.{name}.accounts must be a list of account ids")
            continue
        if prefix is None and not accounts:
            problems.append(f"tenants.{name} needs account_prefix and/or accounts")
            continue
        known[str(name)] = Tenant(str(name), prefix, frozenset(accounts))
    if not isinstance(tokens, list):
        return (), [*problems, "'tokens' must be an array of [[tokens]] tables"]
    out: list[Token] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for index, entry in enumerate(tokens):
        where = f"tokens[{index}]"
        if not isinstance(entry, Mapping):
            problems.append(f"{where} must be a table")
            continue
        name = entry.get("name")
        if isinstance(name, str) and name:
            where = f"token {name!r}"
        else:
            problems.append(f"{where}: 'name' must be a non-empty string")
            continue
        unknown = sorted(set(entry) - {"name", "role", "hash", "tenant"})
        if unknown:
            problems.append(f"{where}: unknown key {unknown[0]!r}")
            continue
        if name in names:
            problems.append(f"{where}: the name is used twice")
            continue
        names.add(name)
        try:
            role = Role(str(entry.get("role")))
        except ValueError:
            problems.append(f"{where}: 'role' must be 'admin' or 'dialer'")
            continue
        raw_hash = entry.get("hash")
        try:
            digest = parse_token_hash(raw_hash if isinstance(raw_hash, str) else "")
        except ValueError as exc:
            problems.append(f"{where}: 'hash' {exc} (see callcredit-server hash-token)")
            continue
        if digest in digests:
            problems.append(f"{where}: the same hash is configured twice")
            continue
        digests.add(digest)
        tenant_name = entry.get("tenant")
        tenant: Tenant | None = None
        if role is Role.ADMIN and tenant_name is not None:
            problems.append(f"{where}: an admin token has no tenant (it acts on every account)")
            continue
        if role is Role.DIALER:
            if not isinstance(tenant_name, str) or tenant_name not in known:
                problems.append(f"{where}: a dialer token needs 'tenant', one of [tenants.*]")
                continue
            tenant = known[tenant_name]
        out.append(Token(name, role, digest, tenant))
    return tuple(out), problems


class Authenticator:
    """Finds the configured token a presented one is, comparing every hash in constant time."""

    def __init__(self, tokens: Sequence[Token]) -> None:
        self._tokens = tuple(tokens)

    def identify(self, presented: str) -> Token | None:
        digest = hashlib.sha256(presented.encode()).digest()
        found: Token | None = None
        for token in self._tokens:  # no early exit: the time does not depend on the match
            if hmac.compare_digest(digest, token.digest):
                found = token
        return found


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header, or None."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            token = token.strip()
            if scheme.lower() == "bearer" and token:
                return token
            return None
    return None


_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]]"


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Admits an RPC whose token has the role its service needs; refuses the rest."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> _Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: UNIMPLEMENTED, as without auth
            return None
        method: str = handler_call_details.method
        service = method.split("/")[1] if method.count("/") == 2 else ""
        if service in OPEN_SERVICES:
            return handler
        presented = bearer_token(handler_call_details.invocation_metadata)
        token = self._authenticator.identify(presented) if presented is not None else None
        if token is None:
            why = "no bearer token" if presented is None else "unknown bearer token"
            log.warning("refused %s: %s", method, why)
            return refusing(
                handler, unauthenticated(f"{why}: send 'authorization: Bearer <token>'")
            )
        role = _SERVICE_ROLES.get(service)
        if token.role is not role and not (
            token.role is Role.DIALER and method in TENANT_SCOPED_METHODS
        ):
            log.warning("refused %s: token %r has role %s", method, token.name, token.role)
            return refusing(
                handler, permission_denied(f"a {token.role} token may not call {service}")
            )
        _current_tenant.set(token.tenant)
        return handler


def refusing(handler: _Handler, status: status_pb2.Status) -> _Handler:
    """A handler of the same shape as `handler` that only aborts with `status`."""
    error = rpc_status.to_status(status)

    async def refuse(_: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort_with_status(error)

    deserialize = handler.request_deserializer
    serialize = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, deserialize, serialize)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, deserialize, serialize)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, deserialize, serialize)
    return grpc.unary_unary_rpc_method_handler(refuse, deserialize, serialize)
