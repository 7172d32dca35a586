"""Service bootstrap shared by every service.

A service declares its gRPC servicers, the topics it consumes and its dependencies; this module runs
the rest: JSON logs, /metrics, topics, the gRPC server with health (reflecting real dependencies),
reflection and metrics interceptor, TLS / mTLS and caller authentication (services.common.security),
the consumer loop, and a graceful drain on SIGTERM (NOT_SERVING, stop consuming, commit, stop the
server with grace).
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time
from concurrent import futures
from typing import Callable, Mapping

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import logs, metrics, security, settings as settings_mod
from services.common.errors import DependencyUnavailable
from services.common.kafka import ConsumerLoop, Handler, KafkaConfig, Publisher, ensure_topics
from services.common.objectstore import ObjectStore
from services.common.topics import all_topic_names

log = logging.getLogger(__name__)

Check = Callable[[], bool]


def tcp_reachable(endpoints: str, timeout_s: float = 1.0) -> bool:
    """True when one of the comma-separated host:port endpoints accepts a TCP connection."""
    for endpoint in endpoints.split(","):
        host, _, port = endpoint.strip().rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
                return True
        except (OSError, ValueError):
            continue
    return False


class Service:
    """Base of every service; subclasses override the hooks below."""

    name = "service"
    settings_class: type[settings_mod.ServiceSettings] = settings_mod.ServiceSettings
    # Consumers whose handlers run long (training) need a longer poll interval than the default.
    max_poll_interval_ms = 300_000
    max_poll_records = 64
    # Services that neither consume nor publish (search) run without a broker.
    uses_kafka = True

    def __init__(self, settings: settings_mod.ServiceSettings) -> None:
        self.settings = settings
        self.metrics = metrics.Metrics(self.name)
        self.kafka_config = KafkaConfig.from_settings(settings, self.max_poll_interval_ms)
        security.refuse_builtin_s3_credentials(settings)
        # TLS files and tokens are checked here, so a wrong one stops the service before it starts.
        self.security = security.ServerSecurity(settings, self.protected_methods())
        self.store = ObjectStore.from_settings(settings)
        self.publisher: Publisher | None = None
        self.consumer: ConsumerLoop | None = None
        self.server: grpc.Server | None = None
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.stopping = threading.Event()
        self._service_names: list[str] = []
        self.ready_gauge = self.metrics.gauge("ready", "1 when every dependency is reachable and the service is serving")
        self.dependency_gauge = self.metrics.gauge("dependency_up", "1 when the dependency answered the last check", ["dependency"])

    # ---- hooks -------------------------------------------------------------------------------
    def protected_methods(self) -> frozenset[str]:
        """Full gRPC method names that need credentials when IEX_AUTH_REQUIRED is on."""
        return security.PROTECTED_METHODS

    def register(self, server: grpc.Server) -> list[str]:
        """Adds servicers to the server; returns their full service names (for health and reflection)."""
        return []

    def handlers(self) -> Mapping[str, Handler]:
        """Topic name -> handler for the events this service consumes."""
        return {}

    def dependencies(self) -> dict[str, Check]:
        checks: dict[str, Check] = {"s3": self.store.ping}
        if self.uses_kafka:
            checks["kafka"] = lambda: tcp_reachable(self.settings.kafka_bootstrap)
        if self.consumer is not None:
            consumer = self.consumer
            checks["kafka_consumer"] = lambda: consumer.healthy
        return checks

    def on_start(self) -> None:
        """Runs after Kafka and S3 are reachable, before the server and consumer start."""
        self.store.ensure_bucket(self.settings.s3_bucket)

    def after_batch(self) -> None:
        """Runs on the consumer thread after each polled batch is committed (periodic work)."""

    def concurrent_topics(self) -> dict[str, int]:
        """Topics whose records of one poll are handled by that many threads at once (thread-safe handlers only)."""
        return {}

    def before_commit(self) -> None:
        """Runs on the consumer thread before offsets are committed: make the batch's own state durable here.

        Raise DependencyUnavailable to have the commit retried."""

    def on_stop(self) -> None:
        """Runs after consumption stopped, before the process exits."""

    # ---- runtime -----------------------------------------------------------------------------
    def _wait_for_infrastructure(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline and not self.stopping.is_set():
            try:
                if self.uses_kafka:
                    ensure_topics(self.kafka_config, all_topic_names())
                self.on_start()
                return
            except Exception as exc:  # noqa: BLE001 - any start-up failure is retried until the deadline
                last_error = exc
                log.warning("waiting for infrastructure", extra={"error": str(exc)[:300]})
                self.stopping.wait(2.0)
        raise DependencyUnavailable(f"infrastructure not reachable within {timeout_s:.0f}s: {last_error}")

    def start(self) -> None:
        s = self.settings
        metrics.serve(s.metrics_port, s.grpc_host)
        metrics.build_info(self.name)
        self._wait_for_infrastructure()
        if self.uses_kafka:
            self.publisher = Publisher(self.kafka_config, self.metrics)

        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix=f"{self.name}-grpc"),
            # Metrics outermost, so refused calls are counted with their code.
            interceptors=[metrics.ServerMetricsInterceptor(self.metrics), *self.security.interceptors(self.metrics)],
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.so_reuseport", 0)],
        )
        names = self.register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self._service_names = names
        bound = self.security.add_port(self.server, f"{s.grpc_host}:{s.grpc_port}")
        if bound == 0:
            raise RuntimeError(f"cannot bind gRPC port {s.grpc_host}:{s.grpc_port} (IEX_GRPC_PORT)")
        self.server.start()

        handlers = self.handlers()
        if handlers:
            self.consumer = ConsumerLoop(
                self.kafka_config,
                group_id=f"iex-{self.name}",
                handlers=handlers,
                publisher=self.publisher,
                metrics=self.metrics,
                max_poll_records=self.max_poll_records,
                after_batch=self.after_batch,
                before_commit=self.before_commit,
                concurrency=self.concurrent_topics(),
            )
            self.consumer.start()
        threading.Thread(target=self._health_loop, name="health", daemon=True).start()
        log.info(
            "started",
            extra={"grpc": f"{s.grpc_host}:{s.grpc_port}", "metrics": s.metrics_port, "security": self.security.describe(), "settings": str(settings_mod.redacted(s))},
        )

    def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self._service_names]:
            self.health.set(name, status)
        self.ready_gauge.set(1 if serving else 0)

    def check_dependencies(self) -> dict[str, bool]:
        results = {}
        for name, check in self.dependencies().items():
            try:
                results[name] = bool(check())
            except Exception:  # noqa: BLE001 - a failing probe means the dependency is down
                results[name] = False
            self.dependency_gauge.labels(dependency=name).set(1 if results[name] else 0)
        return results

    def _health_loop(self) -> None:
        previous = None
        while not self.stopping.is_set():
            results = self.check_dependencies()
            serving = all(results.values())
            if serving != previous:
                log.info("readiness changed", extra={"serving": serving, "dependencies": str(results)})
                previous = serving
            if not self.stopping.is_set():
                self._set_health(serving)
            self.stopping.wait(2.0)

    def stop(self) -> None:
        """Graceful drain: NOT_SERVING, stop consuming (commit), stop the server with grace."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.health.enter_graceful_shutdown()
        self.ready_gauge.set(0)
        if self.consumer is not None:
            self.consumer.stop(timeout_s=self.settings.drain_grace_s + 20)
        if self.server is not None:
            self.server.stop(grace=self.settings.drain_grace_s).wait()
        try:
            self.on_stop()
        finally:
            if self.publisher is not None:
                self.publisher.close()
        log.info("stopped")

    def wait(self) -> None:
        done = threading.Event()

        def on_signal(signum, _frame):
            log.info("signal received, draining", extra={"signal": signal.Signals(signum).name})
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not done.is_set():
            if self.consumer is not None and self.consumer.stopped and not self.stopping.is_set():
                raise RuntimeError("consumer loop ended unexpectedly")
            done.wait(1.0)


def main(service_class: type[Service]) -> int:
    """Entry point of `python -m services.<name>`: settings, logs, run until SIGTERM."""
    try:
        settings = settings_mod.load_service_settings(service_class.settings_class, service_class.name)
    except settings_mod.SettingsError as exc:
        print(f"{service_class.name}: {exc}", file=sys.stderr)
        return 2
    logs.configure(service_class.name, settings.log_level)
    try:
        service = service_class(settings)
    except settings_mod.SettingsError as exc:
        print(f"{service_class.name}: {exc}", file=sys.stderr)
        return 2
    try:
        service.start()
        service.wait()
    except DependencyUnavailable as exc:
        log.error("cannot start", extra={"error": str(exc)})
        return 3
    finally:
        service.stop()
    return 0
