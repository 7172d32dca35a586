"""Prometheus metrics: per-service names (iex_<service>_<thing>_<unit>), bounded labels, one /metrics server."""

from __future__ import annotations

import platform
import subprocess
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

VERSION = "0.1.0"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=2,
            check=False,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


class Metrics:
    """Metric families of one service. Families are created once per (service, name)."""

    _families: dict[tuple[str, str], object] = {}

    def __init__(self, service: str, registry: CollectorRegistry = REGISTRY) -> None:
        self.service = service
        self.registry = registry

    def name(self, thing: str) -> str:
        return f"iex_{self.service}_{thing}"

    def _family(self, kind: type, thing: str, doc: str, labels: Sequence[str], **kwargs):
        key = (self.name(thing), kind.__name__)
        family = Metrics._families.get(key)
        if family is None:
            family = kind(self.name(thing), doc, list(labels), registry=self.registry, **kwargs)
            Metrics._families[key] = family
        return family

    def counter(self, thing: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return self._family(Counter, thing, doc, labels)

    def gauge(self, thing: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return self._family(Gauge, thing, doc, labels)

    def histogram(self, thing: str, doc: str, labels: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
        return self._family(Histogram, thing, doc, labels, buckets=tuple(buckets))


def build_info(service: str) -> None:
    key = ("iex_build_info", "Gauge")
    family = Metrics._families.get(key)
    if family is None:
        family = Gauge("iex_build_info", "Build of the running service (value is always 1)", ["service", "version", "commit", "python"])
        Metrics._families[key] = family
    family.labels(service=service, version=VERSION, commit=git_commit(), python=platform.python_version()).set(1)


def serve(port: int, host: str) -> None:
    """Starts /metrics on its own thread; process_* and python_* collectors come with the default registry."""
    start_http_server(port, addr=host)


class ServerMetricsInterceptor(grpc.ServerInterceptor):
    """Counts requests by method and code and times them; streams are timed until they end."""

    def __init__(self, metrics: Metrics) -> None:
        self.requests = metrics.counter("grpc_requests_total", "gRPC requests handled", ["method", "code"])
        self.latency = metrics.histogram("grpc_request_duration_seconds", "gRPC request latency", ["method"])
        self.in_flight = metrics.gauge("grpc_requests_in_flight", "gRPC requests being handled", ["method"])

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if method in ("Check", "Watch", "ServerReflectionInfo"):
            return handler  # health checks and reflection would drown the real traffic
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _record(self, method: str, context: grpc.ServicerContext, started: float, failed: bool) -> None:
        code = _code_of(context, failed)
        self.requests.labels(method=method, code=code).inc()
        self.latency.labels(method=method).observe(time.perf_counter() - started)

    def _wrap_unary(self, behaviour: Callable, method: str) -> Callable:
        def wrapped(request, context):
            started = time.perf_counter()
            gauge = self.in_flight.labels(method=method)
            gauge.inc()
            failed = False
            try:
                return behaviour(request, context)
            except BaseException:
                failed = True
                raise
            finally:
                gauge.dec()
                self._record(method, context, started, failed)

        return wrapped

    def _wrap_stream(self, behaviour: Callable, method: str) -> Callable:
        def wrapped(request, context):
            started = time.perf_counter()
            gauge = self.in_flight.labels(method=method)
            gauge.inc()
            failed = False
            try:
                yield from behaviour(request, context)
            except BaseException:
                failed = True
                raise
            finally:
                gauge.dec()
                self._record(method, context, started, failed)

        return wrapped


def _code_of(context: grpc.ServicerContext, failed: bool) -> str:
    code = None
    try:
        code = context.code()
    except (AttributeError, NotImplementedError):
        pass
    if code is None:
        return "UNKNOWN" if failed else "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    # context.code() may return the integer value.
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return "UNKNOWN"
