"""Regression tests of chaos-suite findings about how clients see a dependency go and come back.

1. After a Triton outage the scorer idled on gRPC's reconnect backoff: it grows to 120 s by default.
   In the chaos run Triton was down for about two minutes and restarted; the scorer noticed 68 s
   after Triton was ready again. services.common.modelrepo now caps the backoff; the test stands a
   Triton health endpoint up, takes it down long enough for the default backoff to grow past the
   cap, brings it back on the same port and measures how soon TritonEncoder sees it.
2. A frozen S3 (SIGSTOP: connections accepted, nothing answered) left every service SERVING for the
   whole 30 s outage: the readiness probe used the 30 s read timeout of data requests.
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent import futures

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.common import endpoints
from services.common.modelrepo import TRITON_RECONNECT_BACKOFF_MAX_MS, TritonEncoder
from services.common.objectstore import PROBE_TIMEOUT_S, ObjectStore

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

DOWN_S = 60.0  # long enough for the default backoff to reach 20-40 s between attempts (it measured 13.6 s and 68 s late)


class ReadyTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=True)

    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)


def serve(port: int) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(ReadyTriton(), server)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    server.start()
    return server


def test_a_restarted_triton_is_used_within_seconds():
    port = endpoints.free_listen_port()
    server = serve(port)
    encoder = TritonEncoder(f"127.0.0.1:{port}", timeout_s=2)
    try:
        assert encoder.server_ready()
        server.stop(0).wait()
        down_until = time.monotonic() + DOWN_S
        while time.monotonic() < down_until:  # the scorer's health loop keeps asking meanwhile
            assert not encoder.server_ready()
            time.sleep(1.0)
        server = serve(port)
        back = time.monotonic()
        while not encoder.server_ready():
            assert time.monotonic() - back < 30, "Triton still unseen 30 s after it came back"
            time.sleep(0.2)
        seen_after = time.monotonic() - back
        # The cap plus jitter (20%) plus a handshake.
        assert seen_after < TRITON_RECONNECT_BACKOFF_MAX_MS / 1000 * 1.2 + 1.5, f"seen {seen_after:.1f}s after Triton returned"
    finally:
        encoder.close()
        server.stop(0)


def test_a_hung_s3_is_reported_not_ready_within_the_probe_timeout():
    """A listening socket that never answers: what a stopped or partitioned S3 looks like to a client."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)  # the kernel completes handshakes; nobody ever reads or writes
        store = ObjectStore(f"127.0.0.1:{hung.getsockname()[1]}", "access", "secret-key")
        results: list[bool] = []
        started = time.monotonic()
        probe = threading.Thread(target=lambda: results.append(store.ping()), daemon=True)
        probe.start()
        probe.join(PROBE_TIMEOUT_S * 3)
        took = time.monotonic() - started
    assert results == [False], "the probe is still waiting on a server that will never answer"
    assert took < PROBE_TIMEOUT_S * 2, f"probe took {took:.1f}s"
