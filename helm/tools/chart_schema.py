"""values.schema.json of the chart, built from one description here and the services' settings classes.

Every object is closed (`additionalProperties: false`), so a misspelled key fails `helm install`
instead of being ignored. The `settings` map of each service accepts exactly the IEX_* variables
that service reads (from its settings class), minus the ones the chart itself sets.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

SERVICES = ("planner", "crawler", "dedup", "scorer", "trainer", "search")

# Variables the chart sets from its own values for every service; a `settings` entry may not
# override them (the Deployment would carry the variable twice).
CHART_MANAGED_COMMON = frozenset(
    {
        "IEX_SERVICE",
        "IEX_GRPC_HOST",
        "IEX_GRPC_PORT",
        "IEX_METRICS_PORT",
        "IEX_LOG_LEVEL",
        "IEX_S3_ENDPOINT",
        "IEX_S3_SECURE",
        "IEX_S3_REGION",
        "IEX_S3_BUCKET",
        "IEX_S3_ACCESS_KEY",
        "IEX_S3_SECRET_KEY",
        "IEX_KAFKA_BOOTSTRAP",
        "IEX_KAFKA_TOPIC_PARTITIONS",
        "IEX_TRITON_GRPC_URL",
        "IEX_MODEL_REPOSITORY",
    }
)
# Set from tls.* on every service (templates/_helpers.tpl iex.tlsEnv).
TLS_MANAGED = frozenset({"IEX_TLS_CERT", "IEX_TLS_KEY", "IEX_TLS_CA", "IEX_TLS_REQUIRE_CLIENT_CERT"})
# Set from auth.* on the services whose RPCs need credentials (templates/_helpers.tpl iex.authServices).
AUTH_MANAGED = frozenset({"IEX_AUTH_REQUIRED", "IEX_AUTH_TOKENS_FILE"})
CHART_MANAGED: dict[str, frozenset[str]] = {
    "planner": AUTH_MANAGED,
    "crawler": AUTH_MANAGED | {"IEX_CRAWLER_LOCAL_SEARCH_URL", "IEX_CRAWLER_ALLOW_NETWORKS"},
    "dedup": frozenset({"IEX_PLANNER_ADDRESS"}),
    "scorer": frozenset(),
    "trainer": frozenset(),
    "search": frozenset(
        {"IEX_SEARCH_CORPUS_DIR", "IEX_SEARCH_HTTP_PORT", "IEX_SEARCH_PUBLIC_BASE_URL", "IEX_SEARCH_INDEX_CACHE_DIR"}
    ),
}


def settings_class(service: str) -> type:
    """The settings dataclass of `services.<service>`, found through its Service subclass."""
    from services.common.service import Service

    module = importlib.import_module(f"services.{service}.service")
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if issubclass(obj, Service) and obj is not Service and getattr(obj, "name", None) == service:
            return obj.settings_class
    raise LookupError(f"services.{service}.service defines no Service named {service!r}")


def settings_fields(service: str) -> dict[str, dataclasses.Field]:
    """IEX_* variable -> field of the service's settings class."""
    from services.common.settings import env_name

    return {env_name(f.name): f for f in dataclasses.fields(settings_class(service))}


def user_settings(service: str) -> dict[str, dict[str, Any]]:
    """Schema properties of the variables a user may set in <service>.settings."""
    managed = CHART_MANAGED_COMMON | TLS_MANAGED | CHART_MANAGED[service]
    properties = {}
    for var, f in sorted(settings_fields(service).items()):
        if var in managed or f.metadata.get("secret"):
            continue
        default = "" if f.default is dataclasses.MISSING else f.default
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        description = f.metadata.get("help", "")
        properties[var] = {
            "type": ["string", "number", "integer", "boolean"],
            "description": f"{description} (service default: {default!r})" if description else f"service default: {default!r}",
        }
    return properties


# ---- small builders ------------------------------------------------------------------------------


def obj(properties: dict[str, Any], required: list[str] | None = None, description: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = required
    if description:
        schema["description"] = description
    return schema


def string(description: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": "string", **({"description": description} if description else {}), **extra}


def boolean(description: str = "") -> dict[str, Any]:
    return {"type": "boolean", **({"description": description} if description else {})}


def integer(minimum: int | None = None, maximum: int | None = None, description: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    if description:
        schema["description"] = description
    return schema


def string_map(description: str = "") -> dict[str, Any]:
    return {"type": "object", "additionalProperties": {"type": "string"}, **({"description": description} if description else {})}


def free_object(description: str) -> dict[str, Any]:
    """A Kubernetes structure passed through as it is (affinity, security contexts, peers)."""
    return {"type": "object", "description": description}


QUANTITY = {"type": ["string", "number"], "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"}
PORT = integer(1, 65535)
NAME = string(pattern=r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
CIDR = string(pattern=r"^[0-9a-fA-F:.]+/[0-9]{1,3}$")


def image(description: str) -> dict[str, Any]:
    return obj(
        {
            "registry": string("registry host, empty for the default"),
            "repository": string("repository path", minLength=1),
            "tag": {"type": ["string", "number"], "description": "tag; empty means the chart's appVersion"},
            "digest": string("sha256:... digest; wins over the tag", pattern=r"^$|^sha256:[0-9a-f]{64}$"),
            "pullPolicy": string(enum=["Always", "IfNotPresent", "Never"]),
        },
        ["repository"],
        description,
    )


def resources() -> dict[str, Any]:
    amounts = {"type": "object", "additionalProperties": QUANTITY}
    return obj({"requests": amounts, "limits": amounts}, description="container resources (requests, limits)")


def scheduling() -> dict[str, Any]:
    return {
        "nodeSelector": string_map("node labels the pods must match"),
        "tolerations": {"type": "array", "items": {"type": "object"}},
        "affinity": free_object("Kubernetes affinity"),
    }


def pdb() -> dict[str, Any]:
    return obj({"enabled": boolean("a PodDisruptionBudget with maxUnavailable 1")})


def autoscaling() -> dict[str, Any]:
    return obj(
        {
            "enabled": boolean("a HorizontalPodAutoscaler on CPU instead of fixed replicas"),
            "minReplicas": integer(1, 1024),
            "maxReplicas": integer(1, 1024, "at most kafka.topics.partitions (replicas beyond idle)"),
            "targetCPUUtilizationPercentage": integer(1, 100),
        },
        ["enabled", "minReplicas", "maxReplicas", "targetCPUUtilizationPercentage"],
    )


def service_values(name: str, *, extra: dict[str, Any], ports: dict[str, Any], replicas: dict[str, Any]) -> dict[str, Any]:
    properties = {
        "replicas": replicas,
        "ports": obj(ports, sorted(ports)),
        "resources": resources(),
        **scheduling(),
        "pdb": pdb(),
        "settings": {
            "type": "object",
            "additionalProperties": False,
            "description": f"extra IEX_* variables of the {name} service (values become strings)",
            "properties": user_settings(name),
        },
        **extra,
    }
    return obj(properties, description=f"the {name} service")


def monitor(kind: str) -> dict[str, Any]:
    return obj(
        {
            "enabled": boolean(f"a {kind} (needs the prometheus-operator CRDs)"),
            "interval": string(pattern=r"^[0-9]+(ms|s|m|h)$"),
            "labels": string_map(f"extra labels of the {kind} (for the operator's selector)"),
        }
    )


def peers(description: str) -> dict[str, Any]:
    return {"type": "array", "items": {"type": "object"}, "description": description}


# ---- the schema ------------------------------------------------------------------------------


def build() -> dict[str, Any]:
    base_ports = {"grpc": PORT, "metrics": PORT}
    scaled_replicas = integer(0, 1024)
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "internet-explorer chart values",
        **obj(
            {
                "nameOverride": string(),
                "fullnameOverride": string(),
                "commonLabels": string_map("extra labels on every object"),
                "image": image("the CPU service image (planner, crawler, dedup, scorer, search)"),
                "trainerImage": image("the CUDA trainer image"),
                "imagePullSecrets": {"type": "array", "items": obj({"name": string(minLength=1)}, ["name"])},
                "logLevel": string("IEX_LOG_LEVEL of every service", enum=["DEBUG", "INFO", "WARNING", "ERROR"]),
                "serviceAccount": obj(
                    {
                        "create": boolean(),
                        "name": string(),
                        "annotations": string_map(),
                        "automountToken": boolean("mount an API token (no service needs one)"),
                    }
                ),
                "auth": obj(
                    {
                        "required": boolean("bearer tokens for the planner's mutating RPCs and the crawler's ProbeUrl"),
                        "existingSecret": string("Secret holding 'name:token' lines; empty: the chart makes one"),
                        "secretKey": string("key of the tokens in that Secret", pattern=r"^[-._a-zA-Z0-9]+$"),
                    },
                    ["required", "secretKey"],
                ),
                "tls": obj(
                    {
                        "enabled": boolean("gRPC of every service over TLS only (probes and helm test included)"),
                        "existingSecret": string("kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt) naming every service; empty: the chart makes a CA and one"),
                        "requireClientCert": boolean("mTLS: callers must present a certificate signed by the CA"),
                    },
                    ["enabled", "requireClientCert"],
                ),
                "podSecurityContext": free_object("PodSecurityContext of every pod"),
                "containerSecurityContext": free_object("SecurityContext of every container"),
                "s3": obj(
                    {
                        "endpoint": string("external S3 host:port when minio.enabled is false"),
                        "secure": boolean("TLS to S3"),
                        "region": string(minLength=1),
                        "bucket": string("bucket of images, checkpoints and planner state", pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"),
                        "existingSecret": string("Secret with the S3 keys; empty: the chart makes one"),
                        "secretKeys": obj({"accessKey": string(minLength=1), "secretKey": string(minLength=1)}, ["accessKey", "secretKey"]),
                    }
                ),
                "minio": obj(
                    {
                        "enabled": boolean("run MinIO in the release"),
                        "image": image("MinIO image"),
                        "persistence": obj({"enabled": boolean(), "size": QUANTITY, "storageClass": string()}),
                        "resources": resources(),
                        **scheduling(),
                    }
                ),
                "kafka": obj(
                    {
                        "enabled": boolean("run Apache Kafka (KRaft) in the release"),
                        "bootstrap": string("external bootstrap servers host:port[,host:port] when kafka.enabled is false"),
                        "image": image("Apache Kafka image"),
                        "replicas": integer(1, 9, "combined broker+controller nodes (odd)"),
                        "clusterId": string("KRaft cluster id", pattern=r"^[A-Za-z0-9_-]{22}$"),
                        "heapOptions": string(),
                        "persistence": obj({"enabled": boolean(), "size": QUANTITY, "storageClass": string()}),
                        "resources": resources(),
                        **scheduling(),
                        "topics": obj(
                            {
                                "provision": boolean("create the topics with a Job on install and upgrade"),
                                "partitions": integer(1, 1024),
                                "replicationFactor": integer(1, 9),
                                "retentionHours": integer(1),
                                "names": {
                                    "type": "array",
                                    "uniqueItems": True,
                                    "items": string(pattern=r"^[A-Za-z0-9._-]{1,249}$"),
                                },
                            },
                            ["partitions", "replicationFactor", "names"],
                        ),
                    }
                ),
                "modelRepository": obj(
                    {
                        "mountPath": string("where trainer and Triton mount the repository", pattern=r"^/"),
                        "existingClaim": string(),
                        "storageClass": string(),
                        "accessModes": {
                            "type": "array",
                            "minItems": 1,
                            "items": string(enum=["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"]),
                        },
                        "size": QUANTITY,
                    }
                ),
                "triton": obj(
                    {
                        "enabled": boolean("run Triton in the release"),
                        "image": image("the official Triton image"),
                        "externalGrpcUrl": string("Triton host:port when triton.enabled is false"),
                        "replicas": integer(0, 64),
                        "modelConfigName": string("configs/<name>.pbtxt served; local: the model's own config.pbtxt (python backend)", enum=["production", "production-cpu", "local"]),
                        "gpu": integer(0, 16, "nvidia.com/gpu per replica"),
                        "runtimeClassName": string(),
                        "extraArgs": {"type": "array", "items": string()},
                        "resources": resources(),
                        **scheduling(),
                        "shmSize": QUANTITY,
                        "ports": obj({"http": PORT, "grpc": PORT, "metrics": PORT}, ["http", "grpc", "metrics"]),
                        "pdb": pdb(),
                    }
                ),
                "planner": service_values(
                    "planner",
                    ports=base_ports,
                    replicas=integer(0, 1, "the planner owns explorations in memory: one replica"),
                    extra={
                        "service": obj(
                            {
                                "type": string(enum=["ClusterIP", "NodePort", "LoadBalancer"]),
                                "annotations": string_map(),
                            }
                        )
                    },
                ),
                "crawler": service_values(
                    "crawler",
                    ports=base_ports,
                    replicas=scaled_replicas,
                    extra={
                        "allowNetworks": {"type": "array", "items": CIDR, "description": "IEX_CRAWLER_ALLOW_NETWORKS"},
                        "autoscaling": autoscaling(),
                    },
                ),
                "dedup": service_values("dedup", ports=base_ports, replicas=scaled_replicas, extra={"autoscaling": autoscaling()}),
                "scorer": service_values("scorer", ports=base_ports, replicas=scaled_replicas, extra={"autoscaling": autoscaling()}),
                "trainer": service_values(
                    "trainer",
                    ports=base_ports,
                    replicas=integer(0, 64),
                    extra={
                        "gpu": integer(0, 16, "nvidia.com/gpu requested"),
                        "runtimeClassName": string(),
                        "shmSize": QUANTITY,
                    },
                ),
                "search": service_values(
                    "search",
                    ports={"grpc": PORT, "metrics": PORT, "http": PORT},
                    replicas=integer(0, 64),
                    extra={
                        "enabled": boolean("run the offline-web search service"),
                        "corpus": obj(
                            {
                                "source": string(enum=["synthetic", "existingClaim"]),
                                "existingClaim": string(),
                                "perConcept": integer(1, 1000),
                            },
                            ["source"],
                        ),
                    },
                ),
                "metrics": obj(
                    {
                        "serviceMonitor": monitor("ServiceMonitor"),
                        "podMonitor": monitor("PodMonitor"),
                        "prometheusRule": obj({"enabled": boolean("the alerts as a PrometheusRule"), "labels": string_map()}),
                        "dashboards": obj(
                            {
                                "enabled": boolean("Grafana dashboards as ConfigMaps"),
                                "namespace": string(),
                                "label": string(minLength=1),
                                "labelValue": string(),
                                "folder": string(),
                            }
                        ),
                    }
                ),
                "networkPolicy": obj(
                    {
                        "enabled": boolean(),
                        "metricsFrom": peers("NetworkPolicy peers allowed to scrape metrics"),
                        "plannerClientsFrom": peers("extra peers allowed to call the planner"),
                        "dnsTo": peers("DNS servers"),
                        "crawlerEgressTo": peers("where the crawler may download from"),
                    }
                ),
                "tests": obj({"enabled": boolean("the helm test pod")}),
            },
            required=["image", "trainerImage", "s3", "kafka", "minio", "triton", "modelRepository"],
        ),
    }
