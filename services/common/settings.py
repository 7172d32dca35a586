"""Settings from environment variables with one prefix (IEX_), validated at start-up.

A settings class is a frozen dataclass; each field reads IEX_<FIELD_NAME_UPPER>. A wrong value
raises SettingsError naming the variable, and services exit with that message before doing anything.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, TypeVar

from services.common import endpoints

PREFIX = "IEX_"

T = TypeVar("T")


class SettingsError(ValueError):
    """A configuration value is missing or invalid; the message names the variable."""


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
) -> Any:
    """A settings field with documentation and bounds, checked when loaded."""
    metadata = {"help": help, "minimum": minimum, "maximum": maximum, "choices": choices, "secret": secret}
    # Secrets stay out of the dataclass repr, so a settings object in a log line or a traceback
    # cannot carry one.
    if default is dataclasses.MISSING:
        return field(metadata=metadata, repr=not secret)
    return field(default=default, metadata=metadata, repr=not secret)


def env_name(field_name: str) -> str:
    return PREFIX + field_name.upper()


def _parse(raw: str, kind: Any, var: str) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{var}: expected a boolean (true/false), got {raw!r}")
    if kind is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise SettingsError(f"{var}: expected an integer, got {raw!r}") from None
    if kind is float:
        try:
            return float(raw.strip())
        except ValueError:
            raise SettingsError(f"{var}: expected a number, got {raw!r}") from None
    if kind is str:
        return raw
    if typing.get_origin(kind) is tuple:
        element = typing.get_args(kind)[0] if typing.get_args(kind) else str
        return tuple(_parse(part.strip(), element, var) for part in raw.split(",") if part.strip())
    raise SettingsError(f"{var}: unsupported setting type {kind!r}")


def load(cls: type[T], environ: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """Builds `cls` from the environment; every problem is collected and reported at once."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    problems: list[str] = []
    for f in dataclasses.fields(cls):
        var = env_name(f.name)
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif var in environ:
            try:
                values[f.name] = _parse(environ[var], hints[f.name], var)
            except SettingsError as exc:
                problems.append(str(exc))
                continue
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            described = f" ({f.metadata['help']})" if f.metadata.get("help") else ""
            problems.append(f"{var}: required but not set{described}")
            continue
        else:
            continue
        problems.extend(_check_bounds(f, values[f.name], var))
    if problems:
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(problems))
    return cls(**values)


def _check_bounds(f: dataclasses.Field, value: Any, var: str) -> list[str]:
    meta = f.metadata
    problems = []
    if meta.get("minimum") is not None and value < meta["minimum"]:
        problems.append(f"{var}: must be >= {meta['minimum']}, got {value!r}")
    if meta.get("maximum") is not None and value > meta["maximum"]:
        problems.append(f"{var}: must be <= {meta['maximum']}, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        problems.append(f"{var}: must be one of {', '.join(meta['choices'])}, got {value!r}")
    return problems


def describe(cls: type) -> list[tuple[str, str, str]]:
    """(variable, default, help) rows for documentation."""
    rows = []
    for f in dataclasses.fields(cls):
        default = "" if f.default is dataclasses.MISSING else ("<secret>" if f.metadata.get("secret") else str(f.default))
        rows.append((env_name(f.name), default, f.metadata.get("help", "")))
    return rows


def redacted(settings: Any) -> dict[str, Any]:
    """Settings as a dict with secrets replaced, safe to log."""
    out = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        out[f.name] = "<redacted>" if f.metadata.get("secret") and value else value
    return out


@dataclass(frozen=True)
class ServiceSettings:
    """What every service reads. Services extend it with their own fields."""

    service: str = setting("", help="service name; set by the service's entry point")
    grpc_host: str = setting(endpoints.LOOPBACK, help="address the gRPC server binds to (0.0.0.0 in containers)")
    grpc_port: int = setting(0, help="gRPC port; 0 means the service's default", minimum=0, maximum=65535)
    metrics_port: int = setting(0, help="Prometheus /metrics port; 0 means the service's default", minimum=0, maximum=65535)
    log_level: str = setting("INFO", help="log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    kafka_bootstrap: str = setting(endpoints.DEFAULT_KAFKA_BOOTSTRAP, help="Kafka bootstrap servers, comma separated")
    kafka_session_timeout_ms: int = setting(6000, help="consumer group session timeout (tansu joins take half of it)", minimum=1000)
    kafka_max_attempts: int = setting(3, help="handler attempts before a message goes to the dead-letter topic", minimum=1, maximum=100)
    kafka_max_message_bytes: int = setting(1_000_000, help="largest message produced or accepted", minimum=1024)
    kafka_topic_partitions: int = setting(4, help="partitions of topics this service creates", minimum=1, maximum=1024)
    s3_endpoint: str = setting(endpoints.DEFAULT_S3_ENDPOINT, help="S3 endpoint host:port (MinIO, SeaweedFS, AWS)")
    s3_access_key: str = setting("iex-local", help="S3 access key", secret=True)
    s3_secret_key: str = setting("iex-local-secret", help="S3 secret key", secret=True)
    s3_secure: bool = setting(False, help="use TLS to reach S3")
    s3_region: str = setting("us-east-1", help="S3 region")
    s3_bucket: str = setting("iex", help="bucket holding images, checkpoints and planner state")
    triton_grpc_url: str = setting(endpoints.DEFAULT_TRITON_GRPC, help="Triton gRPC endpoint host:port")
    model_repository: str = setting("", help="Triton model repository directory shared by trainer and Triton")
    drain_grace_s: float = setting(10.0, help="seconds to finish in-flight work after SIGTERM", minimum=0)
    # Transport security and caller authentication (services.common.security; docs/security.md).
    tls_cert: str = setting("", help="PEM certificate chain the gRPC server presents (TLS on when set with IEX_TLS_KEY); also this process's client certificate under mTLS")
    tls_key: str = setting("", help="PEM private key of IEX_TLS_CERT")
    tls_ca: str = setting("", help="PEM CA bundle: verifies client certificates (server side) and the services this process calls (client side)")
    tls_require_client_cert: bool = setting(False, help="mTLS: refuse connections without a client certificate signed by IEX_TLS_CA")
    tls_server_name: str = setting("", help="name expected in other services' certificates when calling them (default: the host of the address)")
    auth_required: bool = setting(False, help="protected RPCs (the planner's Create/Pause/Resume/Cancel, the crawler's ProbeUrl) need a bearer token or an accepted client certificate; on in the Helm chart")
    auth_tokens: str = setting("", help="accepted bearer tokens, comma separated, each 'name:token' or 'token' (at least 16 characters; names are logged, tokens never)", secret=True)
    auth_tokens_file: str = setting("", help="file of accepted tokens, one 'name:token' or 'token' per line; re-read when it changes (rotation without restart)")
    auth_client_identities: tuple[str, ...] = setting((), help="client-certificate identities (CN or DNS/URI SAN) accepted for protected RPCs under mTLS; '*' accepts any certificate IEX_TLS_CA signed")
    auth_protect: str = setting("mutating", help="RPCs needing credentials when IEX_AUTH_REQUIRED: 'mutating' or 'all' (every RPC except health and reflection)", choices=("mutating", "all"))
    auth_token: str = setting("", help="bearer token this process presents when calling another service's protected RPCs (the iex CLI reads it too)", secret=True)

    def with_defaults(self: T) -> T:
        """Fills ports left at 0 from the service's row in the endpoint table."""
        ports = endpoints.SERVICE_PORTS.get(self.service)  # type: ignore[attr-defined]
        if ports is None:
            return self
        changes = {}
        if self.grpc_port == 0:  # type: ignore[attr-defined]
            changes["grpc_port"] = ports.grpc
        if self.metrics_port == 0:  # type: ignore[attr-defined]
            changes["metrics_port"] = ports.metrics
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def load_service_settings(cls: type[T], service: str, environ: Mapping[str, str] | None = None, **overrides: Any) -> T:
    settings = load(cls, environ, service=service, **overrides)
    return settings.with_defaults()  # type: ignore[attr-defined]


