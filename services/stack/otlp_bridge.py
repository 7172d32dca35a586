"""The broker's metrics for Prometheus: tansu pushes OTLP, Prometheus 2.42 scrapes.

tansu (the local stack's Kafka) has no /metrics endpoint: it pushes its metrics (API requests,
bytes in and out, request latencies and sizes, object-store calls) over OTLP/HTTP to
`--otlp-endpoint-url`, and Debian's Prometheus 2.42 has no OTLP receiver. This runs tansu as its
child, receives those pushes on `POST /v1/metrics` and serves the latest of them on
`GET /metrics` in the Prometheus text format (counters `_total`, histograms `_bucket`/`_sum`/`_count`,
units as suffixes, attributes as labels), on 127.0.0.1 only:

    python -m services.stack.otlp_bridge --listen 127.0.0.1:19093 -- tansu broker ...

It forwards SIGTERM/SIGINT to tansu and exits with its exit status; tansu dies with it. A snapshot
older than --stale-s is dropped, so a broker that stopped pushing disappears instead of looking
frozen. Without the `opentelemetry-proto` package it runs tansu alone.
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# How often tansu pushes (the OpenTelemetry SDK reads it); Prometheus scrapes every 2 s.
EXPORT_INTERVAL_MS = "2000"
UNIT_SUFFIXES = {"ms": "milliseconds", "s": "seconds", "By": "bytes", "1": ""}


def metric_name(name: str, unit: str = "") -> str:
    out = re.sub(r"[^a-zA-Z0-9_:]", "_", name)
    if out and out[0].isdigit():
        out = "_" + out
    suffix = UNIT_SUFFIXES.get(unit, re.sub(r"[^a-zA-Z0-9_]", "_", unit) if unit and not unit.startswith("{") else "")
    if suffix and not out.endswith("_" + suffix):
        out = f"{out}_{suffix}"
    return out


def _label_value(value) -> str:
    kind = value.WhichOneof("value")
    if kind is None:
        return ""
    raw = getattr(value, kind)
    if kind == "bool_value":
        return "true" if raw else "false"
    if kind in ("array_value", "kvlist_value", "bytes_value"):
        return str(raw)[:200]
    return str(raw)


def _labels(attributes, extra: dict[str, str] | None = None) -> str:
    pairs = dict(extra or {})
    for kv in attributes:
        pairs[re.sub(r"[^a-zA-Z0-9_]", "_", kv.key)] = _label_value(kv.value)
    if not pairs:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(pairs.items()))
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    value = float(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _point_value(point) -> float:
    return float(point.as_double) if point.WhichOneof("value") == "as_double" else float(point.as_int)


def to_prometheus(request) -> str:
    """Prometheus text exposition of one OTLP ExportMetricsServiceRequest (cumulative points)."""
    lines: list[str] = []
    seen: set[str] = set()
    for resource_metrics in request.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                kind = metric.WhichOneof("data")
                name = metric_name(metric.name, metric.unit)
                help_text = _escape(metric.description or metric.name)
                if kind == "sum" and metric.sum.is_monotonic:
                    name = name if name.endswith("_total") else f"{name}_total"
                    block = [f"{name}{_labels(p.attributes)} {_number(_point_value(p))}" for p in metric.sum.data_points]
                    kind_name = "counter"
                elif kind in ("sum", "gauge"):
                    block = [f"{name}{_labels(p.attributes)} {_number(_point_value(p))}" for p in getattr(metric, kind).data_points]
                    kind_name = "gauge"
                elif kind == "histogram":
                    block = []
                    for p in metric.histogram.data_points:
                        cumulative = 0
                        bounds = list(p.explicit_bounds) + [math.inf]
                        for bound, count in zip(bounds, p.bucket_counts):
                            cumulative += count
                            block.append(f"{name}_bucket{_labels(p.attributes, {'le': _number(bound)})} {cumulative}")
                        block.append(f"{name}_sum{_labels(p.attributes)} {_number(p.sum)}")
                        block.append(f"{name}_count{_labels(p.attributes)} {p.count}")
                    kind_name = "histogram"
                else:
                    continue  # exponential histograms and summaries: tansu sends none
                if name in seen:
                    lines.extend(block)
                    continue
                seen.add(name)
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind_name}", *block]
    return "\n".join(lines) + ("\n" if lines else "")


class Bridge:
    def __init__(self, stale_s: float = 30.0) -> None:
        self.stale_s = stale_s
        self.lock = threading.Lock()
        self.text = ""
        self.pushed_at = 0.0
        self.pushes = 0
        self.rejected = 0

    def push(self, body: bytes, encoding: str = "") -> bytes:
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2

        if encoding == "gzip":
            body = gzip.decompress(body)
        request = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
        text = to_prometheus(request)
        with self.lock:
            self.text, self.pushed_at = text, time.time()
            self.pushes += 1
        return metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()

    def exposition(self) -> str:
        with self.lock:
            fresh = self.pushed_at and time.time() - self.pushed_at <= self.stale_s
            text, pushed_at, pushes, rejected = (self.text if fresh else ""), self.pushed_at, self.pushes, self.rejected
        own = [
            "# HELP iex_otlp_bridge_pushes_total OTLP metric pushes received from the broker",
            "# TYPE iex_otlp_bridge_pushes_total counter",
            f"iex_otlp_bridge_pushes_total {pushes}",
            "# HELP iex_otlp_bridge_rejected_total OTLP pushes that could not be decoded",
            "# TYPE iex_otlp_bridge_rejected_total counter",
            f"iex_otlp_bridge_rejected_total {rejected}",
            "# HELP iex_otlp_bridge_last_push_timestamp_seconds When the broker last pushed (0: never)",
            "# TYPE iex_otlp_bridge_last_push_timestamp_seconds gauge",
            f"iex_otlp_bridge_last_push_timestamp_seconds {pushed_at:.3f}",
        ]
        return text + "\n".join(own) + "\n"


def make_server(address: tuple[str, int], bridge: Bridge) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            if self.path.rstrip("/") != "/v1/metrics":
                self.send_error(404)
                return
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length > 0 else b""
            try:
                reply = bridge.push(body, (self.headers.get("content-encoding") or "").lower())
            except Exception:  # noqa: BLE001 - a bad push is counted and answered 400, never fatal
                with bridge.lock:
                    bridge.rejected += 1
                self.send_error(400, "not an OTLP ExportMetricsServiceRequest")
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def do_GET(self):  # noqa: N802
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            data = bridge.exposition().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(address, Handler)
    server.daemon_threads = True
    return server


def available() -> bool:
    try:
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2  # noqa: F401
    except ImportError:
        return False
    return True


def _die_with_parent() -> None:
    # The child gets SIGTERM when this process dies, even by SIGKILL of this process alone.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m services.stack.otlp_bridge --listen HOST:PORT -- BROKER ARGV...", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m services.stack.otlp_bridge")
    parser.add_argument("--listen", required=True, help="host:port of POST /v1/metrics and GET /metrics")
    parser.add_argument("--stale-s", type=float, default=30.0)
    args = parser.parse_args(argv[:split])
    child_argv = argv[split + 1 :]
    if not available():
        print("otlp_bridge: opentelemetry-proto is not installed; the broker runs without metrics", file=sys.stderr, flush=True)
        os.execvp(child_argv[0], child_argv)
    host, _, port = args.listen.rpartition(":")
    server = make_server((host, int(port)), Bridge(args.stale_s))
    threading.Thread(target=server.serve_forever, name="otlp-bridge", daemon=True).start()
    env = {**os.environ, "OTEL_METRIC_EXPORT_INTERVAL": os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", EXPORT_INTERVAL_MS)}
    child = subprocess.Popen(child_argv, env=env, preexec_fn=_die_with_parent)  # noqa: S603 - the stack's own argv

    def forward(signum, _frame) -> None:
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = child.wait()
    server.shutdown()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
