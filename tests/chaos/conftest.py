"""The chaos suite's stack: durable Kafka (tansu on S3), TLS with mTLS, tokens, private state and credentials.

It is the production shape of the local stack: everything a fault can break is real, and the
security settings are on, so the suite also shows that they hold while things break.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.common import endpoints, security
from services.common.devpki import DevCA
from services.stack import servers
from services.stack.process import port_open

# The exploration's servers; Prometheus adds nothing the suite reads (it reads /metrics directly).
CHAOS_SERVERS = ("s3", "kafka", "triton")


@dataclass
class ChaosStack:
    stack: servers.Stack
    env: dict[str, str]
    state: Path
    client: security.ClientSettings  # an operator: client certificate and the valid token
    anonymous: security.ClientSettings  # a client certificate, no token
    # Out of the repr: pytest prints fixtures in failure reports, which are logs too.
    token: str = field(repr=False)
    secrets: dict[str, str] = field(repr=False)  # name -> value that must never appear in logs or metrics

    def address(self, service: str) -> str:
        return f"{endpoints.LOOPBACK}:{endpoints.SERVICE_PORTS[service].grpc}"


@pytest.fixture(scope="module")
def chaos_stack(request):
    """Starts the stack once for the module and stops exactly what it started."""
    busy = [p for name in (*CHAOS_SERVERS, *servers.SERVICE_NAMES) for p in servers.ports(name) if port_open(endpoints.LOOPBACK, p)]
    if busy:
        pytest.fail(f"ports {busy} are in use (another stack, or the integration suite's): set IEX_PORT_OFFSET or stop it")
    # Not a pytest tmp_path: concurrent pytest sessions prune each other's numbered temp directories,
    # which would delete a running stack's data and PID files.
    state = Path(tempfile.mkdtemp(prefix="chaos-", dir=os.environ.get("IEX_STATE_DIR") or None))
    saved = dict(os.environ)
    token = secrets.token_urlsafe(32)
    s3_access, s3_secret = f"chaos{secrets.token_hex(4)}", secrets.token_urlsafe(24)
    os.environ.update(
        {
            "IEX_STATE_DIR": str(state),
            # Fresh credentials the suite can look for in every log line and metric.
            "IEX_S3_ACCESS_KEY": s3_access,
            "IEX_S3_SECRET_KEY": s3_secret,
        }
    )
    ca = DevCA(state / "pki")
    server_cert = ca.server("iex-services")
    operator = ca.client("operator")
    env = {
        **servers.stack_env(),
        "IEX_TLS_CERT": str(server_cert.cert),
        "IEX_TLS_KEY": str(server_cert.key),
        "IEX_TLS_CA": str(ca.ca_path),
        "IEX_TLS_REQUIRE_CLIENT_CERT": "true",
        "IEX_AUTH_REQUIRED": "true",
        "IEX_AUTH_TOKENS": f"chaos-operator:{token}",
        # Faults, not training quality, are the subject: short CPU training per iteration.
        "IEX_TRAINER_MAX_STEPS": os.environ.get("IEX_TRAINER_MAX_STEPS", "10"),
    }
    client = security.ClientSettings(tls_ca=str(ca.ca_path), tls_cert=str(operator.cert), tls_key=str(operator.key), auth_token=token)
    anonymous = security.ClientSettings(tls_ca=str(ca.ca_path), tls_cert=str(operator.cert), tls_key=str(operator.key))
    stack = servers.Stack(servers=CHAOS_SERVERS, services=servers.SERVICE_NAMES, kafka_storage="s3", service_env=env, echo=print)
    failures_before = request.session.testsfailed
    started = False
    try:
        stack.up()
        yield ChaosStack(
            stack=stack,
            env=env,
            state=state,
            client=client,
            anonymous=anonymous,
            token=token,
            secrets={"auth token": token, "S3 secret key": s3_secret, "S3 access key": s3_access},
        )
        started = True
    finally:
        try:
            stack.down()
        finally:
            os.environ.clear()
            os.environ.update(saved)
            if started and request.session.testsfailed == failures_before and not os.environ.get("IEX_CHAOS_KEEP_STATE"):
                shutil.rmtree(state, ignore_errors=True)
            else:
                print(f"chaos state (logs, data) kept in {state}")
