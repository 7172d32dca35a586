"""Chart properties that the first real install (the local cluster of k8s/cluster, docs/cluster.md)
revealed, held here as render checks so they hold without a cluster."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from test_helm_chart import helm  # noqa: F401 - the helm binary fixture, shared

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "internet-explorer"
LOCAL_VALUES = ROOT / "k8s" / "cluster" / "values-local.yaml"


def render(helm: str, *args: str) -> list[dict]:
    out = subprocess.run([helm, "template", "iex", str(CHART), "--namespace", "iex-test", *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if str(quantity).endswith("m") else float(quantity)


def test_default_profile_fits_one_two_cpu_node(helm):
    """The first install stayed Pending: the default profile asked for 2.5 CPUs, more than a 2-CPU
    node (this machine, a small kind node) can reserve. Its long-running pods must leave room for
    the cluster's own (CoreDNS, a Prometheus)."""
    total = 0.0
    for d in render(helm):
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        spec = d["spec"]["template"]["spec"]
        per_pod = sum(cpu(c.get("resources", {}).get("requests", {}).get("cpu", "0")) for c in spec["containers"])
        total += per_pod * d["spec"].get("replicas", 1)
    assert total <= 1.5, f"the default profile requests {total:.2f} CPU"


def test_triton_local_config_is_selectable(helm):
    """The python-backend tritonserver (docker/triton-python.Dockerfile) has no onnxruntime backend:
    with modelConfigName=local Triton serves each model's own config.pbtxt (no --model-config-name)."""
    def triton_args(*extra):
        docs = render(helm, *extra)
        dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-triton"))
        return dep["spec"]["template"]["spec"]["containers"][0]["args"]

    assert "--model-config-name=production-cpu" in triton_args()
    assert not [a for a in triton_args("--set", "triton.modelConfigName=local") if a.startswith("--model-config-name")]


def test_local_cluster_values_render_with_local_images_only(helm):
    """k8s/cluster/values-local.yaml: every image of the release is one built on the machine."""
    docs = render(helm, "-f", str(LOCAL_VALUES))
    images = {}
    for d in docs:
        spec = (d.get("spec", {}).get("template", {}) or {}).get("spec") or (d["spec"] if d["kind"] == "Pod" else None)
        if not spec:
            continue
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            images[c["image"]] = c.get("imagePullPolicy")
    assert images and all(i.startswith("docker.io/internet-explorer/") or i.startswith("internet-explorer/") for i in images), images
    assert set(images.values()) == {"Never"}, images
