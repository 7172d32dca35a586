"""gRPC channels to the services, with errors a person can act on.

TLS, the client certificate and the bearer token come from IEX_TLS_CA, IEX_TLS_CERT / IEX_TLS_KEY
and IEX_AUTH_TOKEN (services.common.security.ClientSettings).

Every channel has a subchannel of its own (`grpc.use_local_subchannel_pool`) and a probe that fails
closes its channel: by default gRPC shares one subchannel per address across the channels of a
process, so a failed first probe (`iex run` checks for a planner before it starts the stack) left
the next channel waiting out that subchannel's reconnect backoff, up to two minutes, against a
server that was serving by then.

When the planner does not answer, `diagnose` says why from the socket level: nothing listens
(connection refused), no answer to a TCP connect (timeout), a TLS server dialled in plaintext, a
plaintext server dialled with TLS, a certificate IEX_TLS_CA does not verify, or a server that
accepts connections but does not answer gRPC.
"""

from __future__ import annotations

import os
import socket
import ssl
from typing import Any

import grpc

from iex.v1 import planner_pb2_grpc
from services.common import security
from services.common.endpoints import LOOPBACK, SERVICE_PORTS
from services.common.settings import SettingsError

# Options of every channel the CLI opens.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (("grpc.use_local_subchannel_pool", 1),)
START_HINT = "run `iex stack up` (or `make up`) to start one"


class Unreachable(RuntimeError):
    pass


def planner_address() -> str:
    return os.environ.get("IEX_PLANNER_ADDR", f"{LOOPBACK}:{SERVICE_PORTS['planner'].grpc}")


def open_channel(address: str, config: Any | None = None) -> grpc.Channel:
    """A channel to `address` secured by the IEX_TLS_* / IEX_AUTH_TOKEN settings, with its own subchannel."""
    try:
        config = config if config is not None else security.client_settings()
        return security.client_channel(address, config, options=list(CHANNEL_OPTIONS))
    except SettingsError as exc:
        raise Unreachable(f"cannot set up the connection to {address}: {exc}") from None


def wait_ready(channel: grpc.Channel, address: str, config: Any, wait_s: float, what: str = "planner") -> None:
    """Returns once `channel` is connected; else closes it and raises Unreachable naming the cause."""
    future = grpc.channel_ready_future(channel)
    try:
        future.result(timeout=wait_s)
    except grpc.FutureTimeoutError:
        future.cancel()
        channel.close()
        raise Unreachable(f"{what} not reachable at {address}: {diagnose(address, config, wait_s)}") from None


def planner(address: str | None = None, wait_s: float = 5.0) -> planner_pb2_grpc.PlannerServiceStub:
    address = address or planner_address()
    try:
        config = security.client_settings()
    except SettingsError as exc:
        raise Unreachable(f"cannot set up the connection to {address}: {exc}") from None
    channel = open_channel(address, config)
    wait_ready(channel, address, config, wait_s)
    return planner_pb2_grpc.PlannerServiceStub(channel)


# --------------------------------------------------------------------------------------------
# Why a server does not answer


def split_address(address: str) -> tuple[str, int] | None:
    """(host, port) of `host:port`, `[v6]:port` or `dns:///host:port`; None for other targets (unix:, ...)."""
    target = address.strip()
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(prefix):
            target = target[len(prefix) :]
            break
    if "://" in target or target.startswith("unix:"):
        return None
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or LOOPBACK, int(port)


def _tls_context(config: Any | None) -> ssl.SSLContext:
    """A client context verifying against IEX_TLS_CA and presenting the client certificate, as gRPC would."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_alpn_protocols(["h2"])
    ca = getattr(config, "tls_ca", "").strip()
    context.load_verify_locations(cafile=ca)
    cert, key = getattr(config, "tls_cert", "").strip(), getattr(config, "tls_key", "").strip()
    if cert and key:
        context.load_cert_chain(cert, key)
    return context


def _handshake(host: str, port: int, context: ssl.SSLContext, server_name: str, timeout_s: float) -> str:
    """'ok', 'plaintext' (the peer does not speak TLS), 'timeout', or 'verify: <reason>' / 'error: <reason>'."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            raw.settimeout(timeout_s)
            with context.wrap_socket(raw, server_hostname=server_name) as tls:
                # Under TLS 1.3 a refused client certificate shows up as an alert on the first read.
                tls.settimeout(min(0.5, timeout_s))
                try:
                    tls.recv(1)
                except (socket.timeout, TimeoutError, ssl.SSLWantReadError):
                    pass
                except ssl.SSLError as exc:
                    return f"error: {exc.reason or exc}"
                return "ok"
    except ssl.SSLCertVerificationError as exc:
        return f"verify: {exc.verify_message or exc.reason}"
    except ssl.SSLError as exc:
        reason = (exc.reason or str(exc)).upper()
        if any(marker in reason for marker in ("WRONG_VERSION_NUMBER", "RECORD_LAYER", "PACKET_LENGTH_TOO_LONG", "UNEXPECTED_EOF", "HTTP_REQUEST")):
            return "plaintext"
        return f"error: {exc.reason or exc}"
    except (socket.timeout, TimeoutError):
        return "timeout"
    except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, EOFError):
        return "plaintext"
    except OSError as exc:
        return f"error: {exc.strerror or exc}"


def _speaks_tls(host: str, port: int, timeout_s: float) -> str:
    """The handshake outcome without verifying anything: does the peer speak TLS at all?"""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    return _handshake(host, port, context, host, timeout_s)


def diagnose(address: str, config: Any | None, waited_s: float, timeout_s: float = 2.0) -> str:
    """One sentence on why a gRPC channel to `address` did not connect, and what to do."""
    tls = bool(getattr(config, "tls_ca", "").strip())
    mode = "with TLS (IEX_TLS_CA set)" if tls else "in plaintext"
    parsed = split_address(address)
    if parsed is None:
        return f"no connection {mode} within {waited_s:.0f} s; {START_HINT}"
    host, port = parsed
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except socket.gaierror as exc:
        return f"cannot resolve host {host!r} ({exc.strerror or exc}); check the address"
    except ConnectionRefusedError:
        return f"connection refused: nothing listens on {host}:{port}; {START_HINT}"
    except (socket.timeout, TimeoutError):
        return f"timeout: no answer to a TCP connect to {host}:{port} in {timeout_s:.0f} s (a firewall, or the wrong host); check the address"
    except OSError as exc:
        return f"cannot connect to {host}:{port} ({exc.strerror or exc}); check the address"

    speaks = _speaks_tls(host, port, timeout_s)
    if not tls:
        if speaks == "ok":
            return "it serves TLS and this client dialled in plaintext: set IEX_TLS_CA to the CA that signed its certificate"
        return (
            f"a process accepts TCP connections on {host}:{port} but did not answer gRPC in plaintext within {waited_s:.0f} s: "
            "is it the planner, and is it overloaded? (`iex stack status`, its log under .iex/logs/)"
        )
    if speaks == "plaintext":
        return "it does not speak TLS (a plaintext server) and this client dialled with TLS: unset IEX_TLS_CA, or serve TLS"
    if speaks != "ok":
        return f"a process accepts TCP connections on {host}:{port} but no TLS handshake completed within {timeout_s:.0f} s ({speaks})"
    server_name = getattr(config, "tls_server_name", "").strip() or host
    try:
        context = _tls_context(config)
    except (OSError, ssl.SSLError) as exc:
        return f"cannot load the TLS files ({exc}); check IEX_TLS_CA / IEX_TLS_CERT / IEX_TLS_KEY"
    verified = _handshake(host, port, context, server_name, timeout_s)
    if verified.startswith("verify:"):
        return (
            f"its TLS certificate is not accepted ({verified.removeprefix('verify: ')}): check that IEX_TLS_CA signed it "
            f"and that it names {server_name!r} (IEX_TLS_SERVER_NAME)"
        )
    if verified.startswith("error:"):
        hint = "" if getattr(config, "tls_cert", "").strip() else "; if it requires client certificates, set IEX_TLS_CERT and IEX_TLS_KEY"
        return f"the TLS handshake failed ({verified.removeprefix('error: ')}){hint}"
    return f"TLS works but no gRPC answer came within {waited_s:.0f} s: is it the planner, and is it overloaded? (`iex stack status`)"
