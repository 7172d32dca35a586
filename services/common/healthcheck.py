"""`python -m services.common.healthcheck [HOST:PORT] [--server-name NAME] [--service NAME]`

Asks a service's grpc.health.v1 whether it is SERVING, over the transport the process's own
IEX_TLS_* settings describe (TLS when IEX_TLS_CA is set, its certificate as the client certificate
under mTLS): the readiness probe of the Helm chart when gRPC is TLS only, which the kubelet's own
gRPC probe cannot speak. Exit 0 when SERVING, 1 when not, 2 when it cannot be asked.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import security


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.healthcheck", description=__doc__.split("\n\n")[1])
    parser.add_argument("address", nargs="?", default=f"127.0.0.1:{os.environ.get('IEX_GRPC_PORT', '50051')}")
    parser.add_argument("--server-name", default="", help="name expected in the certificate (default: IEX_TLS_SERVER_NAME, else the host)")
    parser.add_argument("--service", default="", help="health of this gRPC service (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=4.0)
    args = parser.parse_args(argv)
    # The process's own settings: IEX_TLS_CA, IEX_TLS_CERT/KEY (as the client certificate); no token.
    config = security.client_settings()
    if args.server_name:
        config = replace(config, tls_server_name=args.server_name)
    try:
        channel = security.client_channel(args.address, config)
    except Exception as exc:  # noqa: BLE001 - a probe reports, it does not raise
        print(f"cannot dial {args.address}: {exc}", file=sys.stderr)
        return 2
    try:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout).status
    except grpc.RpcError as exc:
        print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    finally:
        channel.close()
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    print(f"{args.address}: {name}")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
