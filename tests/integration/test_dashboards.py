"""Every metric name in the chart's Grafana dashboards and Prometheus rules is one the running
services (and Triton) actually expose.

The full local stack runs (stack_env); a tiny encoder is loaded into its Triton and called once,
so Triton lists its per-model inference families too. Names come from the `# TYPE` lines of each
/metrics page (prometheus_client lists every family, labelled or not, before its first sample) and
from sample lines. The only names allowed beyond those are the GPU families of
helm/tools/dashboards.py EXTERNAL_METRICS (no GPU here) and, in rules, Prometheus's own `up`.
Each query is also run against the stack's Prometheus, which must accept it.
"""

from __future__ import annotations

import json
import shutil
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "helm" / "tools"))

import dashboards  # noqa: E402
import promql_names  # noqa: E402

from services.common import endpoints  # noqa: E402
from services.common import modelrepo  # noqa: E402

CHART = ROOT / "helm" / "internet-explorer"
RULES = CHART / "files" / "prometheus" / "rules.yaml"
PROBE_MODEL = "iex_dashboard_probe"
PROBE_SIZE = 8


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and template variable of every dashboard."""
    return dashboards.rendered_queries(CHART / "files" / "dashboards")


def rule_queries() -> list[tuple[str, str]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(f"rule {r.get('alert') or r.get('record')}", r["expr"]) for g in groups for r in g["rules"]]


def tiny_encoder_onnx() -> bytes:
    """uint8 [N, S, S, 3] -> mean colour [N, 3]: the encoder contract with nothing to train."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["pixels"], ["embeddings"], axes=[1, 2], keepdims=0),
        ],
        "dashboard_probe",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", PROBE_SIZE, PROBE_SIZE, 3])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://{endpoints.LOOPBACK}:{port}/metrics", timeout=10) as response:
        return response.read().decode()


@pytest.fixture(scope="module")
def exposed(stack_env) -> dict[str, set[str]]:
    """Exposed sample names per process of the running stack, Triton after one inference."""
    repository = Path(stack_env["IEX_MODEL_REPOSITORY"])
    modelrepo.write_model_version(repository, PROBE_MODEL, 1, tiny_encoder_onnx(), PROBE_SIZE, 3, overwrite=True)
    encoder = modelrepo.TritonEncoder(stack_env["IEX_TRITON_GRPC_URL"], timeout_s=60)
    try:
        encoder.load(PROBE_MODEL, 1)
        embeddings = encoder.embed(PROBE_MODEL, 1, np.full((2, PROBE_SIZE, PROBE_SIZE, 3), 51, dtype=np.uint8))
        assert embeddings.shape == (2, 3)
        pages = {name: scrape(ports.metrics) for name, ports in endpoints.SERVICE_PORTS.items()}
        pages["triton"] = scrape(endpoints.TRITON_METRICS_PORT)
    finally:
        try:
            encoder.unload(PROBE_MODEL)
        finally:
            encoder.close()
            shutil.rmtree(repository / PROBE_MODEL, ignore_errors=True)
    return {name: promql_names.exposed_names(page) for name, page in pages.items()}


def test_every_service_and_triton_expose_metrics(exposed):
    for service in endpoints.SERVICE_PORTS:
        assert f"iex_{service}_ready" in exposed[service], service
        assert "iex_build_info" in exposed[service]
    assert "nv_inference_request_success" in exposed["triton"], "Triton lists per-model families after a load"


def test_dashboard_queries_use_only_exported_metrics(exposed):
    available = set().union(*exposed.values())
    missing = {}
    used = set()
    for where, expr in dashboard_queries():
        names = promql_names.metric_names(dashboards.substitute_variables(expr))
        assert names, f"{where}: no metric in {expr!r}"
        used |= names
        unknown = names - available - set(dashboards.EXTERNAL_METRICS)
        if unknown:
            missing[where] = sorted(unknown)
    assert not missing, f"queries name metrics no service exposes: {json.dumps(missing, indent=1)}"
    # Each service family is named after the service that exposes it, not merely somewhere.
    for name in used:
        if name.startswith("iex_") and name != "iex_build_info":
            service = name.split("_")[1]
            assert name in exposed[service], f"{name} is not exposed by the {service} service"
    assert len(used) > 60


def test_rule_expressions_use_only_exported_metrics(exposed):
    available = set().union(*exposed.values()) | {"up"}
    for where, expr in rule_queries():
        names = promql_names.metric_names(expr)
        assert names and names <= available, f"{where}: {sorted(names - available)} not exposed"


def test_prometheus_of_the_stack_accepts_every_query(stack_env):
    base = stack_env["IEX_PROMETHEUS_URL"].rstrip("/")
    refused = {}
    for where, expr in dashboard_queries() + rule_queries():
        url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": dashboards.substitute_variables(expr)})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            refused[where] = body.get("error", body)
    assert not refused, refused
