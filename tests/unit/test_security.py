"""Transport security and caller authentication (services.common.security) on real in-process gRPC servers.

The interceptor and the credentials are the units under test; the servicer behind them is a stub
of the planner's API that records which calls reached it, so every assertion can tell "refused
before the servicer" from "reached the servicer".
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import time
from concurrent import futures
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from iex.v1 import planner_pb2, planner_pb2_grpc
from services.common import security
from services.common.devpki import DevCA
from services.common.metrics import Metrics
from services.common.settings import ServiceSettings, SettingsError, load_service_settings, redacted

pytest.importorskip("cryptography")

TOKEN = secrets.token_urlsafe(24)
OTHER_TOKEN = secrets.token_urlsafe(24)
REPO = Path(__file__).resolve().parents[2]


class RecordingPlanner(planner_pb2_grpc.PlannerServiceServicer):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def CreateExploration(self, request, context):
        self.calls.append("CreateExploration")
        return planner_pb2.CreateExplorationResponse(exploration=planner_pb2.Exploration(exploration_id=request.exploration_id or "new"))

    def GetExploration(self, request, context):
        self.calls.append("GetExploration")
        return planner_pb2.GetExplorationResponse(exploration=planner_pb2.Exploration(exploration_id=request.exploration_id))

    def CancelExploration(self, request, context):
        self.calls.append("CancelExploration")
        return planner_pb2.CancelExplorationResponse()

    def WatchExploration(self, request, context):
        self.calls.append("WatchExploration")
        yield planner_pb2.WatchExplorationResponse(exploration=planner_pb2.Exploration(exploration_id=request.exploration_id))


def settings(**values) -> ServiceSettings:
    return replace(load_service_settings(ServiceSettings, "planner", environ={}), **values)


class Server:
    """A gRPC server with the security of `config`, the planner stub and health, on an ephemeral port."""

    def __init__(self, config: ServiceSettings) -> None:
        self.planner = RecordingPlanner()
        self.metrics = Metrics(f"sec{secrets.token_hex(3)}", registry=CollectorRegistry())
        self.security = security.ServerSecurity(config)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=self.security.interceptors(self.metrics))
        planner_pb2_grpc.add_PlannerServiceServicer_to_server(self.planner, self.server)
        health_servicer = health.HealthServicer()
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        self.port = self.security.add_port(self.server, "127.0.0.1:0")
        assert self.port
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stub(self, **client) -> planner_pb2_grpc.PlannerServiceStub:
        return planner_pb2_grpc.PlannerServiceStub(security.client_channel(self.address, security.ClientSettings(**client)))

    def health(self, **client):
        return health_pb2_grpc.HealthStub(security.client_channel(self.address, security.ClientSettings(**client)))

    def refused(self, method: str, reason: str) -> float:
        return self.metrics.registry.get_sample_value(f"{self.metrics.name('auth_refused_total')}", {"method": method, "reason": reason}) or 0.0

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture()
def serve():
    started: list[Server] = []

    def start(config: ServiceSettings) -> Server:
        server = Server(config)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = DevCA(directory)
    return {
        "ca": ca,
        "dir": directory,
        "server": ca.server("planner"),
        "ops": ca.client("ops"),
        "intruder": ca.client("intruder"),
        "stranger": DevCA(directory / "other").client("ops"),  # right name, wrong CA
    }


def create(stub, **kwargs):
    return stub.CreateExploration(planner_pb2.CreateExplorationRequest(exploration_id="e1"), timeout=5, **kwargs)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


# ---- tokens -----------------------------------------------------------------------------------


def test_tokens_are_parsed_with_names_and_checked_for_strength():
    tokens = security.parse_tokens(f"# operators\nops:{TOKEN}, {OTHER_TOKEN}\n", "X")
    assert [t.name for t in tokens] == ["ops", "token-2"]
    assert security.TokenSet(f"ops:{TOKEN}").match(TOKEN) == "ops"
    assert security.TokenSet(f"ops:{TOKEN}").match(TOKEN[:-1]) is None
    assert security.TokenSet(f"ops:{TOKEN}").match("") is None
    with pytest.raises(SettingsError) as weak:
        security.parse_tokens("ops:short", "IEX_AUTH_TOKENS")
    assert "IEX_AUTH_TOKENS" in str(weak.value) and "short" not in str(weak.value).split(":", 1)[1].replace("shorter", "")
    with pytest.raises(SettingsError):
        security.parse_tokens("ops:" + "a" * 10 + " " + "b" * 10, "X")


def test_token_file_is_reread_when_it_changes(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"ci:{TOKEN}\n")
    tokens = security.TokenSet("", str(path))
    assert tokens.match(TOKEN) == "ci" and tokens.match(OTHER_TOKEN) is None
    path.write_text(f"ci:{OTHER_TOKEN}\n")
    os.utime(path, (time.time() + 5, time.time() + 5))
    time.sleep(1.05)  # the file is looked at no more than once a second
    assert tokens.match(OTHER_TOKEN) == "ci" and tokens.match(TOKEN) is None
    path.write_text("ci:weak\n")  # a bad rotation keeps the previous tokens rather than locking everyone out
    os.utime(path, (time.time() + 10, time.time() + 10))
    time.sleep(1.05)
    assert tokens.match(OTHER_TOKEN) == "ci"


def test_bearer_header_parsing():
    assert security.bearer_token([("authorization", f"Bearer {TOKEN}")]) == TOKEN
    assert security.bearer_token([("Authorization", f"bearer {TOKEN}")]) == TOKEN
    assert security.bearer_token([("authorization", f"Basic {TOKEN}")]) == ""
    assert security.bearer_token([("x-other", "1")]) is None


# ---- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, variable",
    [
        ({"tls_cert": "/x.pem"}, "IEX_TLS_KEY"),
        ({"tls_key": "/x.key"}, "IEX_TLS_CERT"),
        ({"tls_cert": "/x.pem", "tls_key": "/x.key", "tls_require_client_cert": True}, "IEX_TLS_CA"),
        ({"tls_cert": "/nonexistent.pem", "tls_key": "/nonexistent.key"}, "IEX_TLS_"),
        ({"auth_required": True}, "IEX_AUTH_REQUIRED"),
        ({"auth_required": True, "auth_client_identities": ("ops",)}, "IEX_AUTH_CLIENT_IDENTITIES"),
        ({"auth_required": True, "auth_tokens": "ops:short"}, "IEX_AUTH_TOKENS"),
        ({"auth_required": True, "auth_tokens_file": "/nonexistent/tokens"}, "IEX_AUTH_TOKENS_FILE"),
    ],
)
def test_wrong_security_settings_name_the_variable(values, variable):
    with pytest.raises(SettingsError) as info:
        security.ServerSecurity(settings(**values))
    assert variable in str(info.value)


def test_a_wrong_tls_setting_stops_the_service_before_it_starts():
    env = {**os.environ, "IEX_TLS_CERT": "/nonexistent/cert.pem", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'protos'}", "IEX_GRPC_PORT": "1", "IEX_METRICS_PORT": "1"}
    result = subprocess.run([sys.executable, "-m", "services.planner"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "IEX_TLS_KEY" in result.stderr


def test_builtin_s3_credentials_are_refused_away_from_loopback():
    security.refuse_builtin_s3_credentials(settings())  # the local stack: fine
    with pytest.raises(SettingsError) as info:
        security.refuse_builtin_s3_credentials(settings(s3_endpoint="minio.iex.svc:9000"))
    assert "IEX_S3_ACCESS_KEY" in str(info.value)
    security.refuse_builtin_s3_credentials(settings(s3_endpoint="minio.iex.svc:9000", s3_access_key="from-secret", s3_secret_key="from-secret-too"))


def test_secrets_stay_out_of_repr_and_redacted_settings():
    s = settings(auth_tokens=f"ops:{TOKEN}", auth_token=OTHER_TOKEN, s3_secret_key="hunter2-secret")
    for text in (repr(s), str(s), str(redacted(s))):
        assert TOKEN not in text and OTHER_TOKEN not in text and "hunter2-secret" not in text


# ---- the interceptor on a plaintext server ---------------------------------------------------------


def test_mutating_rpcs_need_a_token_reads_and_health_do_not(serve, caplog):
    server = serve(settings(auth_required=True, auth_tokens=f"ops:{TOKEN}"))
    caplog.set_level(logging.INFO)
    assert code_of(lambda: create(server.stub())) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: create(server.stub(auth_token=OTHER_TOKEN))) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: create(server.stub(), metadata=[("authorization", f"Basic {TOKEN}")])) == grpc.StatusCode.UNAUTHENTICATED
    assert server.planner.calls == []  # refused before the servicer ran
    assert create(server.stub(auth_token=TOKEN)).exploration.exploration_id == "e1"
    assert server.stub().GetExploration(planner_pb2.GetExplorationRequest(exploration_id="e1"), timeout=5).exploration.exploration_id == "e1"
    assert server.health().Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    assert server.planner.calls == ["CreateExploration", "GetExploration"]
    assert server.refused("CreateExploration", security.MISSING) == 1
    assert server.refused("CreateExploration", security.INVALID_TOKEN) == 2  # a wrong token, and a header that is no bearer token
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "call authorized" in logged and "'identity': 'ops'" in logged
    assert TOKEN not in logged and OTHER_TOKEN not in logged


def test_refusal_message_names_the_method_and_what_to_send(serve):
    server = serve(settings(auth_required=True, auth_tokens=TOKEN))
    with pytest.raises(grpc.RpcError) as info:
        server.stub().CancelExploration(planner_pb2.CancelExplorationRequest(exploration_id="e1"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert info.value.details().startswith("CancelExploration: credentials required") and "Bearer" in info.value.details()


def test_protect_all_covers_reads_and_streams_but_not_health(serve):
    server = serve(settings(auth_required=True, auth_tokens=TOKEN, auth_protect="all"))
    watch = lambda stub: list(stub.WatchExploration(planner_pb2.WatchExplorationRequest(exploration_id="e1"), timeout=5))  # noqa: E731
    assert code_of(lambda: server.stub().GetExploration(planner_pb2.GetExplorationRequest(exploration_id="e1"), timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: watch(server.stub())) == grpc.StatusCode.UNAUTHENTICATED
    assert len(watch(server.stub(auth_token=TOKEN))) == 1
    assert server.health().Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def test_auth_off_lets_everything_through(serve):
    server = serve(settings())
    assert create(server.stub()).exploration.exploration_id == "e1"


# ---- TLS and mTLS ---------------------------------------------------------------------------------


def tls_settings(pki, **values) -> ServiceSettings:
    return settings(tls_cert=str(pki["server"].cert), tls_key=str(pki["server"].key), tls_ca=str(pki["ca"].ca_path), **values)


def test_tls_server_refuses_plaintext_and_unknown_cas(serve, pki):
    server = serve(tls_settings(pki))
    assert code_of(lambda: create(server.stub())) == grpc.StatusCode.UNAVAILABLE
    other_ca = pki["dir"] / "other" / "ca.pem"
    assert code_of(lambda: create(server.stub(tls_ca=str(other_ca)))) == grpc.StatusCode.UNAVAILABLE
    assert create(server.stub(tls_ca=str(pki["ca"].ca_path))).exploration.exploration_id == "e1"
    # By another name than the address: the certificate is for "planner".
    planner = server.stub(tls_ca=str(pki["ca"].ca_path), tls_server_name="planner")
    assert create(planner).exploration.exploration_id == "e1"
    wrong_name = server.stub(tls_ca=str(pki["ca"].ca_path), tls_server_name="scorer")
    assert code_of(lambda: create(wrong_name)) == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_a_client_certificate_from_the_ca(serve, pki):
    server = serve(tls_settings(pki, tls_require_client_cert=True))
    ca = str(pki["ca"].ca_path)
    assert code_of(lambda: create(server.stub(tls_ca=ca))) == grpc.StatusCode.UNAVAILABLE
    stranger = pki["stranger"]
    assert code_of(lambda: create(server.stub(tls_ca=ca, tls_cert=str(stranger.cert), tls_key=str(stranger.key)))) == grpc.StatusCode.UNAVAILABLE
    ops = pki["ops"]
    assert create(server.stub(tls_ca=ca, tls_cert=str(ops.cert), tls_key=str(ops.key))).exploration.exploration_id == "e1"


def test_mtls_identity_authenticates_protected_rpcs(serve, pki):
    server = serve(tls_settings(pki, tls_require_client_cert=True, auth_required=True, auth_client_identities=("ops",)))
    ca = str(pki["ca"].ca_path)
    ops, intruder = pki["ops"], pki["intruder"]
    assert create(server.stub(tls_ca=ca, tls_cert=str(ops.cert), tls_key=str(ops.key))).exploration.exploration_id == "e1"
    intruding = server.stub(tls_ca=ca, tls_cert=str(intruder.cert), tls_key=str(intruder.key))
    assert code_of(lambda: create(intruding)) == grpc.StatusCode.PERMISSION_DENIED
    # Reads stay open to any certified peer.
    assert intruding.GetExploration(planner_pb2.GetExplorationRequest(exploration_id="e1"), timeout=5).exploration.exploration_id == "e1"
    assert server.refused("CreateExploration", security.IDENTITY_REFUSED) == 1


def test_any_certified_identity_with_star(serve, pki):
    server = serve(tls_settings(pki, tls_require_client_cert=True, auth_required=True, auth_client_identities=("*",)))
    intruder = pki["intruder"]
    stub = server.stub(tls_ca=str(pki["ca"].ca_path), tls_cert=str(intruder.cert), tls_key=str(intruder.key))
    assert create(stub).exploration.exploration_id == "e1"


def test_rotated_server_certificate_is_used_without_restart(serve, tmp_path):
    first, second = DevCA(tmp_path / "first"), DevCA(tmp_path / "second")
    live_cert, live_key = tmp_path / "tls.crt", tmp_path / "tls.key"
    issued = first.server("planner")
    live_cert.write_bytes(issued.cert.read_bytes())
    live_key.write_bytes(issued.key.read_bytes())
    server = serve(settings(tls_cert=str(live_cert), tls_key=str(live_key)))
    assert create(server.stub(tls_ca=str(first.ca_path))).exploration.exploration_id == "e1"
    rotated = second.server("planner")
    live_key.write_bytes(rotated.key.read_bytes())
    live_cert.write_bytes(rotated.cert.read_bytes())
    later = time.time() + 5
    os.utime(live_cert, (later, later))
    os.utime(live_key, (later, later))
    time.sleep(1.1)
    deadline = time.monotonic() + 10
    while True:  # the first handshake after the change may still see the old configuration
        try:
            assert create(server.stub(tls_ca=str(second.ca_path))).exploration.exploration_id == "e1"
            break
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert code_of(lambda: create(server.stub(tls_ca=str(first.ca_path)))) == grpc.StatusCode.UNAVAILABLE


# ---- object keys from hostile events ---------------------------------------------------------------


@pytest.mark.parametrize("key", ["a/../b", "../etc/passwd", "", "./x"])
def test_an_unusable_object_key_is_a_permanent_error_not_an_outage(key):
    """A key taken from an event that S3 (or the client) can never accept must not look like an outage:
    DependencyUnavailable makes a consumer retry its record forever (found by tests/fuzz)."""
    from services.common.errors import PermanentError
    from services.common.objectstore import InvalidObjectRequest, ObjectStore

    store = ObjectStore("127.0.0.1:1", "access", "secret-key", attempts=5, base_delay_s=5.0)  # nothing listens
    started = time.monotonic()
    with pytest.raises(InvalidObjectRequest) as info:
        store.get_bytes("iex", key)
    assert isinstance(info.value, PermanentError) and isinstance(info.value, ValueError)
    assert info.value.reason == "invalid_s3_request"
    assert time.monotonic() - started < 1.0  # refused at once: no retries, no network


def test_dedup_asks_the_planner_over_mtls_with_its_own_settings(serve, pki):
    """Dedup's lookup of an unknown exploration goes through security.client_channel: against an
    mTLS planner it needs dedup's TLS settings (its certificate as the client certificate)."""
    from services.common.errors import DependencyUnavailable
    from services.dedup.explorations import PlannerExplorationLookup

    server = serve(tls_settings(pki, tls_require_client_cert=True))
    dedup = settings(tls_ca=str(pki["ca"].ca_path), tls_cert=str(pki["server"].cert), tls_key=str(pki["server"].key))
    lookup = PlannerExplorationLookup(server.address, timeout_s=5, client=dedup)
    try:
        assert lookup("exp-1") == ""  # answered (the recording planner's explorations have no target)
    finally:
        lookup.close()
    assert server.planner.calls == ["GetExploration"]
    plaintext = PlannerExplorationLookup(server.address, timeout_s=2, client=settings())
    try:
        with pytest.raises(DependencyUnavailable):
            plaintext("exp-1")
    finally:
        plaintext.close()
    assert server.planner.calls == ["GetExploration"]


def test_the_chart_readiness_probe_asks_health_over_tls(serve, pki, monkeypatch, capsys):
    """`python -m services.common.healthcheck`: the Helm chart's readiness probe under TLS (the
    kubelet's own gRPC probe is plaintext only), with the process's IEX_TLS_* settings."""
    from services.common import healthcheck

    server = serve(tls_settings(pki, tls_require_client_cert=True))
    for var in ("IEX_TLS_CA", "IEX_TLS_CERT", "IEX_TLS_KEY", "IEX_TLS_SERVER_NAME"):
        monkeypatch.delenv(var, raising=False)
    assert healthcheck.main([server.address]) == 2  # plaintext against a TLS port: cannot ask
    monkeypatch.setenv("IEX_TLS_CA", str(pki["ca"].ca_path))
    monkeypatch.setenv("IEX_TLS_CERT", str(pki["server"].cert))
    monkeypatch.setenv("IEX_TLS_KEY", str(pki["server"].key))
    assert healthcheck.main([server.address, "--server-name", "planner"]) == 0
    assert "SERVING" in capsys.readouterr().out
    assert healthcheck.main([server.address, "--server-name", "scorer"]) == 2  # not the certificate's name
