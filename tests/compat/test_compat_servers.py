"""The clients the services use, against the servers production uses: Apache Kafka (KRaft) and MinIO.

The first run fetches Kafka's jars and builds MinIO (minutes); later runs reuse the cache. The
suite is skipped, with the reason, only where Java 17, Maven or Go are missing.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import os
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import pytest

from services.stack import compat
from services.stack.process import ManagedProcess, pid_alive

# Generous for the first run, which builds MinIO from source on a small machine; the tests
# themselves wait with their own short deadlines.
pytestmark = [pytest.mark.compat, pytest.mark.slow, pytest.mark.timeout(2400)]

MESSAGES = 24
PARTITIONS = 2


@pytest.fixture(scope="session")
def compat_servers(tmp_path_factory) -> Iterator[dict[str, ManagedProcess]]:
    ok, reason = compat.available()
    if not ok:
        pytest.skip(f"optional capability compat-servers: {reason}")
    # Servers a developer already started with `compat up` (state in the default directory) are
    # used and left running; those started here keep their data in a directory of this session
    # only. In the default directory a second run of the suite met the first run's topics and
    # buckets (the vertical slice found its exploration already finished, trained elsewhere).
    saved = os.environ.get("IEX_STATE_DIR")
    if not any(proc.running() for proc in compat.processes()):
        os.environ["IEX_STATE_DIR"] = str(tmp_path_factory.mktemp("compat-state"))
    procs = compat.processes()
    ours = [proc for proc in procs if not proc.running()]
    try:
        for proc in ours:
            proc.start()
        for proc in procs:
            proc.wait_ready()
        yield {proc.name: proc for proc in procs}
    finally:
        try:
            for proc in ours:
                pid = proc.pid()
                proc.stop()
                assert pid is None or not pid_alive(pid), f"{proc.name} (pid {pid}) outlived its stop"
        finally:
            if saved is None:
                os.environ.pop("IEX_STATE_DIR", None)
            else:
                os.environ["IEX_STATE_DIR"] = saved


def _listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets the process listens on, read from /proc."""
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found: set[tuple[str, int]] = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            addr_hex, port_hex = local.split(":")
            # /proc prints each 32-bit word of the address in host (little-endian) order.
            raw = b"".join(bytes.fromhex(addr_hex[i : i + 8])[::-1] for i in range(0, width, 8))
            ip = ipaddress.ip_address(raw)
            mapped = getattr(ip, "ipv4_mapped", None)
            address = str(mapped or ip)
            found.add((address, int(port_hex, 16)))
    return found


def _group_offsets(admin: object, group: str) -> dict:
    """Committed offsets as the broker reports them; kafka-python 3 renamed the call."""
    if hasattr(admin, "list_group_offsets"):
        return admin.list_group_offsets(group)[group]
    return admin.list_consumer_group_offsets(group)  # type: ignore[attr-defined]


def test_servers_listen_on_loopback_only(compat_servers: dict[str, ManagedProcess]) -> None:
    expected = {
        "kafka-kraft": {compat.KAFKA_PORT, compat.KAFKA_CONTROLLER_PORT},
        "minio": {compat.MINIO_PORT},
    }
    for name, proc in compat_servers.items():
        pid = proc.pid()
        assert pid is not None
        listening = _listening_addresses(pid)
        assert expected[name] <= {port for _, port in listening}, f"{name}: {listening}"
        # MinIO adds every loopback address (::1 too) to the one it is given, for its console's sake.
        assert all(ipaddress.ip_address(a).is_loopback for a, _ in listening), f"{name} listens beyond loopback: {listening}"


def test_compat_env_points_at_the_servers() -> None:
    env = compat.compat_env()
    assert env["IEX_KAFKA_BOOTSTRAP"] == f"127.0.0.1:{compat.KAFKA_PORT}"
    assert env["IEX_S3_ENDPOINT"] == f"127.0.0.1:{compat.MINIO_PORT}"
    assert env["IEX_S3_ACCESS_KEY"] and len(env["IEX_S3_SECRET_KEY"]) >= 8


def test_kafka_keys_headers_and_committed_offsets(compat_servers: dict[str, ManagedProcess]) -> None:
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import NewTopic

    bootstrap = compat.KAFKA_BOOTSTRAP
    topic = f"iex.compat.{uuid.uuid4().hex[:12]}"
    group = f"iex-compat-{uuid.uuid4().hex[:12]}"

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)], timeout_ms=15000)
        assert topic in admin.list_topics()

        sent: dict[bytes, list[tuple[bytes, list[tuple[str, bytes]]]]] = defaultdict(list)
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, request_timeout_ms=15000)
        try:
            futures = []
            for i in range(MESSAGES):
                key = f"sha256-{i % 5}".encode()
                value = os.urandom(64) + bytes([i])  # arbitrary bytes, no schema involved
                headers = [("iex-seq", str(i).encode()), ("content-type", b"application/octet-stream")]
                sent[key].append((value, headers))
                futures.append(producer.send(topic, key=key, value=value, headers=headers))
            metadata = [future.get(timeout=30) for future in futures]
            producer.flush(timeout=30)
        finally:
            producer.close(timeout=10)
        end = defaultdict(int)
        for meta in metadata:
            end[meta.partition] = max(end[meta.partition], meta.offset + 1)
        assert sum(end.values()) == MESSAGES

        consumer = KafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
            request_timeout_ms=15000,
        )
        received: dict[bytes, list[tuple[bytes, list[tuple[str, bytes]]]]] = defaultdict(list)
        try:
            deadline = time.monotonic() + 60
            count = 0
            while count < MESSAGES and time.monotonic() < deadline:
                for _tp, records in consumer.poll(timeout_ms=1000).items():
                    for record in records:
                        received[record.key].append((record.value, list(record.headers)))
                        count += 1
                    # Commit only what has been processed, as the services' consumer loop does.
                    consumer.commit()
            assert count == MESSAGES, f"consumed {count} of {MESSAGES} within 60s"
            partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
            for tp in partitions:
                assert (consumer.committed(tp) or 0) == end[tp.partition], tp
            assert consumer.end_offsets(partitions) == {tp: end[tp.partition] for tp in partitions}
        finally:
            consumer.close()

        # Same key, same partition: the per-key order of the producer is kept, with headers intact.
        assert dict(received) == dict(sent)

        offsets = _group_offsets(admin, group)
        assert {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic} == dict(end)

        # A restarted member resumes after the committed offsets: nothing is delivered twice.
        again = KafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
        )
        try:
            redelivered = 0
            assigned_by = time.monotonic() + 30
            while not again.assignment() and time.monotonic() < assigned_by:
                redelivered += sum(len(r) for r in again.poll(timeout_ms=500).values())
            assert again.assignment(), "the restarted member was never assigned partitions"
            quiet_until = time.monotonic() + 2
            while time.monotonic() < quiet_until:
                redelivered += sum(len(r) for r in again.poll(timeout_ms=500).values())
            assert redelivered == 0
        finally:
            again.close()
    finally:
        try:
            admin.delete_topics([topic], timeout_ms=15000)
        finally:
            admin.close()


def test_minio_bucket_object_metadata_and_stat(compat_servers: dict[str, ManagedProcess]) -> None:
    from minio import Minio

    env = compat.compat_env()
    client = Minio(env["IEX_S3_ENDPOINT"], access_key=env["IEX_S3_ACCESS_KEY"], secret_key=env["IEX_S3_SECRET_KEY"], secure=False)
    bucket = f"iex-compat-{uuid.uuid4().hex[:12]}"
    client.make_bucket(bucket)
    try:
        assert client.bucket_exists(bucket)
        assert bucket in {b.name for b in client.list_buckets()}

        payload = os.urandom(200_000)
        digest = hashlib.sha256(payload).hexdigest()
        name = f"images/{digest[:2]}/{digest}.jpg"
        result = client.put_object(
            bucket, name, io.BytesIO(payload), len(payload),
            content_type="image/jpeg", metadata={"sha256": digest, "source-query": "baby duck"},
        )
        assert result.etag == hashlib.md5(payload).hexdigest()  # noqa: S324 - S3's single-part ETag is MD5

        stat = client.stat_object(bucket, name)
        assert stat.size == len(payload)
        assert stat.content_type == "image/jpeg"
        assert stat.etag == result.etag
        meta = {k.lower(): v for k, v in stat.metadata.items()}
        assert meta["x-amz-meta-sha256"] == digest
        assert meta["x-amz-meta-source-query"] == "baby duck"

        response = client.get_object(bucket, name)
        try:
            assert response.read() == payload
            assert response.headers["x-amz-meta-sha256"] == digest
        finally:
            response.close()
            response.release_conn()

        # Checkpoints are larger than one part: the multipart path must work too.
        big = os.urandom(6 * 1024 * 1024 + 123)
        client.put_object(bucket, "checkpoints/encoder.pt", io.BytesIO(big), len(big), part_size=5 * 1024 * 1024)
        big_stat = client.stat_object(bucket, "checkpoints/encoder.pt")
        assert big_stat.size == len(big)
        assert big_stat.etag.endswith("-2")  # two parts
        response = client.get_object(bucket, "checkpoints/encoder.pt", offset=len(big) - 1000, length=1000)
        try:
            assert response.read() == big[-1000:]
        finally:
            response.close()
            response.release_conn()

        listed = sorted(obj.object_name for obj in client.list_objects(bucket, recursive=True))
        assert listed == sorted([name, "checkpoints/encoder.pt"])
    finally:
        for obj in client.list_objects(bucket, recursive=True):
            client.remove_object(bucket, obj.object_name)
        client.remove_bucket(bucket)
