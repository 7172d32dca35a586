"""The broker's OTLP metric pushes turned into Prometheus text (services/stack/otlp_bridge.py)."""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest

pytest.importorskip("opentelemetry.proto", reason="opentelemetry-proto (the stack extra) is not installed")

from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2  # noqa: E402
from opentelemetry.proto.common.v1 import common_pb2  # noqa: E402
from opentelemetry.proto.metrics.v1 import metrics_pb2  # noqa: E402

from services.stack import otlp_bridge  # noqa: E402


def _attr(key, value):
    return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(**({"int_value": value} if isinstance(value, int) else {"string_value": value})))


def _request() -> metrics_service_pb2.ExportMetricsServiceRequest:
    cumulative = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
    return metrics_service_pb2.ExportMetricsServiceRequest(
        resource_metrics=[
            metrics_pb2.ResourceMetrics(
                scope_metrics=[
                    metrics_pb2.ScopeMetrics(
                        metrics=[
                            metrics_pb2.Metric(
                                name="tansu_api_requests",
                                description="The number of API requests made",
                                sum=metrics_pb2.Sum(
                                    is_monotonic=True,
                                    aggregation_temporality=cumulative,
                                    data_points=[metrics_pb2.NumberDataPoint(as_int=7, attributes=[_attr("api_key", 3), _attr("api_version", 12)])],
                                ),
                            ),
                            metrics_pb2.Metric(
                                name="tansu_request_duration",
                                unit="ms",
                                description='API "latency"',
                                histogram=metrics_pb2.Histogram(
                                    aggregation_temporality=cumulative,
                                    data_points=[
                                        metrics_pb2.HistogramDataPoint(
                                            count=3, sum=12.5, explicit_bounds=[1.0, 10.0], bucket_counts=[1, 1, 1], attributes=[_attr("cluster_id", "c")]
                                        )
                                    ],
                                ),
                            ),
                            metrics_pb2.Metric(name="tansu.queue", gauge=metrics_pb2.Gauge(data_points=[metrics_pb2.NumberDataPoint(as_double=0.5)])),
                        ]
                    )
                ]
            )
        ]
    )


def test_counters_histograms_and_gauges_become_prometheus_text():
    text = otlp_bridge.to_prometheus(_request())
    assert "# TYPE tansu_api_requests_total counter" in text
    assert 'tansu_api_requests_total{api_key="3",api_version="12"} 7' in text
    assert "# TYPE tansu_request_duration_milliseconds histogram" in text
    assert 'tansu_request_duration_milliseconds_bucket{cluster_id="c",le="1"} 1' in text
    assert 'tansu_request_duration_milliseconds_bucket{cluster_id="c",le="+Inf"} 3' in text
    assert 'tansu_request_duration_milliseconds_sum{cluster_id="c"} 12.5' in text
    assert 'tansu_request_duration_milliseconds_count{cluster_id="c"} 3' in text
    assert '# HELP tansu_request_duration_milliseconds API \\"latency\\"' in text
    assert "tansu_queue 0.5" in text


def test_the_bridge_serves_the_last_push_and_drops_a_stale_one():
    bridge = otlp_bridge.Bridge(stale_s=0.5)
    server = otlp_bridge.make_server(("127.0.0.1", 0), bridge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        push = urllib.request.Request(f"{base}/v1/metrics", data=_request().SerializeToString(), headers={"Content-Type": "application/x-protobuf"})
        with urllib.request.urlopen(push, timeout=5) as reply:
            assert reply.status == 200
        metrics = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        assert "tansu_api_requests_total" in metrics and "iex_otlp_bridge_pushes_total 1" in metrics
        bad = urllib.request.Request(f"{base}/v1/metrics", data=b"\xff\xff not protobuf", headers={"Content-Type": "application/x-protobuf"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=5)
        assert refused.value.code == 400
        time.sleep(0.7)
        metrics = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        assert "tansu_api_requests_total" not in metrics  # stale: the broker stopped pushing
        assert "iex_otlp_bridge_rejected_total 1" in metrics
    finally:
        server.shutdown()
