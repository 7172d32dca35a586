"""The chart on a real cluster (k8s/cluster): helm test, an exploration from outside the cluster,
Prometheus, a pod deleted mid-exploration, a helm upgrade mid-exploration, NetworkPolicies.

Ordered: the exploration tests share the release, the upgrade runs last.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from cluster_client import (
    assert_nothing_lost,
    create_exploration,
    object_store,
    planner_client,
    state_name,
    wait_ended,
)

from iex.v1 import common_pb2

pytestmark = pytest.mark.cluster

SERVICES = ("planner", "crawler", "dedup", "scorer", "trainer", "search")
UPGRADE_TAG = "0.1.0-upgrade"  # k8s/cluster/import-images.sh tags the built images with it too


@pytest.mark.order(1)
def test_helm_test_passes(cluster):
    # No --logs: the chart deletes the test pod once it succeeded (hook-delete-policy).
    result = cluster.helm("test", cluster.release, timeout=600)
    print("\n".join(line for line in result.stdout.splitlines() if line.startswith(("NAME:", "STATUS:", "TEST SUITE:", "Last ", "Phase:"))))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert re.search(r"Phase:\s+Succeeded", result.stdout), result.stdout


@pytest.mark.order(2)
def test_every_pod_ready_and_images_local(cluster):
    pods = [p for p in cluster.pods() if p["status"].get("phase") != "Succeeded"]
    components = {p["metadata"]["labels"].get("app.kubernetes.io/component") for p in pods}
    assert set(SERVICES) | {"triton", "kafka", "minio"} <= components, components
    for pod in pods:
        ready = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}.get("Ready")
        assert ready == "True", (pod["metadata"]["name"], pod["status"].get("conditions"))
        for container in pod["spec"]["containers"]:
            assert container["imagePullPolicy"] == "Never", (pod["metadata"]["name"], container["image"])


@pytest.mark.order(2)
def test_kafka_topics_job_created_every_topic_with_its_retention(cluster):
    """The chart's topic Job (a post-install/upgrade hook) left every topic of values.yaml with
    its partitions and retention, whether it created the topic or a service did first."""
    import yaml

    values = yaml.safe_load((cluster_chart() / "values.yaml").read_text())["kafka"]["topics"]
    retention = int(values["retentionHours"]) * 3600000
    kafka = f"{cluster.fullname}-kafka-0"
    out = cluster.kubectl("exec", kafka, "--", "/opt/kafka/bin/kafka-configs.sh", "--bootstrap-server", "localhost:9092",
                          "--describe", "--entity-type", "topics", timeout=180)
    configured, current = {}, None
    for line in out.splitlines():
        m = re.match(r"Dynamic configs for topic (\S+) are:", line)
        if m:
            current = m.group(1)
        elif current and (r := re.match(r"\s+retention\.ms=(\d+) ", line)):
            configured[current] = int(r.group(1))
    wrong = {t: configured.get(t) for t in values["names"] if configured.get(t) != retention}
    assert not wrong, f"topics without retention.ms={retention}: {wrong}"
    described = cluster.kubectl("exec", kafka, "--", "/opt/kafka/bin/kafka-topics.sh", "--bootstrap-server", "localhost:9092",
                                "--describe", "--topic", "iex\\..*", timeout=180)
    partitions = dict(re.findall(r"Topic: (\S+)\s+TopicId: \S+\s+PartitionCount: (\d+)", described))
    assert {t: int(partitions.get(t, 0)) for t in values["names"]} == {t: values["partitions"] for t in values["names"]}, partitions


PROBE_POD = """
apiVersion: v1
kind: Pod
metadata:
  name: iex-cluster-policy-probe
  labels: {app.kubernetes.io/name: policy-probe}
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  securityContext: {runAsNonRoot: true, runAsUser: 10001, seccompProfile: {type: RuntimeDefault}}
  containers:
    - name: probe
      image: IMAGE
      imagePullPolicy: Never
      command: [python, -c]
      args:
        - |
          import socket
          try:
              socket.create_connection(("TARGET", PORT), timeout=5).close()
              print("REACHED")
          except OSError as exc:
              print("REFUSED", exc)
      securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
      resources: {requests: {cpu: 10m, memory: 64Mi}, limits: {memory: 256Mi}}
"""


@pytest.mark.order(2)
def test_network_policies_admitted_and_what_the_bridge_cni_enforces(cluster):
    """Every NetworkPolicy of the release is admitted. The bridge CNI does not enforce them: a pod
    that no policy lets reach Triton's gRPC port (only the scorer may) reaches it. (docs/cluster.md)"""
    manifest = cluster.helm("get", "manifest", cluster.release).stdout
    rendered = set(re.findall(r"kind: NetworkPolicy\nmetadata:\n  name: (\S+)", manifest))
    admitted = {p["metadata"]["name"] for p in cluster.kubectl_json("get", "networkpolicies")["items"]}
    print(f"NetworkPolicies rendered {len(rendered)}, admitted {len(admitted)}")
    assert rendered and rendered <= admitted, (rendered, admitted)

    image = cluster.pods("planner")[0]["spec"]["containers"][0]["image"]
    pod = PROBE_POD.replace("IMAGE", image).replace("TARGET", f"{cluster.fullname}-triton").replace("PORT", "8001")
    cluster.kubectl("delete", "pod", "iex-cluster-policy-probe", "--ignore-not-found", "--wait=true")
    subprocess.run([cluster.kubectl_bin, "-n", cluster.namespace, "apply", "-f", "-"], input=pod, text=True,
                   env=cluster.env(), check=True, capture_output=True)
    try:
        deadline = time.monotonic() + 180
        phase = ""
        while time.monotonic() < deadline and phase not in ("Succeeded", "Failed"):
            time.sleep(3)
            phase = cluster.kubectl_json("get", "pod", "iex-cluster-policy-probe")["status"].get("phase", "")
        out = cluster.kubectl("logs", "iex-cluster-policy-probe")
    finally:
        cluster.kubectl("delete", "pod", "iex-cluster-policy-probe", "--ignore-not-found", "--wait=false")
    print(f"a pod outside every policy -> triton:8001: {out.strip()}")
    # Not enforced by the bridge CNI: the connection goes through. With Calico or Cilium it would be refused.
    assert out.startswith("REACHED"), out


@pytest.mark.order(3)
def test_exploration_from_outside_succeeds(cluster):
    with planner_client(cluster) as planner:
        exploration_id = create_exploration(cluster, planner, "first")
    final = wait_ended(lambda: planner_client(cluster), exploration_id, timeout_s=1500)
    print(f"exploration {exploration_id}: {state_name(final.state)}, counts {final.counts}")
    assert final.state == common_pb2.EXPLORATION_STATE_SUCCEEDED, (state_name(final.state), final.error)
    assert_nothing_lost(final)

    # Objects in the cluster's MinIO: the stored images and the planner's state.
    with object_store(cluster) as store:
        keys = list(store.list_keys("iex", ""))
    prefixes = sorted({k.split("/", 1)[0] for k in keys})
    print(f"MinIO bucket iex: {len(keys)} objects under {prefixes}")
    assert len(keys) > final.counts.images_unique, (len(keys), prefixes)

    # Events on the cluster's Kafka: end offsets of the exploration's topics, read in the broker's pod.
    kafka = f"{cluster.fullname}-kafka-0"
    offsets = {}
    for topic in ("iex.planner.queries.v1", "iex.crawler.images-fetched.v1", "iex.dedup.images-stored.v1",
                  "iex.scorer.images-scored.v1", "iex.planner.iterations.v1"):
        out = cluster.kubectl("exec", kafka, "--", "/opt/kafka/bin/kafka-run-class.sh", "org.apache.kafka.tools.GetOffsetShell",
                              "--bootstrap-server", "localhost:9092", "--topic", topic, timeout=120)
        offsets[topic] = sum(int(m.group(1)) for m in re.finditer(rf"^{re.escape(topic)}:\d+:(\d+)$", out, re.M))
    print(f"Kafka end offsets: {offsets}")
    assert all(n > 0 for n in offsets.values()), offsets


def prometheus_query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback port-forward
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.order(4)
def test_prometheus_scrapes_every_service(cluster):
    with cluster.port_forward("svc/prometheus", 9090, namespace="iex-monitoring") as port:
        deadline = time.monotonic() + 120
        while True:
            up = {r["metric"].get("job"): r["value"][1] for r in prometheus_query(port, "up")}
            if all(up.get(s) == "1" for s in (*SERVICES, "triton")) or time.monotonic() > deadline:
                break
            time.sleep(5)
        print(f"up: {up}")
        assert {s: up.get(s) for s in (*SERVICES, "triton")} == {s: "1" for s in (*SERVICES, "triton")}, up
        # The services' own series are there (what the dashboards query).
        names = prometheus_query(port, 'count by (__name__) ({__name__=~"iex_.+"})')
        print(f"{len(names)} iex_* metric names scraped")
        assert len(names) > 20, names


# Series that exist only on a GPU (Triton's nv_gpu_*) or once an error of that kind happened
# (labelled counters of failures, dead letters, skipped images): a clean CPU run has none.
NO_DATA_EXPECTED = re.compile(r"nv_gpu_|_dead_lettered_|_handler_errors_|_images_skipped_|_model_load_failures_")


def chart_dashboards():
    """helm/tools/dashboards.py: the chart's own tools, next to the chart."""
    sys.path.insert(0, str(cluster_chart().parents[1] / "helm" / "tools"))
    import dashboards  # noqa: PLC0415

    return dashboards


@pytest.mark.order(5)
def test_every_dashboard_query_returns_data(cluster):
    """After the first exploration, every query of the Grafana dashboards runs on the in-cluster
    Prometheus and returns series, but for GPU and error-only families (NO_DATA_EXPECTED)."""
    empty, refused = [], []
    with cluster.port_forward("svc/prometheus", 9090, namespace="iex-monitoring") as port:
        dashboards = chart_dashboards()
        queries = dashboards.rendered_queries(cluster_chart() / "files" / "dashboards")
        for where, expr in queries:
            expr = dashboards.substitute_variables(expr)
            try:
                result = prometheus_query(port, expr)
            except (AssertionError, OSError) as exc:
                refused.append((where, str(exc)[:200]))
                continue
            if not result and not NO_DATA_EXPECTED.search(expr):
                empty.append((where, expr))
    print(f"{len(queries)} dashboard queries: {len(refused)} refused, {len(empty)} without data (GPU and error-only families aside)")
    assert not refused, refused
    assert not empty, empty


def delete_pod_when(cluster, component: str, condition):
    """An on_poll callback: deletes the component's pod once `condition(exploration)` holds."""
    done = {}

    def poll(exploration):
        if not done and exploration.state == common_pb2.EXPLORATION_STATE_RUNNING and condition(exploration):
            pod = cluster.pods(component)[0]["metadata"]["name"]
            cluster.kubectl("delete", "pod", pod, "--wait=false")
            done["pod"], done["counts"] = pod, str(exploration.counts).replace("\n", " ")
            print(f"deleted pod {pod} at iteration {exploration.current_iteration}: {done['counts']}")

    return poll, done


@pytest.mark.order(6)
def test_deleting_a_service_pod_mid_exploration_loses_nothing(cluster):
    with planner_client(cluster) as planner:
        exploration_id = create_exploration(cluster, planner, "pod-deleted", iterations=2)
    poll, done = delete_pod_when(cluster, "dedup", lambda e: e.counts.images_fetched > 0)
    final = wait_ended(lambda: planner_client(cluster), exploration_id, timeout_s=1800, on_poll=poll)
    print(f"exploration {exploration_id}: {state_name(final.state)}, counts {final.counts}")
    assert done, "the exploration ended before a pod could be deleted"
    assert_nothing_lost(final)


@pytest.mark.order(7)
def test_helm_upgrade_to_a_new_tag_rolls_without_losing_work(cluster):
    with planner_client(cluster) as planner:
        exploration_id = create_exploration(cluster, planner, "upgrade", iterations=2)
    started = {}

    def upgrade_once(exploration):
        if not started and exploration.state == common_pb2.EXPLORATION_STATE_RUNNING and exploration.counts.images_fetched > 0:
            started["t"] = time.monotonic()
            result = cluster.helm("upgrade", cluster.release, str(cluster_chart()), "--reuse-values",
                                  "--set", f"image.tag={UPGRADE_TAG}", "--set", f"trainerImage.tag={UPGRADE_TAG}",
                                  "--wait", "--timeout", "15m")
            started["rc"], started["out"] = result.returncode, (result.stdout + result.stderr)[-2000:]
            print(f"helm upgrade (image tag {UPGRADE_TAG}) took {time.monotonic() - started['t']:.0f}s: rc {result.returncode}")

    final = wait_ended(lambda: planner_client(cluster), exploration_id, timeout_s=2400, on_poll=upgrade_once)
    assert started, "the exploration ended before the upgrade started"
    assert started["rc"] == 0, started["out"]
    images = {c["image"] for p in cluster.pods() for c in p["spec"]["containers"]
              if p["metadata"]["labels"].get("app.kubernetes.io/component") in SERVICES and p["status"].get("phase") == "Running"}
    print(f"service images after the upgrade: {images}")
    assert images and all(i.endswith(f":{UPGRADE_TAG}") for i in images), images
    print(f"exploration {exploration_id}: {state_name(final.state)}, counts {final.counts}")
    assert_nothing_lost(final)


def cluster_chart() -> Path:
    return Path(__file__).resolve().parents[2] / "helm" / "internet-explorer"
