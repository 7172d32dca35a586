"""Dedup on real servers (SeaweedFS S3, tansu Kafka), killed with SIGKILL and restarted.

The module runs its own small stack (S3, Kafka, the dedup service) in a private state directory, so
it can kill and restart dedup without disturbing the full stack other modules share. Images are
pushed as the crawler would: bytes staged in S3, ImageFetched events on Kafka.

1. Originals are decided and stored; dedup is killed (-9) and restarted; their variants (JPEG q60,
   0.5x, 5% crop, recolour, watermark) are then near-duplicates: the index survived in S3. A web copy
   of a target evaluation image is refused.
2. A shuffled batch of new originals, their variants and exact copies is pushed; dedup is killed
   (-9) in the middle of it and restarted. Every event ends with exactly one decision record, every
   published decision equals its record, and there is exactly one object per distinct picture.
"""

from __future__ import annotations

import io
import os
import random
import time
import urllib.request
import uuid

import grpc
import numpy as np
import pytest
from kafka import KafkaConsumer
from PIL import Image

from iex.v1 import common_pb2, dedup_pb2, dedup_pb2_grpc, events_pb2
from services.common import topics
from services.common.endpoints import LOOPBACK, SERVICE_PORTS
from services.common.kafka import KafkaConfig, Publisher
from services.common.metrics import Metrics
from services.common.objectstore import ObjectStore, content_key
from services.dedup import synthetic
from services.dedup.hashing import pixel_sha256, raw_sha256
from services.dedup.sharedindex import SharedNearIndex
from services.dedup.store import decision_from_record, decision_key
from services.stack import servers
from services.stack.process import port_open

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUCKET = "iex"
EXPLORATION = "dedup-durability-1"
TARGET_PREFIX = "targets/dedup-durability"
UNIQUE = common_pb2.DECISION_KIND_UNIQUE
EXACT_DUPLICATE = common_pb2.DECISION_KIND_EXACT_DUPLICATE
NEAR_DUPLICATE = common_pb2.DECISION_KIND_NEAR_DUPLICATE
CONTAMINATES_TARGET = common_pb2.DECISION_KIND_CONTAMINATES_TARGET


# ---- the module's own stack ------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("iex-dedup-state")
    saved = dict(os.environ)
    os.environ["IEX_STATE_DIR"] = str(state)
    names = ("s3", "kafka", "dedup")
    busy = [port for name in names if servers.external_endpoint(name) is None for port in servers.ports(name) if port_open(LOOPBACK, port)]
    if busy:
        os.environ.clear()
        os.environ.update(saved)
        pytest.skip(f"ports {busy} are held by another stack on this machine: this module starts and kills its own dedup")
    service_env = {
        **servers.stack_env(),
        "IEX_PLANNER_ADDRESS": "",  # no planner here: the exploration comes as an event
        "IEX_NEAR_INDEX_FLUSH_S": "0.5",
        "IEX_NEAR_INDEX_REFRESH_S": "1",
    }
    own = servers.Stack(servers=["s3", "kafka"], services=["dedup"], service_env=service_env, echo=print)
    try:
        own.up()
        yield own
    finally:
        try:
            own.down()
        finally:
            os.environ.clear()
            os.environ.update(saved)


@pytest.fixture(scope="module")
def store(stack) -> ObjectStore:
    env = stack.env()
    s = ObjectStore(env["IEX_S3_ENDPOINT"], env["IEX_S3_ACCESS_KEY"], env["IEX_S3_SECRET_KEY"])
    s.ensure_bucket(BUCKET)
    return s


@pytest.fixture(scope="module")
def publisher(stack):
    config = KafkaConfig(bootstrap=stack.env()["IEX_KAFKA_BOOTSTRAP"], client_id="iex-test-dedup")
    p = Publisher(config, Metrics("dedup_durability_test"))
    yield p
    p.close()


# ---- pictures and events ---------------------------------------------------------------------
def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def picture(index: int) -> Image.Image:
    return synthetic.draw_scene(synthetic.new_family(31_000 + index), 0)


def variant(image: Image.Image, kind: str, seed: int) -> bytes:
    return jpeg(synthetic.make_variant(image, kind, np.random.default_rng(seed)), quality=60 if kind == "q60" else 88)


def push(store: ObjectStore, publisher: Publisher, items: list[tuple[bytes, str]]) -> list[events_pb2.ImageFetched]:
    """Stages each (bytes, name) and publishes its ImageFetched (query and URL from the name)."""
    events = []
    for data, name in items:
        raw = raw_sha256(data)
        store.put_bytes(BUCKET, content_key("staging", raw), data)
        events.append(
            events_pb2.ImageFetched(
                exploration_id=EXPLORATION,
                iteration=1,
                query_id=f"q-{name}",
                concept="scene",
                url=f"https://web.example/{name}.jpg",
                staging_key=content_key("staging", raw),
                raw_sha256=raw,
                size_bytes=len(data),
            )
        )
    for event in events:
        publisher.publish(topics.IMAGES_FETCHED, event, key=event.raw_sha256)
    publisher.flush()
    return events


def records(store: ObjectStore) -> dict[tuple[str, str, str], events_pb2.ImageDecision]:
    """(query, raw sha, url) -> the recorded decision, for every decision record of the exploration."""
    out = {}
    for key in store.list_keys(BUCKET, f"decisions/{EXPLORATION}/"):
        decision = decision_from_record(store.get_json(BUCKET, key))
        out[(decision.query_id, decision.raw_sha256, decision.url)] = decision
    return out


def record_keys(events: list[events_pb2.ImageFetched]) -> set[str]:
    return {decision_key(e.exploration_id, e.query_id, e.raw_sha256, e.url) for e in events}


def decided(store: ObjectStore, keys: set[str]) -> int:
    """How many of these decision records exist (a listing, no reads)."""
    return len(keys & set(store.list_keys(BUCKET, f"decisions/{EXPLORATION}/")))


def wait_for_decisions(store: ObjectStore, events: list[events_pb2.ImageFetched], timeout_s: float = 180.0) -> dict:
    keys = record_keys(events)
    deadline = time.monotonic() + timeout_s
    while (done := decided(store, keys)) < len(keys):
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(keys) - done} of {len(keys)} images never decided")
        time.sleep(0.5)
    wanted = {(e.query_id, e.raw_sha256, e.url) for e in events}
    return {k: v for k, v in records(store).items() if k in wanted}


def kill_and_restart(stack) -> None:
    stack.process("dedup").kill()
    assert not stack.process("dedup").running()
    stack.start_one("dedup")


def metric(name: str) -> float:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{SERVICE_PORTS['dedup'].metrics}/metrics", timeout=5) as response:  # noqa: S310 - loopback
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name) and not line.startswith("#"))


def read_decisions(bootstrap: str, at_least: int, timeout_s: float = 60.0) -> list[events_pb2.ImageDecision]:
    consumer = KafkaConsumer(
        topics.DECISIONS.name,
        bootstrap_servers=bootstrap.split(","),
        group_id=f"test-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
    )
    found: list[events_pb2.ImageDecision] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=1000).values():
                found.extend(d for d in (events_pb2.ImageDecision.FromString(r.value) for r in batch) if d.exploration_id == EXPLORATION)
            if len(found) >= at_least:
                for batch in consumer.poll(timeout_ms=2000).values():
                    found.extend(d for d in (events_pb2.ImageDecision.FromString(r.value) for r in batch) if d.exploration_id == EXPLORATION)
                break
    finally:
        consumer.close()
    return found


# ---- the test --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exploration(stack, store, publisher) -> str:
    eval_image = picture(999)
    store.put_bytes(BUCKET, f"{TARGET_PREFIX}/eval/scene/0001.jpg", jpeg(eval_image, quality=95))
    store.put_bytes(BUCKET, f"{TARGET_PREFIX}/train/0001.jpg", jpeg(picture(998), quality=95))
    target_uri = f"s3://{BUCKET}/{TARGET_PREFIX}"
    publisher.publish(topics.EXPLORATIONS, events_pb2.ExplorationCreated(exploration_id=EXPLORATION, target_uri=target_uri), key=EXPLORATION)
    publisher.flush()
    deadline = time.monotonic() + 120
    while store.get_json(BUCKET, f"dedup/explorations/{EXPLORATION}.json") is None:
        assert time.monotonic() < deadline, "dedup never learned the exploration"
        time.sleep(0.5)
    return target_uri


def test_index_survives_a_kill_and_a_mid_batch_kill_stores_each_picture_once(stack, store, publisher, exploration):
    # ---- 1. originals, kill -9, restart, variants -------------------------------------------
    originals = [picture(i) for i in range(10)]
    first = wait_for_decisions(store, push(store, publisher, [(jpeg(image), f"a-{i}") for i, image in enumerate(originals)]))
    assert {d.kind for d in first.values()} == {UNIQUE}
    stored_first = {d.query_id: d.pixel_sha256 for d in first.values()}
    assert len(list(store.list_keys(BUCKET, "images/"))) == 10

    kill_and_restart(stack)

    kinds = synthetic.VARIANT_KINDS
    items = [(variant(image, kinds[i % len(kinds)], i), f"b-{i}") for i, image in enumerate(originals)]
    items.append((variant(picture(999), "crop5", 1), "b-eval-copy"))
    second = wait_for_decisions(store, push(store, publisher, items))
    by_query = {d.query_id: d for d in second.values()}
    for i in range(len(originals)):
        decision = by_query[f"q-b-{i}"]
        assert decision.kind == NEAR_DUPLICATE, f"{kinds[i % len(kinds)]} variant {i}: {decision}"
        assert decision.duplicate_of == stored_first[f"q-a-{i}"]
    eval_copy = by_query["q-b-eval-copy"]
    assert eval_copy.kind == CONTAMINATES_TARGET and eval_copy.contaminated_target_id == f"{exploration}/eval/scene/0001.jpg"
    assert len(list(store.list_keys(BUCKET, "images/"))) == 10

    # ---- 2. a shuffled batch, kill -9 in the middle, restart ---------------------------------
    groups = 30
    pictures = [picture(100 + g) for g in range(groups)]
    batch: list[tuple[bytes, str]] = []
    group_of: dict[str, int] = {}
    for g, image in enumerate(pictures):
        batch.append((jpeg(image), f"c-{g}-original"))
        batch.append((variant(image, kinds[g % len(kinds)], 100 + g), f"c-{g}-variant"))
        if g % 3 == 0:
            batch.append((png(Image.open(io.BytesIO(jpeg(image))).convert("RGB")), f"c-{g}-exact-copy"))
        if g % 5 == 0:
            batch.append((jpeg(image), f"c-{g}-same-bytes-elsewhere"))
    for _, name in batch:
        group_of[f"q-{name}"] = int(name.split("-")[1])
    random.Random(7).shuffle(batch)
    events = push(store, publisher, batch)
    keys = record_keys(events)

    deadline = time.monotonic() + 120
    while decided(store, keys) < len(events) // 5:
        assert time.monotonic() < deadline, "dedup did not start on the batch"
        time.sleep(0.05)
    stack.process("dedup").kill()
    decided_at_kill = decided(store, keys)
    assert decided_at_kill < len(events), "dedup finished the batch before it could be killed: push more images"
    stack.start_one("dedup")

    third = wait_for_decisions(store, events)
    replayed = metric("iex_dedup_replayed_decisions_total")
    print(f"killed after {decided_at_kill}/{len(events)} decisions; {replayed:.0f} redelivered images answered from their records")

    # Exactly one object per distinct picture, and it holds that picture's pixels.
    objects = sorted(store.list_keys(BUCKET, "images/"))
    assert len(objects) == 10 + groups
    for key in objects:
        assert key == content_key("images", pixel_sha256(store.get_bytes(BUCKET, key)))
    per_group: dict[int, set[str]] = {}
    for decision in third.values():
        assert decision.kind in (UNIQUE, NEAR_DUPLICATE, EXACT_DUPLICATE), decision
        stored_sha = decision.pixel_sha256 if decision.kind in (UNIQUE, EXACT_DUPLICATE) else decision.duplicate_of
        per_group.setdefault(group_of[decision.query_id], set()).add(stored_sha)
        assert decision.object_key == content_key("images", stored_sha)
        assert store.exists(BUCKET, decision.object_key)
    assert all(len(shas) == 1 for shas in per_group.values()), per_group
    assert sum(d.kind == UNIQUE for d in third.values()) == groups

    # Every published decision is its record (a redelivery publishes the same one again); a new
    # object's bytes ride along for the scorer in the first publication only, exactly the object's.
    recorded = records(store)
    published = read_decisions(stack.env()["IEX_KAFKA_BOOTSTRAP"], at_least=len(recorded))
    assert {(d.query_id, d.raw_sha256, d.url) for d in published} == set(recorded)
    carried = 0
    for decision in published:
        if decision.image_data:
            carried += 1
            assert decision.kind == UNIQUE and decision.image_data == store.get_bytes(BUCKET, decision.object_key)
            decision.ClearField("image_data")
        assert decision == recorded[(decision.query_id, decision.raw_sha256, decision.url)]
    assert carried > 0

    # The shared index holds every stored picture, as a replica starting now would load it.
    deadline = time.monotonic() + 30
    while True:
        index = SharedNearIndex(store, BUCKET, "observer", max_distance=20)
        index.load()
        entries = {row.tobytes().hex() for row in index.index.entries()[0]}
        if entries == {key.rsplit("/", 1)[-1] for key in objects} or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert entries == {key.rsplit("/", 1)[-1] for key in objects}

    # Decisions are queryable over gRPC.
    channel = grpc.insecure_channel(f"{LOOPBACK}:{SERVICE_PORTS['dedup'].grpc}")
    try:
        stub = dedup_pb2_grpc.DedupServiceStub(channel)
        some_near = next(d for d in third.values() if d.kind == NEAR_DUPLICATE)
        answer = stub.GetDecision(dedup_pb2.GetDecisionRequest(exploration_id=EXPLORATION, raw_sha256=some_near.raw_sha256), timeout=10)
        assert answer.decision.kind == NEAR_DUPLICATE and answer.decision.duplicate_of == some_near.duplicate_of
    finally:
        channel.close()
