"""Default loopback endpoints of the local stack and of every service.

One table, read by the services' settings, by the local stack (services.stack) and by the
Prometheus scrape configuration, so that a port is written down once.
"""

from __future__ import annotations

from dataclasses import dataclass

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ServicePorts:
    grpc: int
    metrics: int
    http: int = 0  # only services that also speak HTTP (search serves images and /knn-service)


SERVICE_PORTS: dict[str, ServicePorts] = {
    "planner": ServicePorts(grpc=50051, metrics=9101),
    "crawler": ServicePorts(grpc=50052, metrics=9102),
    "dedup": ServicePorts(grpc=50053, metrics=9103),
    "scorer": ServicePorts(grpc=50054, metrics=9104),
    "trainer": ServicePorts(grpc=50055, metrics=9105),
    "search": ServicePorts(grpc=50056, metrics=9106, http=18086),
}

# Infrastructure servers of the local stack.
KAFKA_PORT = 19092
S3_PORT = 18333
TRITON_HTTP_PORT = 18000
TRITON_GRPC_PORT = 18001
TRITON_METRICS_PORT = 18002
PROMETHEUS_PORT = 19090

DEFAULT_KAFKA_BOOTSTRAP = f"{LOOPBACK}:{KAFKA_PORT}"
DEFAULT_S3_ENDPOINT = f"{LOOPBACK}:{S3_PORT}"
DEFAULT_TRITON_GRPC = f"{LOOPBACK}:{TRITON_GRPC_PORT}"
DEFAULT_PROMETHEUS_URL = f"http://{LOOPBACK}:{PROMETHEUS_PORT}"
