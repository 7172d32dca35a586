"""gRPC channels to the services, with errors a person can act on.

TLS, the client certificate and the bearer token come from IEX_TLS_CA, IEX_TLS_CERT / IEX_TLS_KEY
and IEX_AUTH_TOKEN (services.common.security.ClientSettings).
"""

from __future__ import annotations

import os

import grpc

from iex.v1 import planner_pb2_grpc
from services.common import security
from services.common.endpoints import LOOPBACK, SERVICE_PORTS
from services.common.settings import SettingsError


class Unreachable(RuntimeError):
    pass


def planner_address() -> str:
    return os.environ.get("IEX_PLANNER_ADDR", f"{LOOPBACK}:{SERVICE_PORTS['planner'].grpc}")


def planner(address: str | None = None, wait_s: float = 5.0) -> planner_pb2_grpc.PlannerServiceStub:
    address = address or planner_address()
    try:
        config = security.client_settings()
        channel = security.client_channel(address, config)
    except SettingsError as exc:
        raise Unreachable(f"cannot set up the connection to {address}: {exc}") from None
    try:
        grpc.channel_ready_future(channel).result(timeout=wait_s)
    except grpc.FutureTimeoutError:
        # A TLS mismatch looks like an unreachable server from here: say which side to check.
        tls = "with TLS (IEX_TLS_CA set): check that it serves TLS" if config.tls_ca else "in plaintext: if it serves TLS, set IEX_TLS_CA"
        raise Unreachable(f"planner not reachable at {address} {tls}; run `iex stack up` (or `make up`) to start one") from None
    return planner_pb2_grpc.PlannerServiceStub(channel)
