"""Default loopback endpoints of the local stack and of every service.

One table, read by the services' settings, by the local stack (services.stack) and by the
Prometheus scrape configuration, so that a port is written down once.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass

LOOPBACK = "127.0.0.1"

# Shifts every port of the table, so that several local stacks (a developer's, a test run's) can
# share one machine: IEX_PORT_OFFSET=1000 puts the planner on 16051, Kafka on 20092, and so on.
#
# Every port stays below 32768 for offsets up to 9,000: Linux hands out outgoing connections'
# local ports from 32768-60999 (ip_local_port_range), and a listener there (gRPC's usual 50051)
# fails to bind now and then, when a client connection of another process happens to hold that
# port. Containers keep the conventional 50051 (the chart sets IEX_GRPC_PORT).
PORT_OFFSET = int(os.environ.get("IEX_PORT_OFFSET", "0") or 0)
LINUX_EPHEMERAL_PORTS = range(32768, 61000)  # the kernel's default ip_local_port_range


def port(base: int) -> int:
    return base + PORT_OFFSET


# Where free_listen_port looks: above every port of a local stack (the highest, Kafka's metrics,
# is 28093 at the chaos suite's offset of 9000) and of the compatibility stack (29000-29093), and
# below the kernel's ephemeral range.
SPARE_PORTS = range(30000, LINUX_EPHEMERAL_PORTS.start)


def free_listen_port(host: str = LOOPBACK) -> int:
    """A port that is free now, for a listener that another process will bind a moment later.

    Not the kernel's answer to bind(port 0): that port is one of the ephemeral range, and any
    outgoing connection made before the listener binds may take it (seen in CI: a crawler replica
    failing with "Address already in use"). Ports outside that range are only taken by listeners.
    """
    for candidate in random.sample(SPARE_PORTS, 200):
        with socket.socket() as sock:
            try:
                sock.bind((host, candidate))
            except OSError:
                continue
            return candidate
    raise RuntimeError(f"no free port in {SPARE_PORTS.start}-{SPARE_PORTS.stop - 1} on {host}")


@dataclass(frozen=True)
class ServicePorts:
    grpc: int
    metrics: int
    http: int = 0  # only services that also speak HTTP (search serves images and /knn-service)


SERVICE_PORTS: dict[str, ServicePorts] = {
    "planner": ServicePorts(grpc=port(15051), metrics=port(9101)),
    "crawler": ServicePorts(grpc=port(15052), metrics=port(9102)),
    "dedup": ServicePorts(grpc=port(15053), metrics=port(9103)),
    "scorer": ServicePorts(grpc=port(15054), metrics=port(9104)),
    "trainer": ServicePorts(grpc=port(15055), metrics=port(9105)),
    "search": ServicePorts(grpc=port(15056), metrics=port(9106), http=port(18086)),
}

# Infrastructure servers of the local stack.
KAFKA_PORT = port(19092)
# The broker's metrics (tansu pushes OTLP to services.stack.otlp_bridge, which Prometheus scrapes).
KAFKA_METRICS_PORT = port(19093)
S3_PORT = port(18333)
S3_METRICS_PORT = port(18339)  # SeaweedFS -metricsPort
TRITON_HTTP_PORT = port(18000)
TRITON_GRPC_PORT = port(18001)
TRITON_METRICS_PORT = port(18002)
PROMETHEUS_PORT = port(19090)

DEFAULT_KAFKA_BOOTSTRAP = f"{LOOPBACK}:{KAFKA_PORT}"
DEFAULT_S3_ENDPOINT = f"{LOOPBACK}:{S3_PORT}"
DEFAULT_TRITON_GRPC = f"{LOOPBACK}:{TRITON_GRPC_PORT}"
DEFAULT_PROMETHEUS_URL = f"http://{LOOPBACK}:{PROMETHEUS_PORT}"

