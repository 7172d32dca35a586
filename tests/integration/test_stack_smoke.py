"""The local stack's real servers: start them, use each for real, stop them, and leave nothing behind.

Each test module here runs its own stack in a temporary state directory; if the stack's ports are
held by another stack on this machine, the tests skip rather than talk to a stranger's servers.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from services.common import endpoints
from services.stack import servers
from services.stack.process import port_open, repo_root

pytestmark = pytest.mark.integration

PY_ENV = {"PYTHONPATH": os.pathsep.join([str(repo_root()), str(repo_root() / "protos")])}


def _busy(names) -> list[int]:
    return [port for name in names for port in servers.ports(name) if port_open(endpoints.LOOPBACK, port)]


def _skip_if_busy(names) -> None:
    busy = _busy(names)
    if busy:
        pytest.skip(f"ports {busy} are held by another stack on this machine")


# ------------------------------------------------------------------ no servers needed


def test_prometheus_config_passes_promtool(tmp_path, monkeypatch):
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    monkeypatch.setenv("IEX_STATE_DIR", str(tmp_path))
    path = servers.write_prometheus_config()
    result = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = path.read_text()
    for name, ports in endpoints.SERVICE_PORTS.items():
        assert f"job_name: {name}" in text and f"127.0.0.1:{ports.metrics}" in text
    assert f"127.0.0.1:{endpoints.TRITON_METRICS_PORT}" in text


def test_server_ports_are_distinct_and_miss_the_endpoint_table():
    seen: dict[int, str] = {}
    for name in servers.ALL_NAMES:
        for port in servers.ports(name):
            assert port not in seen, f"{name} and {seen[port]} both use port {port}"
            seen[port] = name


def test_external_endpoint_is_not_started(tmp_path, monkeypatch):
    monkeypatch.setenv("IEX_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("IEX_KAFKA_BOOTSTRAP", "kafka.example:9092")
    monkeypatch.setenv("IEX_S3_ENDPOINT", f"localhost:{endpoints.S3_PORT}")  # the local default, spelt differently
    assert servers.external_endpoint("kafka") == "IEX_KAFKA_BOOTSTRAP=kafka.example:9092"
    assert servers.external_endpoint("s3") is None
    stack = servers.Stack(servers=["kafka"]).up()
    assert [row.state for row in stack.rows] == ["external"] and stack.started == []
    assert servers.stack_env()["IEX_KAFKA_BOOTSTRAP"] == "kafka.example:9092"


# ------------------------------------------------------------------ the CLI, on its own


def test_cli_up_status_down_leaves_nothing(tmp_path):
    _skip_if_busy(["kafka", "prometheus"])
    env = {**os.environ, **PY_ENV, "IEX_STATE_DIR": str(tmp_path)}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "services.stack", *args], capture_output=True, text=True, env=env, timeout=120)

    up = cli("up", "--servers-only", "--only", "kafka", "prometheus")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        status = json.loads(cli("status", "--json").stdout)
        rows = {row["name"]: row for row in status["processes"]}
        assert rows["kafka"]["state"] == "running" and rows["prometheus"]["state"] == "running"
        assert rows["s3"]["state"] == "stopped"
        pgids = [rows["kafka"]["pid"], rows["prometheus"]["pid"]]
    finally:
        down = cli("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert all(servers.group_members(pgid) == [] for pgid in pgids)
    assert _busy(["kafka", "prometheus"]) == []
    assert not list((tmp_path / "pids").glob("*.pid"))


# ------------------------------------------------------------------ every server, durable Kafka


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    _skip_if_busy(servers.SERVER_NAMES)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IEX_STATE_DIR", str(tmp_path_factory.mktemp("stack")))
        stack = servers.Stack(servers=servers.SERVER_NAMES, kafka_storage="s3")
        stack.up()
        try:
            yield stack
        finally:
            pgids = [row.pid for row in stack.rows if row.pid]
            stack.down()
            assert all(servers.group_members(pgid) == [] for pgid in pgids)


def _consumer(env, topic, group, **extra):
    from kafka import KafkaConsumer

    return KafkaConsumer(
        topic,
        bootstrap_servers=env["IEX_KAFKA_BOOTSTRAP"],
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,  # tansu holds a join for half of it
        heartbeat_interval_ms=1000,
        consumer_timeout_ms=15000,
        **extra,
    )


def _take(consumer, count):
    got = []
    for message in consumer:
        got.append(message.value)
        if len(got) == count:
            break
    return got


def test_kafka_group_survives_broker_kill(stack):
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.admin import NewTopic

    env = stack.env()
    topic = f"smoke-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=env["IEX_KAFKA_BOOTSTRAP"])
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=env["IEX_KAFKA_BOOTSTRAP"])
    for i in range(5):
        producer.send(topic, f"m{i}".encode())
    producer.flush()
    producer.close()

    consumer = _consumer(env, topic, "smoke")
    assert _take(consumer, 3) == [b"m0", b"m1", b"m2"]
    consumer.commit()
    consumer.close()

    stack.process("kafka").kill()  # SIGKILL: nothing flushed at exit
    stack.start_one("kafka")

    consumer = _consumer(env, topic, "smoke")
    assert _take(consumer, 2) == [b"m3", b"m4"]  # committed offsets survived
    consumer.close()
    fresh = _consumer(env, topic, f"fresh-{uuid.uuid4().hex[:6]}")
    assert _take(fresh, 5) == [f"m{i}".encode() for i in range(5)]  # and so did the log
    fresh.close()


def test_s3_requires_the_stack_credentials(stack):
    from minio import Minio
    from minio.error import S3Error

    env = stack.env()
    client = servers.s3_client()
    bucket = f"smoke-{uuid.uuid4().hex[:8]}"
    client.make_bucket(bucket)
    client.put_object(bucket, "a/b.txt", io.BytesIO(b"hello"), 5)
    assert client.get_object(bucket, "a/b.txt").read() == b"hello"
    assert servers.kafka_s3_bucket() in {b.name for b in client.list_buckets()}  # durable Kafka lives here

    wrong = Minio(env["IEX_S3_ENDPOINT"], access_key=env["IEX_S3_ACCESS_KEY"], secret_key="not-the-secret", secure=False)
    with pytest.raises(S3Error) as refused:
        wrong.list_buckets()
    assert refused.value.code == "SignatureDoesNotMatch"
    with pytest.raises(S3Error) as missing:
        client.put_object(f"absent-{uuid.uuid4().hex[:8]}", "x", io.BytesIO(b"1"), 1)
    assert missing.value.code == "NoSuchBucket"  # as MinIO and AWS answer


DOUBLE_MODEL = '''
import numpy as np
import onnxruntime  # noqa: F401 - the stub must see this environment's packages
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", (x * 2).astype(np.float32))]))
        return out
'''


def test_triton_python_backend_serves_a_model(stack):
    import tritonclient.grpc as grpcclient

    env = stack.env()
    model = f"double_{uuid.uuid4().hex[:6]}"
    root = Path(env["IEX_MODEL_REPOSITORY"]) / model
    (root / "1").mkdir(parents=True)
    (root / "1" / "model.py").write_text(DOUBLE_MODEL)
    (root / "config.pbtxt").write_text(
        f'name: "{model}"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
    )
    client = grpcclient.InferenceServerClient(env["IEX_TRITON_GRPC_URL"])
    client.load_model(model)
    try:
        x = np.arange(4, dtype=np.float32)
        tensor = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(model, [tensor])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x * 2)
    finally:
        client.unload_model(model)


def test_prometheus_scrapes_triton_the_broker_and_s3(stack):
    import urllib.request

    base = stack.env()["IEX_PROMETHEUS_URL"]
    deadline = time.monotonic() + 20
    health = {}
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{base}/api/v1/targets", timeout=5) as response:
            targets = json.load(response)["data"]["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        if all(health.get(job) == "up" for job in ("triton", "prometheus", "kafka", "s3")):
            break
        time.sleep(1)
    # The broker (through its OTLP bridge) and the S3 server (weed -metricsPort) too.
    assert all(health.get(job) == "up" for job in ("triton", "prometheus", "kafka", "s3")), health
    assert set(endpoints.SERVICE_PORTS) <= set(health)
    with urllib.request.urlopen(f"{base}/api/v1/query?query=count(%7Bjob%3D%22s3%22%7D)", timeout=5) as response:
        assert int(json.load(response)["data"]["result"][0]["value"][1]) > 10  # SeaweedFS's own series


def test_s3_object_survives_server_kill(stack):
    client = servers.s3_client()
    bucket = f"chaos-{uuid.uuid4().hex[:8]}"
    client.make_bucket(bucket)
    client.put_object(bucket, "k", io.BytesIO(b"kept"), 4)
    stack.process("s3").kill()
    stack.start_one("s3")
    # No retry on purpose: once `ready`, the server must serve what it had acknowledged.
    assert servers.s3_client(retries=False).get_object(bucket, "k").read() == b"kept"
    servers.s3_client(retries=False).put_object(bucket, "k2", io.BytesIO(b"new"), 3)


def test_delete_many_removes_keys_in_one_request_and_ignores_absent_ones(stack):
    from services.common.objectstore import ObjectStore

    def s3_requests() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{endpoints.S3_METRICS_PORT}/metrics", timeout=10) as response:  # noqa: S310 - loopback
            return servers.s3_request_counts(response.read().decode())

    env = servers.stack_env()
    store = ObjectStore(env["IEX_S3_ENDPOINT"], env["IEX_S3_ACCESS_KEY"], env["IEX_S3_SECRET_KEY"])
    bucket = f"many-{uuid.uuid4().hex[:8]}"
    store.ensure_bucket(bucket)
    for i in range(5):
        store.put_bytes(bucket, f"wal/{i}", b"intent")
    store.put_bytes(bucket, "kept", b"kept")
    before = s3_requests()
    store.delete_many(bucket, [f"wal/{i}" for i in range(5)] + ["wal/never-written"])
    # The server updates its counters a moment after answering (seen on a loaded machine): wait for them.
    deadline = time.monotonic() + 10
    after = s3_requests()
    while after.get("DELETE", 0) == before.get("DELETE", 0) and time.monotonic() < deadline:
        time.sleep(0.2)
        after = s3_requests()
    assert list(store.list_keys(bucket, "wal/")) == [] and list(store.list_keys(bucket, "kept")) == ["kept"]
    # Counted by the S3 server itself: one request for the six keys.
    assert after.get("DELETE", 0) - before.get("DELETE", 0) == 1

