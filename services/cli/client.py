"""gRPC channels to the services, with errors a person can act on."""

from __future__ import annotations

import os

import grpc

from iex.v1 import planner_pb2_grpc
from services.common.endpoints import LOOPBACK, SERVICE_PORTS


class Unreachable(RuntimeError):
    pass


def planner_address() -> str:
    return os.environ.get("IEX_PLANNER_ADDR", f"{LOOPBACK}:{SERVICE_PORTS['planner'].grpc}")


def planner(address: str | None = None, wait_s: float = 5.0) -> planner_pb2_grpc.PlannerServiceStub:
    address = address or planner_address()
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=wait_s)
    except grpc.FutureTimeoutError:
        raise Unreachable(f"planner not reachable at {address}: run `iex stack up` (or `make up`)") from None
    return planner_pb2_grpc.PlannerServiceStub(channel)
