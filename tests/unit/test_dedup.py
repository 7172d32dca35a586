"""Dedup decisions, storage, idempotence under redelivery and crashes, the service's events and its gRPC API.

Everything runs against an in-memory object store and publisher with the real ones' method names.
"""

from __future__ import annotations

import fnmatch
import io
import json
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from PIL import Image

from iex.v1 import common_pb2, dedup_pb2, dedup_pb2_grpc, events_pb2
from services.common import topics
from services.common.errors import DependencyUnavailable, PermanentError
from services.common.objectstore import content_key
from services.common.settings import load_service_settings
from services.dedup import hashing, store as store_mod
from services.dedup.explorations import ExplorationDirectory
from services.dedup.service import DedupService
from services.dedup.settings import DedupSettings
from services.dedup.sharedindex import SharedNearIndex
from services.dedup.stats import DedupStats
from services.dedup.store import Deduplicator, DedupPolicy
from services.dedup.targets import TargetGuard

BUCKET = "iex"
UNIQUE = common_pb2.DECISION_KIND_UNIQUE
EXACT_DUPLICATE = common_pb2.DECISION_KIND_EXACT_DUPLICATE
CONTAMINATES_TARGET = common_pb2.DECISION_KIND_CONTAMINATES_TARGET
INVALID = common_pb2.DECISION_KIND_INVALID


def without_bytes(decision: events_pb2.ImageDecision) -> events_pb2.ImageDecision:
    copy = events_pb2.ImageDecision()
    copy.CopyFrom(decision)
    copy.ClearField("image_data")
    return copy


# ---- fakes ---------------------------------------------------------------------------------------
class Crash(Exception):
    """Stands for the process dying at this point."""


class FakeObjectStore:
    """In-memory ObjectStore: same method names and absent-object behaviour; S3's metadata rules checked."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], tuple[bytes, str, dict[str, str]]] = {}
        self.crash_on_put: str | None = None  # fnmatch pattern of a key whose put "kills the process"
        self.puts: list[str] = []
        self.deletes: list[int] = []  # keys per delete_many request

    def ensure_bucket(self, bucket: str) -> None:
        pass

    def ping(self) -> bool:
        return True

    def put_bytes(self, bucket, key, data, content_type="application/octet-stream", metadata=None):
        if self.crash_on_put and fnmatch.fnmatch(key, self.crash_on_put):
            raise Crash(key)
        metadata = dict(metadata or {})
        for name, value in metadata.items():
            assert name == name.lower() and value.isascii() and value.isprintable(), (name, value)
        assert sum(len(k) + len(v) for k, v in metadata.items()) <= 2048, "S3 allows 2 KB of user metadata"
        self.objects[(bucket, key)] = (bytes(data), content_type, metadata)
        self.puts.append(key)

    def get_bytes(self, bucket, key):
        if (bucket, key) not in self.objects:
            raise KeyError(key)
        return self.objects[(bucket, key)][0]

    def get_or_none(self, bucket, key):
        entry = self.objects.get((bucket, key))
        return None if entry is None else entry[0]

    def exists(self, bucket, key):
        return (bucket, key) in self.objects

    def stat_metadata(self, bucket, key):
        entry = self.objects.get((bucket, key))
        return None if entry is None else dict(entry[2])

    def copy(self, bucket, source_key, dest_key):
        self.objects[(bucket, dest_key)] = self.objects[(bucket, source_key)]

    def delete(self, bucket, key):
        self.objects.pop((bucket, key), None)

    def delete_many(self, bucket, keys):
        assert len(keys) <= 1000, "S3 DeleteObjects takes at most 1,000 keys"
        self.deletes.append(len(keys))
        for key in keys:
            self.delete(bucket, key)

    def list_keys(self, bucket, prefix, recursive=True):
        return iter(sorted(k for b, k in self.objects if b == bucket and k.startswith(prefix)))

    def put_json(self, bucket, key, value):
        self.put_bytes(bucket, key, json.dumps(value, sort_keys=True).encode(), content_type="application/json")

    def get_json(self, bucket, key):
        data = self.get_or_none(bucket, key)
        return None if data is None else json.loads(data)

    def keys(self, prefix: str) -> list[str]:
        return list(self.list_keys(BUCKET, prefix))


class FakePublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, object, str]] = []

    def publish(self, topic, message, key, headers=None):
        name = topic.name if isinstance(topic, topics.Topic) else topic
        copy = type(message)()
        copy.CopyFrom(message)
        self.sent.append((name, copy, key))

    def flush(self, timeout_s: float = 30.0) -> None:
        pass

    def on(self, topic: topics.Topic) -> list[tuple[object, str]]:
        return [(message, key) for name, message, key in self.sent if name == topic.name]


class FakePlanner:
    def __init__(self, explorations: dict[str, str] | None = None) -> None:
        self.explorations = dict(explorations or {})
        self.asked: list[str] = []

    def __call__(self, exploration_id: str) -> str | None:
        self.asked.append(exploration_id)
        return self.explorations.get(exploration_id)


# ---- images and events ---------------------------------------------------------------------------
def photo(seed: int, size=(96, 96)) -> Image.Image:
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    channels = []
    for _ in range(3):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, 30)
        blob = 255 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        ramp = rng.uniform(0, 1) * 255 * (x / w) + rng.uniform(0, 1) * 120 * (y / h)
        channels.append(np.clip(0.6 * blob + 0.4 * ramp, 0, 255))
    return Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def stage(store: FakeObjectStore, data: bytes) -> str:
    raw = hashing.raw_sha256(data)
    store.put_bytes(BUCKET, content_key("staging", raw), data)
    return raw


def fetched_event(store: FakeObjectStore, data: bytes, exploration="exp-1", query="q-1", url="https://example.org/a.png?sig=SECRET", iteration=1):
    raw = stage(store, data)
    return events_pb2.ImageFetched(
        exploration_id=exploration,
        iteration=iteration,
        query_id=query,
        concept="daisy",
        url=url,
        staging_key=content_key("staging", raw),
        raw_sha256=raw,
        size_bytes=len(data),
    )


TARGET_URI = f"s3://{BUCKET}/targets/flowers"


@pytest.fixture
def store() -> FakeObjectStore:
    return FakeObjectStore()


@pytest.fixture
def planner() -> FakePlanner:
    return FakePlanner()


def make_deduplicator(store, planner=None, near_max_distance=20, **policy) -> tuple[Deduplicator, ExplorationDirectory]:
    directory = ExplorationDirectory(store, BUCKET, planner)
    guard = TargetGuard(store, BUCKET, directory.target_uri, max_pixels=hashing.DEFAULT_MAX_PIXELS)
    near = SharedNearIndex(store, BUCKET, "test-writer", near_max_distance)
    return Deduplicator(store, BUCKET, guard, DedupPolicy(**policy), near=near), directory


@pytest.fixture
def dedup(store):
    deduplicator, directory = make_deduplicator(store)
    directory.remember("exp-1", TARGET_URI)
    directory.remember("exp-2", "")
    return deduplicator


# ---- decisions -----------------------------------------------------------------------------------
def test_unique_then_reencoded_identical_png_is_an_exact_duplicate(store, dedup):
    image = photo(1)
    first = dedup.decide_and_store(fetched_event(store, encode(image, compress_level=1), query="q-1", url="https://a.example/1.png"))
    second = dedup.decide_and_store(fetched_event(store, encode(image, compress_level=9), query="q-2", url="https://b.example/2.png"))

    assert first.decision.kind == UNIQUE
    assert first.stored is not None and first.stored.object_key == first.decision.object_key
    assert second.decision.kind == EXACT_DUPLICATE
    assert second.stored is None
    assert second.decision.raw_sha256 != first.decision.raw_sha256
    assert second.decision.pixel_sha256 == first.decision.pixel_sha256
    assert second.decision.duplicate_of == first.decision.pixel_sha256
    # The duplicate's query is credited with the existing object.
    assert second.decision.object_key == first.decision.object_key == content_key("images", first.decision.pixel_sha256)
    assert store.keys("images/") == [first.decision.object_key]
    # The first finder is named by the object itself, every later one by a provenance record.
    _data, _type, metadata = store.objects[(BUCKET, first.decision.object_key)]
    assert (metadata["query-id"], metadata["raw-sha256"]) == ("q-1", first.decision.raw_sha256)
    provenance = store.keys(f"provenance/{first.decision.pixel_sha256}/")
    assert [store.get_json(BUCKET, key)["kind"] for key in provenance] == ["DECISION_KIND_EXACT_DUPLICATE"]
    assert store.get_json(BUCKET, provenance[0])["query_id"] == "q-2"


def test_stored_object_decodes_to_its_key_and_carries_sanitised_provenance(store, dedup):
    event = fetched_event(store, encode(photo(2), "JPEG", quality=90), url="https://user:pw@Example.org:8443/img/%C3%A9.jpg?token=SECRET#x")
    outcome = dedup.decide_and_store(event)
    data, content_type, metadata = store.objects[(BUCKET, outcome.decision.object_key)]
    assert hashing.pixel_sha256(data) == outcome.decision.pixel_sha256
    assert content_type == "image/jpeg" and metadata["format"] == "jpeg-original"
    assert metadata["source-url"] == "https://example.org:8443/img/%C3%A9.jpg"
    assert "SECRET" not in json.dumps(metadata) and "pw" not in metadata["source-url"]
    assert metadata["exploration-id"] == "exp-1" and metadata["query-id"] == "q-1" and metadata["concept"] == "daisy"
    assert (metadata["width"], metadata["height"]) == ("96", "96")
    assert int(metadata["size-bytes"]) == len(data) == outcome.stored.size_bytes == outcome.bytes_written
    assert (outcome.stored.width, outcome.stored.height) == (96, 96)


def test_redelivery_returns_the_same_decision_and_stores_nothing_twice(store, dedup):
    event = fetched_event(store, encode(photo(3)))
    first = dedup.decide_and_store(event)
    puts_before = list(store.puts)

    again = dedup.decide_and_store(event)

    assert again.replayed and not first.replayed
    # decided_at included: read back, not decided again; the bytes carried for the scorer only in the first
    assert first.decision.image_data and not again.decision.image_data
    assert again.decision == without_bytes(first.decision)
    assert again.stored == first.stored
    assert again.bytes_written == 0
    assert store.puts == puts_before  # not a single write
    assert len(store.keys("images/")) == 1


def test_crash_after_storing_before_the_record_redoes_the_same_unique_decision(store, dedup):
    event = fetched_event(store, encode(photo(4)))
    store.crash_on_put = "decisions/*"
    with pytest.raises(Crash):
        dedup.decide_and_store(event)
    assert len(store.keys("images/")) == 1 and store.keys("decisions/") == []

    store.crash_on_put = None
    redo = dedup.decide_and_store(event)

    assert redo.decision.kind == UNIQUE  # not a duplicate of its own object
    assert redo.stored is not None and redo.stored.size_bytes == len(store.get_bytes(BUCKET, redo.decision.object_key))
    assert len(store.keys("images/")) == 1
    assert store.keys(f"provenance/{redo.decision.pixel_sha256}/") == []  # the object names its first finder
    assert len(store.keys("decisions/")) == 1
    assert dedup.decide_and_store(event).decision == redo.decision


def test_crash_of_the_first_finder_does_not_change_a_later_duplicate(store, dedup):
    image = photo(5)
    first_event = fetched_event(store, encode(image), query="q-1")
    store.crash_on_put = "decisions/*"
    with pytest.raises(Crash):
        dedup.decide_and_store(first_event)
    store.crash_on_put = None
    other = dedup.decide_and_store(fetched_event(store, encode(image, compress_level=0), query="q-2"))
    redo = dedup.decide_and_store(first_event)
    assert other.decision.kind == EXACT_DUPLICATE
    assert redo.decision.kind == UNIQUE


def test_same_picture_for_a_second_query_or_url_is_a_duplicate(store, dedup):
    data = encode(photo(6))
    first = dedup.decide_and_store(fetched_event(store, data, query="q-1", url="https://a.example/x.png"))
    other_query = dedup.decide_and_store(fetched_event(store, data, query="q-2", url="https://a.example/x.png"))
    other_url = dedup.decide_and_store(fetched_event(store, data, query="q-1", url="https://mirror.example/x.png"))
    assert (first.decision.kind, other_query.decision.kind, other_url.decision.kind) == (UNIQUE, EXACT_DUPLICATE, EXACT_DUPLICATE)
    # Every decision of one image (raw bytes) in one exploration lies under one prefix: GetDecision lists it.
    keys = store.keys(store_mod.decisions_of_image("exp-1", first.decision.raw_sha256))
    assert len(keys) == len(store.keys("decisions/exp-1/")) == 3
    assert store_mod.decision_key("exp-1", "q-1", first.decision.raw_sha256, "https://mirror.example/x.png") in keys


def put_target(store: FakeObjectStore, images: dict[str, bytes]) -> None:
    for name, data in images.items():
        store.put_bytes(BUCKET, f"targets/flowers/{name}", data)


def test_target_eval_image_contaminates_the_target(store, dedup):
    eval_image = photo(7)
    put_target(store, {"eval/daisy/1.png": encode(eval_image), "eval/daisy/1.txt": b"a daisy", "train/0.png": encode(photo(8))})

    exact = dedup.decide_and_store(fetched_event(store, encode(eval_image, compress_level=0), query="q-1"))
    near = dedup.decide_and_store(fetched_event(store, encode(eval_image, "JPEG", quality=90), query="q-2"))
    train_copy = dedup.decide_and_store(fetched_event(store, encode(photo(8)), query="q-3"))

    assert exact.decision.kind == CONTAMINATES_TARGET
    assert exact.decision.contaminated_target_id == f"{TARGET_URI}/eval/daisy/1.png"
    assert exact.decision.reason == "exact_pixels" and exact.decision.hamming_distance == 0
    assert exact.decision.object_key == "" and exact.stored is None
    assert near.decision.kind == CONTAMINATES_TARGET and near.decision.reason == "near_hash"
    assert 0 < near.decision.hamming_distance <= DedupPolicy().contamination_max_distance
    # Only evaluation images are protected; training images of the target are fine to find.
    assert train_copy.decision.kind == UNIQUE
    assert store.keys("images/") == [train_copy.decision.object_key]
    # The evaluation hashes were computed once and cached for the other replicas.
    assert len(store.keys("dedup/target-hashes/")) == 1


def test_near_matching_can_be_turned_off(store):
    deduplicator, directory = make_deduplicator(store, contamination_max_distance=-1)
    directory.remember("exp-1", TARGET_URI)
    eval_image = photo(9)
    put_target(store, {"eval/daisy/2.png": encode(eval_image)})
    assert deduplicator.decide_and_store(fetched_event(store, encode(eval_image, "JPEG", quality=90))).decision.kind == UNIQUE


def test_contamination_is_per_exploration(store, dedup):
    eval_image = encode(photo(10))
    put_target(store, {"eval/daisy/3.png": eval_image})
    elsewhere = dedup.decide_and_store(fetched_event(store, eval_image, exploration="exp-2"))
    here = dedup.decide_and_store(fetched_event(store, eval_image, exploration="exp-1"))
    assert elsewhere.decision.kind == UNIQUE
    assert here.decision.kind == CONTAMINATES_TARGET


def test_cached_target_hashes_are_reused_and_refreshed_when_the_split_changes(store):
    put_target(store, {"eval/a/1.png": encode(photo(11))})
    loads: list[str] = []
    directory = ExplorationDirectory(store, BUCKET)
    directory.remember("exp-1", TARGET_URI)
    guard = TargetGuard(store, BUCKET, directory.target_uri, max_pixels=hashing.DEFAULT_MAX_PIXELS, refresh_s=0.0, on_load=loads.append)
    assert len(guard.for_exploration("exp-1")) == 1
    other_replica = TargetGuard(store, BUCKET, directory.target_uri, max_pixels=hashing.DEFAULT_MAX_PIXELS, on_load=loads.append)
    assert len(other_replica.for_exploration("exp-1")) == 1
    put_target(store, {"eval/a/2.png": encode(photo(12)), "eval/a/broken.png": b"garbage"})
    refreshed = guard.for_exploration("exp-1")
    assert (len(refreshed), refreshed.skipped) == (2, 1)
    assert loads == ["computed", "cache", "computed"]


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\x00\x01garbage, not an image", "undecodable"),
        (encode(Image.new("RGB", (4, 4))), "too_small"),
    ],
)
def test_bad_images_are_invalid(store, dedup, data, reason):
    outcome = dedup.decide_and_store(fetched_event(store, data))
    assert outcome.decision.kind == INVALID
    assert outcome.decision.reason == reason
    assert outcome.decision.object_key == "" and outcome.stored is None
    assert store.keys("images/") == [] and store.keys("provenance/") == []
    # Recorded like any decision: a redelivery is answered from the record.
    assert dedup.decide_and_store(fetched_event(store, data)).replayed


def test_too_large_and_tampered_bytes_are_invalid(store):
    deduplicator, directory = make_deduplicator(store, max_image_bytes=1024)
    directory.remember("exp-1", "")
    big = deduplicator.decide_and_store(fetched_event(store, np.random.default_rng(0).bytes(4096)))
    assert (big.decision.kind, big.decision.reason) == (INVALID, "too_large")

    event = fetched_event(store, encode(photo(13, size=(16, 16))), query="q-2")
    store.put_bytes(BUCKET, event.staging_key, encode(photo(14, size=(16, 16))))
    tampered = deduplicator.decide_and_store(event)
    assert (tampered.decision.kind, tampered.decision.reason) == (INVALID, "raw_sha256_mismatch")


def test_missing_staged_bytes_are_a_permanent_error(store, dedup):
    event = fetched_event(store, encode(photo(15)))
    store.delete(BUCKET, event.staging_key)
    with pytest.raises(PermanentError) as caught:
        dedup.decide_and_store(event)
    assert caught.value.reason == "staging_missing"
    assert store.keys("decisions/") == []


@pytest.mark.parametrize(
    "field, value",
    [("exploration_id", "../etc"), ("exploration_id", ""), ("query_id", "a/b"), ("raw_sha256", "abc"), ("staging_key", "")],
)
def test_events_with_unsafe_fields_are_permanent_errors(store, dedup, field, value):
    event = fetched_event(store, encode(photo(16)))
    setattr(event, field, value)
    with pytest.raises(PermanentError) as caught:
        dedup.decide_and_store(event)
    assert caught.value.reason == "invalid_event"


def test_unknown_exploration_is_asked_of_the_planner(store):
    planner = FakePlanner({"exp-9": TARGET_URI})
    deduplicator, _ = make_deduplicator(store, planner)
    eval_image = encode(photo(17))
    put_target(store, {"eval/x/1.png": eval_image})
    assert deduplicator.decide_and_store(fetched_event(store, eval_image, exploration="exp-9")).decision.kind == CONTAMINATES_TARGET
    assert planner.asked == ["exp-9"]
    # Recorded for the other replicas; a fresh directory does not ask again.
    fresh, _ = make_deduplicator(store, planner)
    fresh.decide_and_store(fetched_event(store, encode(photo(18)), exploration="exp-9"))
    assert planner.asked == ["exp-9"]

    with pytest.raises(PermanentError) as caught:
        deduplicator.decide_and_store(fetched_event(store, encode(photo(19)), exploration="exp-unknown"))
    assert caught.value.reason == "unknown_exploration"


# ---- the service ---------------------------------------------------------------------------------
def make_service(store, planner=None, **env) -> DedupService:
    environ = {f"IEX_{k.upper()}": str(v) for k, v in env.items()}
    settings = load_service_settings(DedupSettings, "dedup", environ=environ)
    service = DedupService(settings, store=store, planner_lookup=planner or FakePlanner())
    service.publisher = FakePublisher()
    return service


def test_service_consumes_fetched_images_and_explorations():
    service = make_service(FakeObjectStore())
    assert set(service.handlers()) == {topics.IMAGES_FETCHED.name, topics.EXPLORATIONS.name}


def test_service_publishes_decisions_and_new_objects(store):
    service = make_service(store)
    put_target(store, {"eval/daisy/1.png": encode(photo(20))})
    service.handle_exploration_created(events_pb2.ExplorationCreated(exploration_id="exp-1", target_uri=TARGET_URI), None)
    assert len(store.keys("dedup/target-hashes/")) == 1  # hashed when the exploration was created

    image = photo(21)
    unique_event = fetched_event(store, encode(image))
    service.handle_image_fetched(unique_event, None)
    service.handle_image_fetched(fetched_event(store, encode(image, compress_level=0), query="q-2"), None)
    service.handle_image_fetched(fetched_event(store, encode(photo(20)), query="q-3"), None)
    service.handle_image_fetched(fetched_event(store, b"garbage", query="q-4"), None)

    publisher: FakePublisher = service.publisher
    decisions = publisher.on(topics.DECISIONS)
    assert [d.kind for d, _ in decisions] == [UNIQUE, EXACT_DUPLICATE, CONTAMINATES_TARGET, INVALID]
    assert {key for _, key in decisions} == {"exp-1"}
    stored = publisher.on(topics.IMAGES_STORED)
    assert len(stored) == 1
    assert stored[0][1] == stored[0][0].pixel_sha256 == decisions[0][0].pixel_sha256

    # A redelivery publishes the recorded events again, identical but for the carried bytes, and decides nothing new.
    publisher.sent.clear()
    service.handle_image_fetched(unique_event, None)
    assert publisher.on(topics.DECISIONS)[0][0] == without_bytes(decisions[0][0])
    assert publisher.on(topics.IMAGES_STORED)[0][0] == stored[0][0]
    objects, counts = service.stats.totals()
    assert objects == 1
    assert counts == {
        "DECISION_KIND_UNIQUE": 1,
        "DECISION_KIND_EXACT_DUPLICATE": 1,
        "DECISION_KIND_CONTAMINATES_TARGET": 1,
        "DECISION_KIND_INVALID": 1,
    }


def test_exploration_with_an_unreadable_target_is_still_registered(store):
    service = make_service(store)
    service.handle_exploration_created(events_pb2.ExplorationCreated(exploration_id="exp-5", target_uri="not-an-s3-uri"), None)
    assert store.get_json(BUCKET, "dedup/explorations/exp-5.json")["target_uri"] == "not-an-s3-uri"
    with pytest.raises(PermanentError):
        service.handle_exploration_created(events_pb2.ExplorationCreated(exploration_id="bad/id", target_uri=TARGET_URI), None)


def test_stats_survive_restarts_and_add_up_across_replicas(store):
    now = [0.0]
    a = DedupStats(store, BUCKET, "dedup-a", persist_interval_s=5, clock=lambda: now[0])
    decision = events_pb2.ImageDecision(kind=UNIQUE)
    a.record(store_mod.DedupOutcome(decision, None, bytes_written=100))
    a.persist()
    assert store.keys("dedup/stats/") == []  # not due yet
    now[0] = 6.0
    a.persist()
    b = DedupStats(store, BUCKET, "dedup-b")
    b.record(store_mod.DedupOutcome(events_pb2.ImageDecision(kind=INVALID), None))
    b.record(store_mod.DedupOutcome(decision, None, replayed=True))  # replays are not decisions
    assert b.totals() == (1, {"DECISION_KIND_UNIQUE": 1, "DECISION_KIND_INVALID": 1})
    restarted = DedupStats(store, BUCKET, "dedup-a")
    restarted.load()
    assert restarted.snapshot() == {"decisions": {"DECISION_KIND_UNIQUE": 1}, "objects_stored": 1, "bytes_stored": 100}


# ---- gRPC ----------------------------------------------------------------------------------------
@pytest.fixture
def grpc_stub(store):
    service = make_service(store, replica_id="test")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    names = service.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield service, dedup_pb2_grpc.DedupServiceStub(channel), names
    finally:
        channel.close()
        server.stop(None)


def test_grpc_get_decision(store, grpc_stub):
    service, stub, names = grpc_stub
    assert names == ["iex.v1.DedupService"]
    service.directory.remember("exp-1", "")
    outcome = service.handle_image_fetched(fetched_event(store, encode(photo(22))), None)

    found = stub.GetDecision(dedup_pb2.GetDecisionRequest(exploration_id="exp-1", raw_sha256=outcome.decision.raw_sha256.upper()))
    assert found.decision == without_bytes(outcome.decision)

    with pytest.raises(grpc.RpcError) as caught:
        stub.GetDecision(dedup_pb2.GetDecisionRequest(exploration_id="exp-1", raw_sha256="0" * 64))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    for request, field in [
        (dedup_pb2.GetDecisionRequest(raw_sha256="0" * 64), "exploration_id"),
        (dedup_pb2.GetDecisionRequest(exploration_id="../x", raw_sha256="0" * 64), "exploration_id"),
        (dedup_pb2.GetDecisionRequest(exploration_id="exp-1"), "raw_sha256"),
        (dedup_pb2.GetDecisionRequest(exploration_id="exp-1", raw_sha256="xyz"), "raw_sha256"),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetDecision(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(f"{field}: ")


def test_grpc_get_dedup_stats(store, grpc_stub):
    service, stub, _ = grpc_stub
    service.directory.remember("exp-1", "")
    image = photo(23)
    service.handle_image_fetched(fetched_event(store, encode(image)), None)
    service.handle_image_fetched(fetched_event(store, encode(image, compress_level=0), query="q-2"), None)
    store.put_json(BUCKET, "dedup/stats/old-pod.json", {"decisions": {"DECISION_KIND_UNIQUE": 5}, "objects_stored": 5})
    stats = stub.GetDedupStats(dedup_pb2.GetDedupStatsRequest())
    assert stats.objects_stored == 6
    assert dict(stats.decisions) == {"DECISION_KIND_UNIQUE": 6, "DECISION_KIND_EXACT_DUPLICATE": 1}


def test_entry_point_refuses_bad_settings_before_touching_anything():
    import os
    import subprocess
    import sys

    env = {**os.environ, "IEX_MIN_IMAGE_SIDE": "0", "IEX_CONTAMINATION_MAX_DISTANCE": "99", "IEX_NEAR_DUPLICATE_MAX_DISTANCE": "x"}
    result = subprocess.run([sys.executable, "-m", "services.dedup"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    for variable in ("IEX_MIN_IMAGE_SIDE", "IEX_CONTAMINATION_MAX_DISTANCE", "IEX_NEAR_DUPLICATE_MAX_DISTANCE"):
        assert variable in result.stderr


class SlowObjectStore(FakeObjectStore):
    """Each look-up and write takes a moment, as over the network: concurrent decisions overlap."""

    def stat_metadata(self, bucket, key):
        time.sleep(0.01)
        return super().stat_metadata(bucket, key)

    def put_bytes(self, bucket, key, data, content_type="application/octet-stream", metadata=None):
        time.sleep(0.01)
        super().put_bytes(bucket, key, data, content_type, metadata)


def test_copies_and_near_copies_decided_concurrently_are_stored_once():
    store = SlowObjectStore()
    dedup, directory = make_deduplicator(store)
    directory.remember("exp-2", "")
    copies = [encode(photo(21), compress_level=level) for level in range(1, 9)]
    base = photo(22)
    near = [encode(base, "JPEG", quality=q) for q in (95, 90, 85, 80, 75, 70)]
    events = [fetched_event(store, data, exploration="exp-2", query=f"q-{i}", url=f"https://x.example/{i}.png") for i, data in enumerate(copies + near)]
    with futures.ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(dedup.decide_and_store, events))
    kinds = [o.decision.kind for o in outcomes]
    copy_kinds, near_kinds = kinds[: len(copies)], kinds[len(copies) :]
    assert copy_kinds.count(UNIQUE) == 1 and copy_kinds.count(EXACT_DUPLICATE) == len(copies) - 1
    assert near_kinds.count(UNIQUE) == 1
    assert all(k in (EXACT_DUPLICATE, common_pb2.DECISION_KIND_NEAR_DUPLICATE) for k in near_kinds if k != UNIQUE)
    assert len(store.keys("images/")) == 2


class OverlapCountingStore(SlowObjectStore):
    """Counts how many image objects are being written at once."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0

    def put_bytes(self, bucket, key, data, content_type="application/octet-stream", metadata=None):
        if not key.startswith("images/"):
            return super().put_bytes(bucket, key, data, content_type, metadata)
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(0.05)  # a slow object write: wide enough for others to overlap on a busy machine
            super().put_bytes(bucket, key, data, content_type, metadata)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_new_images_decided_concurrently_are_written_in_parallel():
    # Only the claim of new pixels takes turns (in memory); the S3 writes of different images overlap.
    store = OverlapCountingStore()
    dedup, directory = make_deduplicator(store)
    directory.remember("exp-2", "")
    events = [fetched_event(store, encode(photo(40 + i)), exploration="exp-2", query=f"q-{i}") for i in range(8)]
    with futures.ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(dedup.decide_and_store, events))
    assert [o.decision.kind for o in outcomes] == [UNIQUE] * 8
    assert store.most_in_flight > 1


class FailingImageStore(SlowObjectStore):
    def __init__(self) -> None:
        super().__init__()
        self.fail_images = True

    def put_bytes(self, bucket, key, data, content_type="application/octet-stream", metadata=None):
        if key.startswith("images/") and self.fail_images:
            time.sleep(0.05)  # the copies below meet the claim while it is being written
            raise DependencyUnavailable("s3 away")
        super().put_bytes(bucket, key, data, content_type, metadata)


def test_a_claim_whose_object_could_not_be_written_makes_its_waiters_retry():
    store = FailingImageStore()
    dedup, directory = make_deduplicator(store)
    directory.remember("exp-2", "")
    copies = [encode(photo(50), compress_level=level) for level in (1, 5, 9)]
    events = [fetched_event(store, data, exploration="exp-2", query=f"q-{i}") for i, data in enumerate(copies)]
    with futures.ThreadPoolExecutor(max_workers=3) as pool:
        attempts = [pool.submit(dedup.decide_and_store, e) for e in events]
        errors = [a.exception() for a in attempts]
    # Nobody was told "duplicate" of an object that was never written.
    assert all(isinstance(e, DependencyUnavailable) for e in errors)
    assert store.keys("images/") == [] and store.keys("decisions/") == []
    store.fail_images = False
    outcomes = [dedup.decide_and_store(e) for e in events]  # redelivered
    # The claimant's intent was durable: whichever copy made it is the first finder, the others are
    # exact duplicates of the object written for it.
    kinds = [o.decision.kind for o in outcomes]
    assert sorted(kinds) == sorted([UNIQUE, EXACT_DUPLICATE, EXACT_DUPLICATE])
    [key] = store.keys("images/")
    first_finder = store.objects[(BUCKET, key)][2]["query-id"]
    assert [o.decision.query_id for o in outcomes if o.decision.kind == UNIQUE] == [first_finder]


def test_bytes_carried_by_the_event_are_decided_without_the_staged_copy_and_checked(store, dedup):
    data = encode(photo(31))
    event = fetched_event(store, data, exploration="exp-2")
    event.data = data
    store.delete(BUCKET, event.staging_key)  # were it read, the image would be a staging_missing error
    outcome = dedup.decide_and_store(event)
    assert outcome.decision.kind == UNIQUE
    # The new object's bytes travel on to the scorer in the decision, never into the record in S3.
    assert outcome.decision.image_data == store.get_or_none(BUCKET, outcome.decision.object_key)
    record = store.get_json(BUCKET, store_mod.decision_key(event.exploration_id, event.query_id, event.raw_sha256, event.url))
    assert "image_data" not in record["decision"]
    tampered = fetched_event(store, encode(photo(32)), exploration="exp-2", query="q-t")
    tampered.data = data
    assert dedup.decide_and_store(tampered).decision.reason == "raw_sha256_mismatch"

