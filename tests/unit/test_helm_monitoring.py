"""Prometheus rules and Grafana dashboards of the chart, checked offline with promtool.

promtool comes with Debian's prometheus package (installed by `make setup`); a missing promtool
fails these tests. The metric names of every query are checked against the running stack in
tests/integration/test_dashboards.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "helm" / "tools"))

import dashboards  # noqa: E402
import generate  # noqa: E402
import promql_names  # noqa: E402

CHART = ROOT / "helm" / "internet-explorer"
RULES = CHART / "files" / "prometheus" / "rules.yaml"
RULE_TESTS = CHART / "files" / "prometheus" / "rules.test.yaml"
DASHBOARD_FILES = sorted((CHART / "files" / "dashboards").glob("*.json"))
# Grafana's variables, replaced by values Prometheus accepts so promtool can parse the queries.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "6h", "$__interval": "1m", "$namespace": ".*"}


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.fail("promtool not found: apt-get install prometheus (make setup does it)")
    return found


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, PromQL) of every query, template variables included."""
    queries = []
    for path in DASHBOARD_FILES:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                queries.append((path.name, panel["title"], target["expr"]))
        for variable in board["templating"]["list"]:
            if variable.get("type") == "query":
                queries.append((path.name, f"variable {variable['name']}", variable["definition"].removeprefix("label_values(").split(",")[0]))
    return queries


def substitute(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


# ---- rules --------------------------------------------------------------------------------------


def test_promtool_check_rules(promtool):
    out = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_rule_unit_tests(promtool):
    """Each alert fires on the failure it names and stays quiet on a healthy twin."""
    out = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, cwd=RULE_TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    tested = {t["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"] for t in case.get("alert_rule_test", [])}
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == tested, f"alerts without a unit test: {sorted(alerts - tested)}"


def test_the_alerts_the_issue_asks_for_exist():
    alerts = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    for wanted, metric in (
        ("IexKafkaConsumerLagGrowing", "kafka_consumer_lag_messages"),
        ("IexCrawlerErrorRatioHigh", "iex_crawler_urls_total"),
        ("IexNoNewModelVersion", "iex_trainer_iterations_trained_total"),
        ("IexTritonModelLoadFailures", "iex_scorer_model_load_failures_total"),
        ("IexPlannerIterationStalled", "iex_planner_iterations_finished_total"),
    ):
        assert metric in alerts[wanted]["expr"]
        assert alerts[wanted]["labels"]["severity"] in ("warning", "critical")
        assert alerts[wanted]["annotations"]["summary"]


def test_prometheus_rule_object_carries_the_same_rules(promtool, tmp_path):
    helm = generate.helm_binary()
    out = subprocess.run(
        [helm, "template", "iex", str(CHART), "--set", "metrics.prometheusRule.enabled=true", "--show-only", "templates/prometheusrule.yaml"],
        capture_output=True,
        text=True,
        check=True,
    )
    rule = yaml.safe_load(out.stdout)
    assert rule["kind"] == "PrometheusRule" and rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    extracted = tmp_path / "rules.yaml"
    extracted.write_text(yaml.safe_dump(rule["spec"]))
    check = subprocess.run([promtool, "check", "rules", str(extracted)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_monitors_select_the_metrics_ports(tmp_path):
    helm = generate.helm_binary()
    out = subprocess.run(
        [helm, "template", "iex", str(CHART), "--set", "metrics.serviceMonitor.enabled=true"], capture_output=True, text=True, check=True
    )
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor" and d["metadata"]["name"] == "iex-internet-explorer"]
    components = set(monitor["spec"]["selector"]["matchExpressions"][0]["values"])
    assert components == {"planner", "crawler", "dedup", "scorer", "trainer", "search", "triton"}
    selected = [
        d
        for d in docs
        if d["kind"] == "Service"
        and d["metadata"]["labels"].get("app.kubernetes.io/component") in components
        and all(d["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    ]
    assert len(selected) == len(components)
    for service in selected:
        assert "metrics" in {p["name"] for p in service["spec"]["ports"]}, service["metadata"]["name"]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


@pytest.mark.parametrize("kind, flag", [("ServiceMonitor", "serviceMonitor"), ("PodMonitor", "podMonitor")])
def test_the_charts_minio_is_scraped_and_only_metrics_peers_may(kind, flag):
    """MinIO's cluster metrics are scraped on its S3 port without a token while a monitor is on; the
    NetworkPolicy opens that port to networkPolicy.metricsFrom only then. (The chart's Kafka exposes
    JMX only: no monitor.)"""
    helm = generate.helm_binary()

    def render(*sets):
        args = [helm, "template", "iex", str(CHART)] + [a for s in sets for a in ("--set", s)]
        return [d for d in yaml.safe_load_all(subprocess.run(args, capture_output=True, text=True, check=True).stdout) if d]

    def minio(docs):
        deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-minio"))
        env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
        policy = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-minio"))
        return env, policy["spec"]["ingress"]

    docs = render(f"metrics.{flag}.enabled=true")
    (monitor,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith("-minio")]
    endpoints = monitor["spec"]["endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"]
    assert [(e["port"], e["path"]) for e in endpoints] == [("s3", "/minio/v2/metrics/cluster")]
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "minio"
    env, ingress = minio(docs)
    assert env["MINIO_PROMETHEUS_AUTH_TYPE"] == "public"
    assert {"ports": [{"port": "s3", "protocol": "TCP"}], "from": [{"namespaceSelector": {}}]} in ingress
    assert not [d for d in docs if d["kind"] in ("ServiceMonitor", "PodMonitor") and "kafka" in d["metadata"]["name"]]

    off = render()
    env, ingress = minio(off)
    assert "MINIO_PROMETHEUS_AUTH_TYPE" not in env and len(ingress) == 1
    assert not [d for d in render(f"metrics.{flag}.enabled=true", "minio.enabled=false", "s3.endpoint=s3.example:443", "s3.existingSecret=my-s3") if d["kind"] == kind and d["metadata"]["name"].endswith("-minio")]


# ---- dashboards -----------------------------------------------------------------------------------


def test_dashboards_are_valid_grafana_json():
    assert {p.name for p in DASHBOARD_FILES} == {"exploration-progress.json", "pipeline-health.json", "gpu-trainer.json", "triton.json"}
    uids = set()
    for path in DASHBOARD_FILES:
        board = json.loads(path.read_text())
        assert board["uid"] not in uids and len(board["uid"]) <= 40
        uids.add(board["uid"])
        assert board["schemaVersion"] >= 36 and board["title"].startswith("Internet Explorer / ")
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in board["panels"]:
            grid = panel["gridPos"]
            assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, f"{path.name}: {panel['title']} overflows the grid"
            if panel["type"] == "text":
                continue
            assert panel["targets"], f"{path.name}: {panel['title']} has no query"
            assert panel["datasource"]["uid"] == "${datasource}"
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs))


def test_every_dashboard_query_parses(promtool, tmp_path):
    """promtool parses each query (as a recording rule), after Grafana's variables are replaced."""
    rules = {"groups": [{"name": "dashboards", "rules": []}]}
    for number, (board, title, expr) in enumerate(dashboard_queries()):
        rules["groups"][0]["rules"].append({"record": f"dashboard:query:{number}", "expr": substitute(expr), "labels": {"panel": f"{board}/{title}"}})
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(rules["groups"][0]["rules"]) > 60


def test_dashboards_cover_what_the_issue_asks_for():
    text = {p.stem: p.read_text() for p in DASHBOARD_FILES}
    for board, needles in {
        "exploration-progress": ("iex_planner_iterations_finished_total", "iex_crawler_urls_total", "iex_dedup_objects_stored_total",
                                 "iex_scorer_images_scored_total", "iex_scorer_image_reward_bucket", "Top concepts"),
        "pipeline-health": ("kafka_consumed_total", "kafka_consumer_lag_messages", "kafka_dead_lettered_total", "iex_crawler_urls_total"),
        "gpu-trainer": ("iex_trainer_train_throughput_images_per_second", "iex_trainer_train_loss", "iex_trainer_gpu_utilization_ratio"),
        "triton": ("nv_inference_request_duration_us", "nv_inference_exec_count", "iex_scorer_inference_batch_images"),
    }.items():
        for needle in needles:
            assert needle in text[board], f"{board} lacks {needle}"


def test_dashboards_ship_as_configmaps_for_the_grafana_sidecar():
    helm = generate.helm_binary()
    out = subprocess.run([helm, "template", "iex", str(CHART), "--show-only", "templates/dashboards.yaml"], capture_output=True, text=True, check=True)
    maps = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(maps) == len(DASHBOARD_FILES)
    for config_map in maps:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((name, body),) = config_map["data"].items()
        assert json.loads(body) == json.loads((CHART / "files" / "dashboards" / name).read_text())


# ---- the name extractor the integration test relies on ------------------------------------------------


@pytest.mark.parametrize(
    "expr, names",
    [
        ("sum by (namespace, job) (rate(iex_crawler_urls_total{status!=\"ok\"}[5m]))", {"iex_crawler_urls_total"}),
        ("histogram_quantile(0.95, sum by (le) (rate(a_seconds_bucket[5m])))", {"a_seconds_bucket"}),
        ('{__name__=~"iex_(planner|crawler)_ready"} == 0', {"iex_planner_ready", "iex_crawler_ready"}),
        ('{__name__="up"}', {"up"}),
        ("a / ignoring(code) group_left(method, le) b offset 1h", {"a", "b"}),
        ("min_over_time((sum by (namespace) (x{state=\"running\"}))[1h:1m]) > 0 unless on (namespace) y", {"x", "y"}),
        ("sum without (instance) (c) * 1e6 + count(d) and topk(3, e)", {"c", "d", "e"}),
        ('label_replace(f, "dst", "$1", "src", "(.*)")', {"f"}),
        ("sum(rate(my_total[$__rate_interval])) / sum(rate(my_total[$__range]))", {"my_total"}),
        ("nan + inf + vector(1) + time()", set()),
    ],
)
def test_metric_names_of_expressions(expr, names):
    assert promql_names.metric_names(expr) == names


def test_metric_names_refuses_what_it_cannot_check():
    with pytest.raises(promql_names.PromQLError):
        promql_names.metric_names('{__name__=~"iex_.*_ready"}')
    with pytest.raises(promql_names.PromQLError):
        promql_names.metric_names('{__name__!="x"}')


def test_exposed_names_of_a_metrics_page():
    page = "\n".join(
        [
            "# HELP iex_x_requests_total requests",
            "# TYPE iex_x_requests_total counter",
            "# HELP iex_x_latency_seconds latency",
            "# TYPE iex_x_latency_seconds histogram",
            "# TYPE iex_x_ready gauge",
            "iex_x_ready 1.0",
            "# TYPE nv_inference_count counter",
            'nv_inference_count{model="m",version="1"} 3',
        ]
    )
    names = promql_names.exposed_names(page)
    assert {"iex_x_requests_total", "iex_x_latency_seconds_bucket", "iex_x_latency_seconds_count", "iex_x_ready", "nv_inference_count"} <= names
    assert "iex_x_latency_seconds" not in names and "iex_x_requests" not in names and "iex_x_latency_seconds_total" not in names


def test_external_gpu_metrics_are_named_and_few():
    used = set().union(*(promql_names.metric_names(substitute(e)) for _, _, e in dashboard_queries()))
    external = used & set(dashboards.EXTERNAL_METRICS)
    assert external == set(dashboards.EXTERNAL_METRICS), "an allowed external metric no panel uses should be removed"
    assert all(name.startswith("nv_gpu_") for name in external)
