"""The real crawler service against the hostile web, scaled out to two replicas of one consumer group.

The stack's own crawler is stopped for the module and replaced by two replicas (`python -m
services.crawler`, real Kafka and S3) whose clip-retrieval backend is the hostile web
(services/search/hostile.py). Checked here:
- every hostile case ends with its status, through the service's gRPC ProbeUrl and through a query
  consumed from Kafka (QueryCrawled.refused counts, ImageFetched only for the good cases, staged
  bytes in S3, per-status metrics), and the service keeps serving ordinary queries afterwards;
- in default mode (no allow-list) a crawler refuses 127.0.0.1, 169.254.169.254 and 10.0.0.1;
- a replica killed (SIGKILL) mid-query loses nothing: its queries are crawled by the other, and every
  query ends with exactly one version of its events, however often they were delivered.
The stack's crawler is restarted afterwards, so later modules see the stack as they expect it.
"""

from __future__ import annotations

import hashlib
import sys
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka import KafkaConsumer

from iex.v1 import crawler_pb2, crawler_pb2_grpc, events_pb2
from services.common import endpoints, topics
from services.common.endpoints import LOOPBACK
from services.common.kafka import KafkaConfig, Publisher
from services.common.metrics import Metrics
from services.common.objectstore import ObjectStore
from services.search.hostile import CASES, HostileWeb
from services.stack import servers
from services.stack.process import ManagedProcess, port_open, repo_root

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OK_CASES = [c for c in CASES if c.expected == "ok"]
REFUSED = Counter(c.expected for c in CASES if c.expected != "ok")
TOTAL_TIMEOUT_S = 2


@dataclass
class Replica:
    name: str
    process: ManagedProcess
    grpc_port: int
    metrics_port: int

    def stub(self) -> crawler_pb2_grpc.CrawlerServiceStub:
        channel = grpc.insecure_channel(f"{LOOPBACK}:{self.grpc_port}")
        grpc.channel_ready_future(channel).result(timeout=30)
        return crawler_pb2_grpc.CrawlerServiceStub(channel)

    def serving(self) -> bool:
        with grpc.insecure_channel(f"{LOOPBACK}:{self.grpc_port}") as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
            except grpc.RpcError:
                return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    def metric_total(self, name: str, label: str) -> float:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.metrics_port}/metrics", timeout=5) as response:  # noqa: S310 - loopback
            text = response.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and label in line:
                total += float(line.rsplit(" ", 1)[1])
        return total


def start_crawler(name: str, env: dict[str, str], **settings: str) -> Replica:
    grpc_port, metrics_port = endpoints.free_listen_port(), endpoints.free_listen_port()
    root = repo_root()
    process = ManagedProcess(
        name=name,
        argv=[sys.executable, "-m", "services.crawler"],
        ready=lambda: port_open(LOOPBACK, grpc_port),
        env={
            **env,
            "IEX_SERVICE": "crawler",
            "IEX_GRPC_PORT": str(grpc_port),
            "IEX_METRICS_PORT": str(metrics_port),
            "PYTHONPATH": f"{root}:{root / 'protos'}",
            **settings,
        },
        cwd=root,
        ready_timeout_s=90,
    )
    process.start()
    return Replica(name, process, grpc_port, metrics_port)


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


class TopicReader:
    """Reads a topic from the beginning with a private group, accumulating everything seen."""

    def __init__(self, bootstrap: str, topic: topics.Topic) -> None:
        self.topic = topic
        self.messages: list = []
        self.consumer = KafkaConsumer(
            topic.name,
            bootstrap_servers=bootstrap.split(","),
            group_id=f"test-hostile-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            session_timeout_ms=6000,
            heartbeat_interval_ms=2000,
        )

    def poll(self) -> list:
        for records in self.consumer.poll(timeout_ms=500).values():
            self.messages.extend(self.topic.message.FromString(r.value) for r in records)
        return self.messages

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture(scope="module")
def hostile():
    web = HostileWeb(hang_s=30.0)
    yield web
    web.close()


@pytest.fixture(scope="module")
def replicas(stack_env, hostile):
    """Two crawler replicas in the stack's consumer group, instead of the stack's crawler."""
    stack_crawler = servers.handle("crawler")
    stack_crawler.stop()
    settings = {
        "IEX_CRAWLER_CLIP_RETRIEVAL_URL": hostile.base_url,
        "IEX_CRAWLER_DEFAULT_BACKEND": "clip-retrieval",
        "IEX_CRAWLER_TOTAL_TIMEOUT_S": str(TOTAL_TIMEOUT_S),
        "IEX_CRAWLER_RETRY_BACKOFF_S": "0.1",
        "IEX_CRAWLER_QUERY_DEADLINE_S": "60",
    }
    started: list[Replica] = []
    try:
        for name in ("a", "b"):
            started.append(start_crawler(f"crawler-replica-{name}", stack_env, **settings))
        for replica in started:
            replica.process.wait_ready()
        wait_until(lambda: all(r.serving() for r in started), 60, "both replicas SERVING")
        yield started
    finally:
        for replica in started:
            replica.process.stop()
        restored = servers.service_process("crawler", stack_env)
        restored.start()
        restored.wait_ready()


@pytest.fixture(scope="module")
def publisher(stack_env):
    p = Publisher(KafkaConfig(bootstrap=stack_env["IEX_KAFKA_BOOTSTRAP"], client_id="iex-test-hostile"), Metrics("test_hostile"))
    yield p
    p.close()


@pytest.fixture(scope="module")
def store(stack_env) -> ObjectStore:
    return ObjectStore(stack_env["IEX_S3_ENDPOINT"], stack_env["IEX_S3_ACCESS_KEY"], stack_env["IEX_S3_SECRET_KEY"])


def issue(publisher: Publisher, exploration_id: str, query_id: str, text: str = "anything at all", backend: str = "") -> None:
    query = events_pb2.QueryIssued(
        query_id=query_id,
        exploration_id=exploration_id,
        iteration=1,
        concept="hostile web",
        text=text,
        num_results=100,
        search_backend=backend,
    )
    publisher.publish(topics.QUERIES, query, key=query_id)
    publisher.flush()


def test_probe_url_ends_every_hostile_case_with_its_status(replicas, hostile):
    stub = replicas[0].stub()
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda case: stub.ProbeUrl(crawler_pb2.ProbeUrlRequest(url=hostile.url(case)), timeout=60), CASES))
    assert {case.name: answer.status for case, answer in zip(CASES, answers)} == {case.name: case.expected for case in CASES}
    for case, answer in zip(CASES, answers):
        if case.expected == "ok":
            assert answer.size_bytes > 0 and answer.width >= 32 and answer.content_type.startswith("image/")


def test_a_hostile_query_through_kafka_ends_with_its_statuses_and_nothing_else_breaks(replicas, publisher, stack_env, store, hostile):
    exploration = f"hostile-{uuid.uuid4().hex[:8]}"
    before = {status: sum(r.metric_total("iex_crawler_urls_total", f'status="{status}"') for r in replicas) for status in ["ok", *REFUSED]}
    crawled = TopicReader(stack_env["IEX_KAFKA_BOOTSTRAP"], topics.QUERIES_CRAWLED)
    fetched = TopicReader(stack_env["IEX_KAFKA_BOOTSTRAP"], topics.IMAGES_FETCHED)
    try:
        issue(publisher, exploration, "q-hostile")
        [done] = wait_until(lambda: [m for m in crawled.poll() if m.exploration_id == exploration], 120, "QueryCrawled of the hostile query")
        assert done.results_returned == len(CASES)
        assert done.images_fetched == len(OK_CASES)
        assert Counter(dict(done.refused)) == REFUSED

        def fetched_images():
            mine = [m for m in fetched.poll() if m.exploration_id == exploration]
            return mine if len(mine) >= len(OK_CASES) else None

        images = wait_until(fetched_images, 30, "ImageFetched of the good cases")
        assert sorted(m.url for m in images) == sorted(hostile.url(c) for c in OK_CASES)
        by_url = {m.url: m for m in images}
        duplicates = {by_url[hostile.url(c)].raw_sha256 for c in CASES if c.name in ("ok_jpeg", "duplicate_a", "duplicate_b")}
        assert len(duplicates) == 1  # one picture under three URLs: the same raw sha256
        for message in images:
            # Small images travel in their events, larger ones are staged: exactly one of the two.
            assert bool(message.data) != bool(message.staging_key)
            data = message.data or store.get_bytes(stack_env.get("IEX_S3_BUCKET", "iex"), message.staging_key)
            assert hashlib.sha256(data).hexdigest() == message.raw_sha256
            assert len(data) == message.size_bytes and message.width <= 256 and message.height <= 256

        # Reasons are counted in metrics (bounded labels), one count per URL.
        after = {status: sum(r.metric_total("iex_crawler_urls_total", f'status="{status}"') for r in replicas) for status in before}
        assert {s: after[s] - before[s] for s in REFUSED} == dict(REFUSED)
        assert after["ok"] - before["ok"] == len(OK_CASES)

        # Nothing else broke: both replicas serve, and an ordinary query on the stack's offline web is crawled.
        assert all(r.serving() for r in replicas)
        issue(publisher, exploration, "q-ordinary", text="red circle", backend="local")
        [ordinary] = wait_until(lambda: [m for m in crawled.poll() if m.query_id == "q-ordinary" and m.exploration_id == exploration], 60, "the ordinary query")
        assert ordinary.images_fetched > 0 and not ordinary.refused
    finally:
        crawled.close()
        fetched.close()


def test_default_mode_refuses_internal_addresses(stack_env, hostile):
    """A crawler without an allow-list (the production default) refuses loopback, metadata and private addresses."""
    strict = start_crawler("crawler-default-mode", stack_env, IEX_CRAWLER_ALLOW_NETWORKS="")
    try:
        strict.process.wait_ready()
        stub = strict.stub()
        before = dict(hostile.requests)
        for url in (hostile.url("/img/ok.jpg"), "http://127.0.0.1:9/x.png", "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/a.png"):
            assert stub.ProbeUrl(crawler_pb2.ProbeUrlRequest(url=url), timeout=30).status == "blocked_address", url
        assert hostile.requests == before
    finally:
        strict.process.stop()


def test_a_replica_killed_mid_query_loses_nothing_and_duplicates_nothing(replicas, publisher, stack_env, hostile):
    exploration = f"hostile-kill-{uuid.uuid4().hex[:8]}"
    query_ids = [f"q-kill-{i}" for i in range(6)]
    crawled = TopicReader(stack_env["IEX_KAFKA_BOOTSTRAP"], topics.QUERIES_CRAWLED)
    fetched = TopicReader(stack_env["IEX_KAFKA_BOOTSTRAP"], topics.IMAGES_FETCHED)
    try:
        for query_id in query_ids:
            issue(publisher, exploration, query_id)

        # Each hostile query spends >= TOTAL_TIMEOUT_S on its hanging URLs: catch a replica in the middle of one.
        def busy_replica():
            for replica in replicas:
                if replica.process.running() and replica.stub().GetCrawlerStatus(crawler_pb2.GetCrawlerStatusRequest(), timeout=5).in_flight > 0:
                    return replica
            return None

        victim = wait_until(busy_replica, 60, "a replica with downloads in flight", interval_s=0.1)
        victim.process.kill()
        survivor = next(r for r in replicas if r is not victim)

        def all_crawled():
            seen = {m.query_id for m in crawled.poll() if m.exploration_id == exploration}
            return seen >= set(query_ids)

        wait_until(all_crawled, 150, "every query crawled after the kill")
        assert survivor.serving()

        def all_fetched():
            return len({(m.query_id, m.url) for m in fetched.poll() if m.exploration_id == exploration}) >= len(query_ids) * len(OK_CASES)

        wait_until(all_fetched, 60, "the ImageFetched events of every query")
        time.sleep(2)  # late duplicates, if any, would arrive now
        crawled.poll()
        fetched.poll()

        versions: dict[str, set[bytes]] = defaultdict(set)
        for message in crawled.messages:
            if message.exploration_id == exploration:
                versions[message.query_id].add(message.SerializeToString(deterministic=True))
        # At least once, and every delivery of a query carries the same answer.
        assert {q: len(v) for q, v in versions.items()} == {q: 1 for q in query_ids}
        for blob in (next(iter(v)) for v in versions.values()):
            done = events_pb2.QueryCrawled.FromString(blob)
            assert done.images_fetched == len(OK_CASES) and Counter(dict(done.refused)) == REFUSED

        images: dict[tuple[str, str], set[bytes]] = defaultdict(set)
        for message in fetched.messages:
            if message.exploration_id == exploration:
                images[(message.query_id, message.url)].add(message.SerializeToString(deterministic=True))
        assert len(images) == len(query_ids) * len(OK_CASES)
        assert all(len(v) == 1 for v in images.values())
    finally:
        crawled.close()
        fetched.close()
