"""The cluster suite: the chart installed on the local Kubernetes cluster of k8s/cluster.

Run only by `make test-cluster` (or `make cluster-ci`), which sets IEX_CLUSTER_SUITE=1 after
`make cluster-up cluster-install`; any other pytest run collects nothing here, so `make test`
and a bare `pytest` never touch a cluster.

Everything goes through the cluster's API as a user's would: kubectl (the binary built by
k8s/cluster/build-binaries.sh, the admin kubeconfig of k8s/cluster/up.sh), `kubectl port-forward`
to reach Services from outside, the chart's Secrets for the CA, the token and the S3 keys.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUITE_ENV = "IEX_CLUSTER_SUITE"

if os.environ.get(SUITE_ENV) != "1":
    collect_ignore_glob = ["test_*.py"]


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: needs the local Kubernetes cluster (make cluster-ci)")


def cluster_env() -> dict[str, str]:
    """The settings of k8s/cluster/env.sh (paths derived there, never spelled here)."""
    out = subprocess.run(
        ["bash", "-c", f"source {REPO / 'k8s/cluster/env.sh'}; "
         'echo "BIN=$BIN"; echo "RUN=$IEX_CLUSTER_RUN"; echo "HELM=$HELM_BIN"; echo "NODE_IP=$NODE_IP"; echo "BRIDGE=$BRIDGE"; '
         'echo "POD_CIDR=$POD_CIDR"'],
        capture_output=True, text=True, check=True,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@dataclass
class Cluster:
    kubectl_bin: str
    helm_bin: str
    kubeconfig: str
    namespace: str
    release: str
    node_ip: str
    bridge: str
    pod_cidr: str

    @property
    def fullname(self) -> str:
        return f"{self.release}-internet-explorer"

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": self.kubeconfig}

    def kubectl(self, *args: str, namespace: str | None = None, check: bool = True, timeout: float = 120) -> str:
        ns = ["-n", namespace or self.namespace]
        proc = subprocess.run([self.kubectl_bin, *ns, *args], capture_output=True, text=True, env=self.env(), timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return proc.stdout

    def kubectl_json(self, *args: str, namespace: str | None = None) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json", namespace=namespace))

    def helm(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
        return subprocess.run([self.helm_bin, "-n", self.namespace, *args], capture_output=True, text=True, env=self.env(), timeout=timeout)

    def secret(self, name: str, key: str) -> str:
        data = self.kubectl_json("get", "secret", name)["data"]
        return base64.b64decode(data[key]).decode()

    @contextmanager
    def port_forward(self, target: str, remote_port: int, namespace: str | None = None):
        """`kubectl port-forward` on 127.0.0.1 and a free local port; yields that port."""
        proc = subprocess.Popen(
            [self.kubectl_bin, "-n", namespace or self.namespace, "port-forward", "--address", "127.0.0.1", target, f":{remote_port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env(),
        )
        try:
            deadline = time.monotonic() + 60
            port = None
            while time.monotonic() < deadline and port is None:
                line = proc.stdout.readline()
                if not line and proc.poll() is not None:
                    break
                match = re.search(r"Forwarding from 127\.0\.0\.1:(\d+)", line)
                if match:
                    port = int(match.group(1))
            if port is None:
                raise AssertionError(f"kubectl port-forward {target} did not start (exit {proc.poll()})")
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def pods(self, component: str | None = None) -> list[dict]:
        selector = [f"app.kubernetes.io/instance={self.release}"]
        if component:
            selector.append(f"app.kubernetes.io/component={component}")
        return self.kubectl_json("get", "pods", "-l", ",".join(selector))["items"]

    def wait_rollout(self, kind_name: str, timeout_s: int = 600) -> None:
        self.kubectl("rollout", "status", kind_name, f"--timeout={timeout_s}s", timeout=timeout_s + 30)


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    env = cluster_env()
    kubeconfig = Path(env["RUN"]) / "admin.kubeconfig"
    if not kubeconfig.is_file():
        pytest.fail(f"no cluster: {kubeconfig} is missing (make cluster-up cluster-install first)")
    c = Cluster(
        kubectl_bin=str(Path(env["BIN"]) / "kubectl"),
        helm_bin=env["HELM"],
        kubeconfig=str(kubeconfig),
        namespace=os.environ.get("IEX_CLUSTER_NAMESPACE", "internet-explorer"),
        release=os.environ.get("IEX_CLUSTER_RELEASE", "iex"),
        node_ip=env["NODE_IP"],
        bridge=env["BRIDGE"],
        pod_cidr=env["POD_CIDR"],
    )
    status = c.helm("status", c.release, "-o", "json")
    if status.returncode != 0:
        pytest.fail(f"release {c.release} is not installed in {c.namespace}: {status.stderr.strip()} (make cluster-install)")
    return c
