"""Why a client cannot reach its server, in words an operator can act on.

gRPC reports a connection that never came up as ``UNAVAILABLE`` with a detail such as
"Socket closed", or not at all (a stream that waits for the server just waits). When a
client gives up on a connection (after ``connect_timeout_seconds``, default
``DEFAULT_CONNECT_TIMEOUT_SECONDS``), it asks ``diagnose`` what is wrong: one short
look with plain sockets at the name, the TCP port and the TLS handshake, bounded by
``PROBE_TIMEOUT_SECONDS``. ``explain`` turns what the look found into the sentence the
error carries, e.g.::

    cannot reach 127.0.0.1:50051: connection refused (is the server running?)
    cannot reach 127.0.0.1:50051: the server expects TLS (pass --tls, or --ca-file with its CA)

The probes do the I/O; ``explain`` decides, from their results alone.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import ssl
from dataclasses import dataclass

import grpc

from callcredit.errors import CallcreditError

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_SECONDS",
    "PROBE_TIMEOUT_SECONDS",
    "Probe",
    "Reach",
    "diagnose",
    "explain",
    "split_target",
    "unreachable_error",
]

DEFAULT_CONNECT_TIMEOUT_SECONDS = 10.0
"""How long a client waits for a connection (and its first answer) before an operation
fails with the cause: long enough to ride out a server restart, short enough that a
wrong address or a stopped server is reported within a human's patience."""

PROBE_TIMEOUT_SECONDS = 3.0
"""The most the diagnosis itself may take (name lookup, TCP connect, TLS handshake)."""


class Reach(enum.Enum):
    """How far a plain-socket look at the target got."""

    NOT_PROBED = "not probed"  # a target form other than HOST:PORT (unix:, dns:///...)
    NO_NAME = "no name"  # the host name does not resolve
    REFUSED = "refused"  # nothing listens on the port
    SILENT = "silent"  # the TCP connect got no answer (firewall, wrong host)
    NETWORK = "network"  # another socket error (no route, network down)
    TCP_ONLY = "tcp only"  # TCP connects; the TLS handshake fails: not a TLS server
    TLS_UNTRUSTED = "tls untrusted"  # a TLS server whose certificate this client refuses
    TLS_OK = "tls ok"  # a TLS server this client's settings accept


@dataclass(frozen=True, slots=True)
class Probe:
    """What the look found; ``detail`` is the socket or TLS library's own words."""

    reach: Reach
    detail: str = ""


def split_target(target: str) -> tuple[str, int] | None:
    """``HOST:PORT`` or ``[IPV6]:PORT`` as (host, port); None for other gRPC target forms."""
    host, colon, port = target.rpartition(":")
    if not colon or not port.isascii() or not port.isdigit() or not host or "/" in host:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return None
    number = int(port)
    return (host, number) if 0 < number < 65_536 else None


def explain(target: str, probe: Probe, *, tls: bool) -> str:
    """The sentence naming why ``target`` could not be reached, from the probe alone."""
    reach, detail = probe.reach, probe.detail
    if reach is Reach.NO_NAME:
        cause = f"DNS failure: the host name does not resolve ({detail})"
    elif reach is Reach.REFUSED:
        cause = "connection refused (is the server running, on this port?)"
    elif reach is Reach.SILENT:
        cause = "no answer to the TCP connection (a firewall, or the wrong host?)"
    elif reach is Reach.NETWORK:
        cause = f"network error: {detail}"
    elif reach is Reach.TCP_ONLY:
        cause = (
            f"TLS handshake failed: the server does not speak TLS ({detail}); drop --tls"
            if tls
            else "the port accepts connections but does not answer gRPC (not a callcredit server?)"
        )
    elif reach is Reach.TLS_UNTRUSTED:
        cause = (
            f"TLS handshake failed: the server's certificate is not trusted ({detail}); "
            "pass --ca-file with the CA that signed it"
            if tls
            else "the server expects TLS (pass --tls, or --ca-file with its CA)"
        )
    elif reach is Reach.TLS_OK:
        cause = (
            "the TLS handshake succeeds but the server drops the connection "
            "(a client certificate it does not accept? see --cert-file/--key-file)"
            if tls
            else "the server expects TLS (pass --tls, or --ca-file with its CA)"
        )
    else:
        cause = f"not connected{f' ({detail})' if detail else ''}"
    return f"cannot reach {target}: {cause}"


def unreachable_error(target: str, probe: Probe, *, tls: bool) -> CallcreditError:
    """The error an operation fails with when its connection never came up."""
    return CallcreditError(
        "UNAVAILABLE", explain(target, probe, tls=tls), grpc.StatusCode.UNAVAILABLE
    )


async def diagnose(
    target: str,
    *,
    tls: bool,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    timeout_seconds: float = PROBE_TIMEOUT_SECONDS,
) -> Probe:
    """Look at ``target`` with plain sockets: name, TCP port, TLS handshake (which the
    client's own CA and certificate settings must accept, to tell "not trusted" apart)."""
    address = split_target(target)
    if address is None:
        return Probe(Reach.NOT_PROBED)
    host, port = address
    try:
        async with asyncio.timeout(timeout_seconds):
            return await _probe(host, port, ca_file, cert_file, key_file, timeout_seconds / 2)
    except TimeoutError:
        return Probe(Reach.SILENT)


async def _probe(
    host: str,
    port: int,
    ca_file: str | None,
    cert_file: str | None,
    key_file: str | None,
    handshake_seconds: float,
) -> Probe:
    """A handshake that takes longer than ``handshake_seconds`` counts as "not TLS": a
    plaintext server may wait for more bytes of what it takes for a malformed request."""
    loop = asyncio.get_running_loop()
    try:
        await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        return Probe(Reach.NO_NAME, str(err.strerror or err))
    try:
        _, writer = await asyncio.open_connection(host, port)
    except ConnectionRefusedError:
        return Probe(Reach.REFUSED)
    except OSError as err:
        return Probe(Reach.NETWORK, str(err.strerror or err))
    writer.transport.abort()
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(["h2"])
    if cert_file and key_file:
        context.load_cert_chain(cert_file, key_file)
    try:
        _, writer = await asyncio.open_connection(
            host, port, ssl=context, server_hostname=host, ssl_handshake_timeout=handshake_seconds
        )
    except ssl.SSLCertVerificationError as err:
        return Probe(Reach.TLS_UNTRUSTED, str(err.verify_message))
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError, EOFError) as err:
        return Probe(Reach.TCP_ONLY, getattr(err, "reason", None) or type(err).__name__)
    writer.transport.abort()
    return Probe(Reach.TLS_OK)
