"""The CLI's channels: a failed first probe does not slow the next one, and an unreachable planner is
explained by its real cause (connection refused, timeout, TLS on one side only, a certificate)."""

from __future__ import annotations

import socket
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from services.common import endpoints
from services.cli import client
from services.common.security import ClientSettings


def _server(address: str, credentials: grpc.ServerCredentials | None = None) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    if credentials is None:
        server.add_insecure_port(address)
    else:
        server.add_secure_port(address, credentials)
    server.start()
    return server


@pytest.fixture
def plaintext(monkeypatch):
    for var in ("IEX_TLS_CA", "IEX_TLS_CERT", "IEX_TLS_KEY", "IEX_TLS_SERVER_NAME", "IEX_AUTH_TOKEN"):
        monkeypatch.delenv(var, raising=False)


def test_a_failed_first_probe_does_not_delay_the_next_channel(plaintext):
    """Issue 18's first-run failure: `iex run` probes the planner before starting the stack; that
    failed probe used to leave the shared subchannel in reconnect backoff, and the next call, against
    a planner that was serving by then, timed out. With a subchannel per channel it connects at once."""
    address = f"127.0.0.1:{endpoints.free_listen_port()}"
    with pytest.raises(client.Unreachable, match="connection refused"):
        client.planner(address, wait_s=2.0)
    # Long enough for gRPC's backoff (1 s, x1.6, +-20%) to reach several seconds between attempts.
    time.sleep(8.0)
    server = _server(address)
    try:
        started = time.monotonic()
        stub = client.planner(address, wait_s=5.0)
        took = time.monotonic() - started
        assert stub is not None
        assert took < 2.0, f"the channel took {took:.1f} s to connect to a serving planner"
    finally:
        server.stop(0)


def test_nothing_listening_is_connection_refused(plaintext):
    address = f"127.0.0.1:{endpoints.free_listen_port()}"
    with pytest.raises(client.Unreachable) as raised:
        client.planner(address, wait_s=1.0)
    message = str(raised.value)
    assert f"planner not reachable at {address}" in message
    assert "connection refused" in message and "iex stack up" in message
    assert "TLS" not in message


def test_a_tcp_connect_timeout_is_named_as_such(monkeypatch):
    def hang(*args, **kwargs):
        raise socket.timeout("timed out")

    monkeypatch.setattr(client.socket, "create_connection", hang)
    message = client.diagnose("10.0.0.1:50051", ClientSettings(), waited_s=5.0)
    assert message.startswith("timeout:") and "10.0.0.1:50051" in message


def test_an_unresolvable_host_is_named(monkeypatch):
    def unknown(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(client.socket, "create_connection", unknown)
    assert "cannot resolve host 'planner.invalid'" in client.diagnose("dns:///planner.invalid:50051", ClientSettings(), waited_s=5.0)


def test_a_listener_that_never_answers_is_not_called_refused(plaintext):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # accepts into the backlog, never speaks
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        message = client.diagnose(address, ClientSettings(), waited_s=1.0, timeout_s=0.5)
    assert "accepts TCP connections" in message and "did not answer gRPC" in message


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from services.common.devpki import DevCA

    directory = tmp_path_factory.mktemp("pki")
    ca = DevCA(directory)
    other = DevCA(directory / "other")
    return {"ca": ca, "server": ca.server("planner"), "other_ca": other}


def _tls_credentials(pki) -> grpc.ServerCredentials:
    issued = pki["server"]
    return grpc.ssl_server_credentials([(issued.key.read_bytes(), issued.cert.read_bytes())])


def test_a_tls_server_dialled_in_plaintext_says_set_the_ca(plaintext, pki):
    address = f"127.0.0.1:{endpoints.free_listen_port()}"
    server = _server(address, _tls_credentials(pki))
    try:
        with pytest.raises(client.Unreachable) as raised:
            client.planner(address, wait_s=1.0)
    finally:
        server.stop(0)
    assert "serves TLS" in str(raised.value) and "IEX_TLS_CA" in str(raised.value)


def test_a_plaintext_server_dialled_with_tls_says_it_is_plaintext(pki):
    address = f"127.0.0.1:{endpoints.free_listen_port()}"
    server = _server(address)
    try:
        message = client.diagnose(address, ClientSettings(tls_ca=str(pki["ca"].ca_path)), waited_s=1.0)
    finally:
        server.stop(0)
    assert "does not speak TLS" in message and "unset IEX_TLS_CA" in message


def test_a_certificate_from_another_ca_is_named(pki):
    address = f"127.0.0.1:{endpoints.free_listen_port()}"
    server = _server(address, _tls_credentials(pki))
    try:
        message = client.diagnose(address, ClientSettings(tls_ca=str(pki["other_ca"].ca_path)), waited_s=1.0)
        right_ca = client.diagnose(address, ClientSettings(tls_ca=str(pki["ca"].ca_path), tls_server_name="planner"), waited_s=1.0)
    finally:
        server.stop(0)
    assert "certificate is not accepted" in message and "IEX_TLS_CA" in message
    assert right_ca.startswith("TLS works")


def test_split_address():
    assert client.split_address("127.0.0.1:15051") == ("127.0.0.1", 15051)
    assert client.split_address("dns:///planner:50051") == ("planner", 50051)
    assert client.split_address("[::1]:50051") == ("::1", 50051)
    assert client.split_address("unix:/tmp/socket") is None
