"""One exploration iteration through every service on real servers.

planner → queries → crawler (search service over a generated offline web) → dedup → S3 → scorer
(Triton) → planner → trainer (CPU) → checkpoint + model version 2 → scorer loads it → iteration 1
finished. Assertions read the effects where they live: S3 objects, Kafka topics, the model
repository, the services' gRPC APIs and the real Prometheus.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from kafka import KafkaConsumer

from iex.v1 import common_pb2, events_pb2, planner_pb2, planner_pb2_grpc, scorer_pb2, scorer_pb2_grpc
from services.cli.demo import upload_target
from services.common import topics
from services.common.endpoints import LOOPBACK, SERVICE_PORTS
from services.common.objectstore import ObjectStore, content_key
from services.dedup.hashing import pixel_sha256
from services.search import synthetic

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUCKET = "iex"
QUERIES = 6
IMAGES_PER_QUERY = 6


def channel(service: str) -> grpc.Channel:
    ch = grpc.insecure_channel(f"{LOOPBACK}:{SERVICE_PORTS[service].grpc}")
    grpc.channel_ready_future(ch).result(timeout=30)
    return ch


def read_topic(bootstrap: str, topic: topics.Topic, expect_at_least: int, timeout_s: float = 30.0) -> list:
    consumer = KafkaConsumer(
        topic.name,
        bootstrap_servers=bootstrap.split(","),
        group_id=f"test-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
    )
    messages = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=1000).values():
                messages.extend(topic.message.FromString(r.value) for r in records)
            if len(messages) >= expect_at_least:
                # One more poll so that extra (duplicate) messages would be seen too.
                for records in consumer.poll(timeout_ms=2000).values():
                    messages.extend(topic.message.FromString(r.value) for r in records)
                break
    finally:
        consumer.close()
    return messages


def prometheus_query(base: str, promql: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - the local Prometheus
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture(scope="module")
def store(stack_env) -> ObjectStore:
    s = ObjectStore(stack_env["IEX_S3_ENDPOINT"], stack_env["IEX_S3_ACCESS_KEY"], stack_env["IEX_S3_SECRET_KEY"])
    s.ensure_bucket(BUCKET)
    return s


@pytest.fixture(scope="module")
def planner(stack_env) -> planner_pb2_grpc.PlannerServiceStub:
    return planner_pb2_grpc.PlannerServiceStub(channel("planner"))


@pytest.fixture(scope="module")
def finished_exploration(store, planner) -> planner_pb2.Exploration:
    target_uri = upload_target(store, BUCKET, "targets/slice", ("red circle", "orange circle"), n_train=8, n_eval=3)
    spec = planner_pb2.ExplorationSpec(
        target_uri=target_uri,
        mode=common_pb2.EXPLORATION_MODE_RANDOM,
        concepts=list(synthetic.CONCEPTS),
        iterations=1,
        queries_per_iteration=QUERIES,
        images_per_query=IMAGES_PER_QUERY,
        seed=7,
        iteration_deadline_seconds=600,
    )
    created = planner.CreateExploration(planner_pb2.CreateExplorationRequest(spec=spec, exploration_id="slice-1")).exploration
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        e = planner.GetExploration(planner_pb2.GetExplorationRequest(exploration_id=created.exploration_id)).exploration
        if e.state in (common_pb2.EXPLORATION_STATE_SUCCEEDED, common_pb2.EXPLORATION_STATE_FAILED, common_pb2.EXPLORATION_STATE_CANCELLED):
            break
        time.sleep(2)
    assert e.state == common_pb2.EXPLORATION_STATE_SUCCEEDED, f"exploration did not succeed: {e}"
    return e


def test_iteration_one_finishes_with_consistent_counts(finished_exploration):
    e = finished_exploration
    assert e.iterations_finished == 1 and len(e.iterations) == 1
    it = e.iterations[0]
    c = e.counts
    assert it.phase == common_pb2.ITERATION_PHASE_FINISHED
    assert c.queries_issued == QUERIES and c.queries_crawled == QUERIES
    assert c.images_fetched > 0 and c.images_unique > 0
    # Every fetched image got exactly one decision; every accepted one was scored.
    assert c.images_unique + c.images_duplicate + c.images_contaminating + c.images_invalid == c.images_fetched
    assert c.images_scored == c.images_unique + c.images_duplicate
    assert it.scored_with.version == 1 and it.trained_model.version == 2
    assert e.serving_model.version == 2
    assert 0.0 < it.mean_concept_reward <= 1.0


def test_stored_objects_are_content_addressed_and_unique(finished_exploration, store):
    keys = sorted(store.list_keys(BUCKET, "images/"))
    assert len(keys) == finished_exploration.counts.images_unique
    for key in keys:
        data = store.get_bytes(BUCKET, key)
        assert key == content_key("images", pixel_sha256(data)), key


def test_topics_carry_the_events(finished_exploration, stack_env):
    bootstrap = stack_env["IEX_KAFKA_BOOTSTRAP"]
    stored = read_topic(bootstrap, topics.IMAGES_STORED, finished_exploration.counts.images_unique)
    assert len({m.pixel_sha256 for m in stored}) == finished_exploration.counts.images_unique
    models = read_topic(bootstrap, topics.MODELS, 2)
    versions = sorted({m.model.version for m in models if m.exploration_id == finished_exploration.exploration_id})
    assert versions == [1, 2]
    queries = read_topic(bootstrap, topics.QUERIES, QUERIES)
    assert len({q.query_id for q in queries if q.exploration_id == finished_exploration.exploration_id}) == QUERIES


def test_trainer_checkpoint_and_model_repository(finished_exploration, store, stack_env, state_dir):
    models = read_topic(stack_env["IEX_KAFKA_BOOTSTRAP"], topics.MODELS, 2)
    latest = max((m for m in models if m.exploration_id == finished_exploration.exploration_id), key=lambda m: m.model.version)
    assert latest.iteration == 1 and latest.train_steps > 0
    assert store.exists(BUCKET, latest.checkpoint_key), latest.checkpoint_key
    repository = state_dir / "model-repository" / latest.model.name
    assert (repository / "2" / "model.onnx").is_file() and (repository / "config.pbtxt").is_file()


def test_scorer_serves_the_new_version(finished_exploration):
    stub = scorer_pb2_grpc.ScorerServiceStub(channel("scorer"))
    serving = stub.GetServingModel(scorer_pb2.GetServingModelRequest(exploration_id=finished_exploration.exploration_id))
    assert serving.model.version == 2 and serving.target_bank_size == 16
    # Scoring an image the target set was drawn from is closer than an unrelated concept.
    import numpy as np

    rng = np.random.default_rng(5)
    red = synthetic.png_bytes(synthetic.render("red circle", rng))
    blue = synthetic.png_bytes(synthetic.render("blue square", rng))
    rewards = stub.ScoreImages(scorer_pb2.ScoreImagesRequest(exploration_id=finished_exploration.exploration_id, images=[red, blue])).rewards
    assert len(rewards) == 2 and rewards[0] > rewards[1]


def test_every_service_is_healthy_and_reflects(stack_env):
    for name in SERVICE_PORTS:
        response = health_pb2_grpc.HealthStub(channel(name)).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, name
    services = ProtoReflectionDescriptorDatabase(channel("planner")).get_services()
    assert "iex.v1.PlannerService" in services and "grpc.health.v1.Health" in services


def test_prometheus_scrapes_every_service(finished_exploration, stack_env):
    base = stack_env["IEX_PROMETHEUS_URL"]
    deadline = time.monotonic() + 60
    while True:
        up = {r["metric"]["job"]: r["value"][1] for r in prometheus_query(base, "up")}
        if all(up.get(name) == "1" for name in SERVICE_PORTS) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert all(up.get(name) == "1" for name in SERVICE_PORTS), up
    issued = prometheus_query(base, "iex_planner_queries_issued_total")
    assert issued and float(issued[0]["value"][1]) >= QUERIES
    scored = prometheus_query(base, "sum(iex_scorer_images_scored_total)")
    assert scored and float(scored[0]["value"][1]) >= finished_exploration.counts.images_scored


@pytest.mark.parametrize(
    "spec, field",
    [
        (planner_pb2.ExplorationSpec(concepts=["a"]), "spec.target_uri"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/targets/slice", concepts=["a"], iterations=100000), "spec.iterations"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/targets/nothing-here", concepts=["a"]), "spec.target_uri"),
    ],
)
def test_invalid_requests_name_the_field(planner, spec, field):
    with pytest.raises(grpc.RpcError) as info:
        planner.CreateExploration(planner_pb2.CreateExplorationRequest(spec=spec))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field), info.value.details()


def test_unknown_exploration_is_not_found(planner):
    with pytest.raises(grpc.RpcError) as info:
        planner.GetExploration(planner_pb2.GetExplorationRequest(exploration_id="no-such-one"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
