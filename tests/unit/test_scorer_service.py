"""Scorer handlers and gRPC API with in-memory fakes of Triton, S3 and Kafka.

The fake encoder computes deterministic embeddings (colour statistics through a version-seeded
projection), so every expected reward is recomputed here independently: same pixels, same
projection, brute-force k nearest neighbours.
"""

from __future__ import annotations

import io
import json
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from iex.v1 import common_pb2, events_pb2, scorer_pb2, scorer_pb2_grpc
from services.common import topics
from services.common.errors import DependencyUnavailable, PermanentError
from services.common.kafka import EventContext
from services.common.modelrepo import InferenceError, ModelLoadError, ModelNotReadyError, ServerUnavailableError
from services.common.settings import load_service_settings
from services.scorer import records
from services.scorer.preprocess import decode_image
from services.scorer.service import ScorerService, ScorerSettings

BUCKET = "iex"
EXPLORATION = "exp-1"
MODEL = "encoder-exp-1"
TARGET_URI = "s3://iex/targets/flowers"
IMAGE_SIZE = 16
K = 3

TARGET_COLOURS = [(250, 20, 20), (230, 40, 30), (200, 10, 60), (240, 120, 20), (180, 30, 30), (20, 20, 240)]


# ---- fakes -----------------------------------------------------------------------------------
def fake_features(version: int, pixels: np.ndarray) -> np.ndarray:
    """What the fake Triton returns: colour statistics projected by a version-seeded matrix."""
    x = pixels.astype(np.float64) / 255.0
    half = x.shape[1] // 2
    stats = np.concatenate(
        [x.mean(axis=(1, 2)), x[:, :half].mean(axis=(1, 2)), x[:, :, :half].mean(axis=(1, 2)), np.ones((x.shape[0], 1))],
        axis=1,
    )
    projection = np.random.default_rng(version).normal(size=(stats.shape[1], 8))
    emb = stats @ projection
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


class FakeEncoder:
    """TritonEncoder's methods over an in-memory 'server'."""

    def __init__(self) -> None:
        self.url = "fake:8001"
        self.up = True
        self.broken: set[int] = set()  # versions whose load Triton rejects
        self.absent: set[int] = set()  # versions no longer in the repository
        self.loaded: set[tuple[str, int]] = set()
        self.load_calls: list[tuple[str, int | None]] = []
        self.embedded_images = 0
        self.embed_calls: list[tuple[int, int]] = []  # (version, images) per embed() call
        self.lock = threading.Lock()

    def server_ready(self) -> bool:
        return self.up

    def is_ready(self, name, version=None) -> bool:
        return self.up and (name, version) in self.loaded

    def ready_versions(self, name) -> list[int]:
        if not self.up:
            raise ServerUnavailableError("down")
        return sorted(v for n, v in self.loaded if n == name)

    def load(self, name, version=None):
        self.load_calls.append((name, version))
        if not self.up:
            raise ModelLoadError("connection refused")
        if version in self.broken:
            raise ModelLoadError(f"failed to load {name} version {version}: onnx graph invalid")
        if version in self.absent:
            raise ModelLoadError(f"{name} version {version} is not ready after loading")
        self.loaded.add((name, version))
        return self.ready_versions(name)

    def embed(self, name, version, images, *, batch_size=None, on_response=None):
        if not self.up:
            raise ServerUnavailableError("down [StatusCode.UNAVAILABLE]")
        if (name, version) not in self.loaded:
            raise ModelNotReadyError(f"Request for unknown model: {name} version {version}")
        assert images.dtype == np.uint8 and images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3)
        with self.lock:
            self.embedded_images += images.shape[0]
            self.embed_calls.append((version, images.shape[0]))
        if on_response is not None:
            step = batch_size or images.shape[0]
            for start in range(0, images.shape[0], step):
                on_response(min(step, images.shape[0] - start), 0.001)
        return fake_features(version, images)

    def close(self) -> None:
        pass


class FakeStore:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}
        self.up = True

    def _check(self) -> None:
        if not self.up:
            raise DependencyUnavailable("s3 down")

    def put_bytes(self, bucket, key, data, content_type="application/octet-stream", metadata=None):
        self._check()
        self.objects[(bucket, key)] = bytes(data)

    def get_or_none(self, bucket, key):
        self._check()
        return self.objects.get((bucket, key))

    def get_bytes(self, bucket, key):
        data = self.get_or_none(bucket, key)
        if data is None:
            raise KeyError(key)
        return data

    def put_json(self, bucket, key, value):
        self.put_bytes(bucket, key, json.dumps(value, sort_keys=True).encode())

    def get_json(self, bucket, key):
        data = self.get_or_none(bucket, key)
        return None if data is None else json.loads(data)

    def list_keys(self, bucket, prefix, recursive=True):
        self._check()
        return iter(sorted(k for b, k in self.objects if b == bucket and k.startswith(prefix)))

    def delete(self, bucket, key):
        self._check()
        self.objects.pop((bucket, key), None)

    def exists(self, bucket, key):
        return (bucket, key) in self.objects

    def ping(self):
        return self.up

    def ensure_bucket(self, bucket):
        pass


class FakePublisher:
    def __init__(self) -> None:
        self.events: list[tuple[str, object, str]] = []

    def publish(self, topic, message, key, headers=None):
        self.events.append((topic.name if hasattr(topic, "name") else topic, message, key))

    def of(self, topic) -> list:
        name = topic.name if hasattr(topic, "name") else topic
        return [message for topic_name, message, _ in self.events if topic_name == name]

    def flush(self, timeout_s=30.0):
        pass


# ---- helpers ---------------------------------------------------------------------------------
def png(colour, size=(24, 20)) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, colour)
    image.paste(tuple(c // 2 for c in colour), (0, 0, size[0] // 2, size[1] // 2))  # some structure
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_service(store=None, encoder=None, **overrides):
    settings = load_service_settings(
        ScorerSettings,
        "scorer",
        environ={},
        reward_k=K,
        batch_size=4,
        model_ready_timeout_s=0.0,
        default_image_size=IMAGE_SIZE,
        **overrides,
    )
    store = store or FakeStore()
    encoder = encoder or FakeEncoder()
    service = ScorerService(settings, encoder=encoder, store=store)
    service.publisher = FakePublisher()
    return service, store, encoder


def seed_target(store: FakeStore) -> list[bytes]:
    images = [png(c) for c in TARGET_COLOURS]
    for i, data in enumerate(images):
        store.put_bytes(BUCKET, f"targets/flowers/train/class{i % 2}/{i}.png", data)
    # Not part of the bank: a caption, a broken file, and the held-out split.
    store.put_bytes(BUCKET, "targets/flowers/train/class0/0.txt", b"a red flower")
    store.put_bytes(BUCKET, "targets/flowers/train/class0/broken.png", b"\x89PNG broken")
    store.put_bytes(BUCKET, "targets/flowers/eval/rose/9.png", png((0, 255, 0)))
    return images


def exploration_created(image_size=IMAGE_SIZE) -> events_pb2.ExplorationCreated:
    return events_pb2.ExplorationCreated(exploration_id=EXPLORATION, target_uri=TARGET_URI, image_size=image_size, backbone="fake")


def model_published(version: int, image_size=IMAGE_SIZE) -> events_pb2.ModelPublished:
    return events_pb2.ModelPublished(
        exploration_id=EXPLORATION, model=common_pb2.ModelRef(name=MODEL, version=version), iteration=version - 1, image_size=image_size
    )


def decision(data: bytes, store: FakeStore, kind=common_pb2.DECISION_KIND_UNIQUE, name="img") -> events_pb2.ImageDecision:
    key = f"images/ab/cd/{name}"
    store.put_bytes(BUCKET, key, data)
    return events_pb2.ImageDecision(
        exploration_id=EXPLORATION,
        iteration=1,
        query_id="q-1",
        concept="rose",
        url=f"http://example.test/{name}.png",
        raw_sha256="raw-" + name,
        pixel_sha256="pix-" + name,
        kind=kind,
        object_key=key,
    )


def reference_reward(version: int, image: bytes, target_images: list[bytes], k: int = K) -> float:
    image_emb = fake_features(version, decode_image(image, IMAGE_SIZE)[None])[0].astype(np.float64)
    bank = fake_features(version, np.stack([decode_image(t, IMAGE_SIZE) for t in target_images])).astype(np.float64)
    sims = sorted((float(image_emb @ b / (np.linalg.norm(image_emb) * np.linalg.norm(b))) for b in bank), reverse=True)
    nearest = sims[: min(k, len(sims))]
    return sum(nearest) / len(nearest)


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def score(service, *events) -> None:
    """What the consumer loop does with a polled batch of decisions: handle each, then commit."""
    for event in events:
        service.handle_decision(event)
    service.before_commit()


@pytest.fixture
def ready():
    """A service that has consumed ExplorationCreated and a target with six train images."""
    service, store, encoder = make_service()
    targets = seed_target(store)
    service.handle_exploration_created(exploration_created())
    return service, store, encoder, targets


# ---- ModelPublished --------------------------------------------------------------------------
def test_model_published_loads_builds_bank_and_announces(ready):
    service, store, encoder, targets = ready
    service.handle_model_published(model_published(1))

    assert encoder.load_calls == [(MODEL, 1)]
    [serving] = service.publisher.of(topics.MODELS_SERVING)
    assert serving.exploration_id == EXPLORATION
    assert (serving.model.name, serving.model.version) == (MODEL, 1)
    assert serving.target_bank_size == len(targets)  # caption, broken file and eval/ left out
    assert serving.serving_since.seconds > 0
    assert service.publisher.events[0][2] == EXPLORATION  # keyed by exploration
    record = store.get_json(BUCKET, records.serving_key(EXPLORATION))
    assert record["model_name"] == MODEL and record["version"] == 1 and record["image_size"] == IMAGE_SIZE
    assert store.get_json(BUCKET, records.exploration_key(EXPLORATION))["target_uri"] == TARGET_URI


def test_decision_is_scored_with_reference_reward(ready):
    service, store, encoder, targets = ready
    service.handle_model_published(model_published(1))
    image = png((220, 30, 40))
    event = decision(image, store)
    score(service, event)

    [scored] = service.publisher.of(topics.IMAGES_SCORED)
    assert scored.reward == pytest.approx(reference_reward(1, image, targets), abs=1e-5)
    assert (scored.model.name, scored.model.version) == (MODEL, 1)
    assert scored.exploration_id == EXPLORATION and scored.query_id == "q-1" and scored.concept == "rose"
    assert scored.object_key == event.object_key and scored.pixel_sha256 == event.pixel_sha256
    assert scored.raw_sha256 == event.raw_sha256 and scored.url == event.url
    assert scored.decision == common_pb2.DECISION_KIND_UNIQUE and scored.iteration == 1
    # A red image is closer to the mostly red target than a blue one.
    score(service, decision(png((20, 30, 230)), store, name="blue"))
    blue = service.publisher.of(topics.IMAGES_SCORED)[1]
    assert blue.reward == pytest.approx(reference_reward(1, png((20, 30, 230)), targets), abs=1e-5)


@pytest.mark.parametrize("kind", [common_pb2.DECISION_KIND_EXACT_DUPLICATE, common_pb2.DECISION_KIND_NEAR_DUPLICATE])
def test_duplicates_are_scored(ready, kind):
    service, store, _, _ = ready
    service.handle_model_published(model_published(1))
    score(service, decision(png((100, 100, 100)), store, kind=kind))
    [scored] = service.publisher.of(topics.IMAGES_SCORED)
    assert scored.decision == kind


@pytest.mark.parametrize(
    "kind", [common_pb2.DECISION_KIND_INVALID, common_pb2.DECISION_KIND_CONTAMINATES_TARGET, common_pb2.DECISION_KIND_UNSPECIFIED]
)
def test_other_decisions_are_ignored(ready, kind):
    service, store, encoder, _ = ready
    service.handle_model_published(model_published(1))
    before = metric("iex_scorer_decisions_ignored_total", kind=common_pb2.DecisionKind.Name(kind))
    event = decision(b"whatever", store, kind=kind)
    score(service, event)
    assert service.publisher.of(topics.IMAGES_SCORED) == []
    assert metric("iex_scorer_decisions_ignored_total", kind=common_pb2.DecisionKind.Name(kind)) == before + 1


def test_failed_load_keeps_previous_version_serving(ready):
    service, store, encoder, targets = ready
    service.handle_model_published(model_published(1))
    service.handle_model_published(model_published(2))
    encoder.broken.add(3)
    failures_before = metric("iex_scorer_model_load_failures_total", reason="triton_load")

    service.handle_model_published(model_published(3))  # handled: no exception

    [failed] = service.publisher.of(topics.MODEL_LOAD_FAILED)
    assert (failed.model.name, failed.model.version) == (MODEL, 3)
    assert (failed.serving.name, failed.serving.version) == (MODEL, 2)
    assert "onnx graph invalid" in failed.reason
    assert metric("iex_scorer_model_load_failures_total", reason="triton_load") == failures_before + 1
    assert [m.model.version for m in service.publisher.of(topics.MODELS_SERVING)] == [1, 2]
    assert store.get_json(BUCKET, records.serving_key(EXPLORATION))["version"] == 2

    image = png((210, 60, 50))
    score(service, decision(image, store))
    [scored] = service.publisher.of(topics.IMAGES_SCORED)
    assert scored.model.version == 2
    assert scored.reward == pytest.approx(reference_reward(2, image, targets), abs=1e-5)
    assert scored.reward != pytest.approx(reference_reward(1, image, targets), abs=1e-5)


def test_redelivered_serving_version_is_reannounced_without_reload(ready):
    service, _, encoder, _ = ready
    service.handle_model_published(model_published(1))
    embedded = encoder.embedded_images
    service.handle_model_published(model_published(1))
    first, second = service.publisher.of(topics.MODELS_SERVING)
    assert first == second  # same version, bank size and serving_since
    assert encoder.load_calls == [(MODEL, 1)]
    assert encoder.embedded_images == embedded  # the bank was not rebuilt


def test_stale_version_is_ignored(ready):
    service, store, encoder, _ = ready
    service.handle_model_published(model_published(2))
    service.handle_model_published(model_published(1))
    assert [m.model.version for m in service.publisher.of(topics.MODELS_SERVING)] == [2]
    assert service.publisher.of(topics.MODEL_LOAD_FAILED) == []
    assert encoder.load_calls == [(MODEL, 2)]
    assert store.get_json(BUCKET, records.serving_key(EXPLORATION))["version"] == 2


def test_triton_unreachable_is_a_dependency_outage(ready):
    service, _, encoder, _ = ready
    encoder.up = False
    with pytest.raises(DependencyUnavailable):
        service.handle_model_published(model_published(1))
    assert service.publisher.events == []
    encoder.up = True  # the retry succeeds
    service.handle_model_published(model_published(1))
    assert len(service.publisher.of(topics.MODELS_SERVING)) == 1


def test_triton_lost_during_load_is_a_dependency_outage(ready):
    service, _, encoder, _ = ready

    def load_then_die(name, version=None):
        encoder.up = False
        raise ModelLoadError("socket closed")

    encoder.load = load_then_die
    with pytest.raises(DependencyUnavailable):
        service.handle_model_published(model_published(1))
    assert service.publisher.of(topics.MODEL_LOAD_FAILED) == []


def test_version_that_cannot_embed_is_a_load_failure(ready):
    service, _, encoder, _ = ready
    service.handle_model_published(model_published(1))
    real_embed = encoder.embed

    def broken_v2(name, version, images, **options):
        if version == 2:
            raise InferenceError("output shape [4, 0] does not match config")
        return real_embed(name, version, images, **options)

    encoder.embed = broken_v2
    service.handle_model_published(model_published(2))
    [failed] = service.publisher.of(topics.MODEL_LOAD_FAILED)
    assert failed.reason.startswith("inference") and failed.serving.version == 1
    assert service.engine.current(EXPLORATION).version == 1


def test_empty_target_is_a_load_failure(ready):
    service, store, _, _ = ready
    for bucket, key in list(store.objects):
        if "/train/" in key:
            store.delete(bucket, key)
    service.handle_model_published(model_published(1))
    [failed] = service.publisher.of(topics.MODEL_LOAD_FAILED)
    assert failed.reason.startswith("empty_target") and not failed.HasField("serving")


def test_target_bank_cap_is_deterministic(ready):
    _, store, _, _ = ready
    # Banks not kept in S3 here: the second service must embed its own, not read the first's.
    capped, _, _ = make_service(store=store, target_bank_max_images=4, scorer_persist_banks=False)
    capped.handle_model_published(model_published(1))
    capped_again, _, _ = make_service(store=store, target_bank_max_images=4, scorer_persist_banks=False)
    capped_again.handle_model_published(model_published(1))
    a = capped.engine.current(EXPLORATION).bank
    b = capped_again.engine.current(EXPLORATION).bank
    assert a.shape[0] == 4 and np.array_equal(a, b)


def test_model_before_exploration_is_parked_then_served():
    service, store, encoder = make_service()
    seed_target(store)
    service.handle_model_published(model_published(1))
    assert service.publisher.events == [] and encoder.load_calls == []
    assert store.get_json(BUCKET, records.pending_model_key(EXPLORATION))["version"] == 1

    service.handle_exploration_created(exploration_created())
    [serving] = service.publisher.of(topics.MODELS_SERVING)
    assert serving.model.version == 1
    assert store.get_json(BUCKET, records.pending_model_key(EXPLORATION)) is None
    service.handle_exploration_created(exploration_created())  # redelivery: nothing more to do
    assert len(service.publisher.of(topics.MODELS_SERVING)) == 1


def test_exploration_validation():
    service, _, _ = make_service()
    with pytest.raises(PermanentError) as info:
        service.handle_exploration_created(events_pb2.ExplorationCreated(exploration_id="../x", target_uri=TARGET_URI))
    assert info.value.reason == "invalid_exploration_id"
    with pytest.raises(PermanentError) as info:
        service.handle_exploration_created(events_pb2.ExplorationCreated(exploration_id="e", target_uri="/local/path"))
    assert info.value.reason == "invalid_target_uri"
    with pytest.raises(PermanentError):
        service.handle_model_published(events_pb2.ModelPublished(exploration_id="e", model=common_pb2.ModelRef(name="m", version=0)))


# ---- decisions -------------------------------------------------------------------------------
def parked_keys(store) -> list[str]:
    return [k for b, k in store.objects if b == BUCKET and k.startswith(records.PARKED_DECISIONS_PREFIX)]


def test_decision_without_serving_model_is_parked_and_scored_when_the_model_serves(ready):
    service, store, _, targets = ready
    image = png((1, 2, 3))
    event = decision(image, store)
    before = metric("iex_scorer_decisions_parked_total")
    score(service, event)  # the commit goes through: the decision is parked, not retried forever
    assert service.pending_decisions == 0
    assert service.publisher.of(topics.IMAGES_SCORED) == []
    [key] = parked_keys(store)
    assert key.startswith(f"{records.PARKED_DECISIONS_PREFIX}{EXPLORATION}/")
    assert records.parked_from_json(store.get_json(BUCKET, key))[0].decision == event
    assert metric("iex_scorer_decisions_parked_total") == before + 1

    service.handle_model_published(model_published(1))  # the model loads late: nothing is lost
    [scored] = service.publisher.of(topics.IMAGES_SCORED)
    assert scored.model.version == 1 and scored.object_key == event.object_key
    assert scored.reward == pytest.approx(reference_reward(1, image, targets), abs=1e-5)
    assert parked_keys(store) == []
    assert service.publisher.of(topics.DECISIONS.dead_letter) == []


def test_parked_decisions_are_scored_by_the_sweep_when_another_replica_switched(ready):
    service, store, _, targets = ready
    image = png((40, 50, 60))
    score(service, decision(image, store))
    assert len(parked_keys(store)) == 1
    # Another replica (or this one, before a crash) switched to v1 without taking the park back.
    other, _, _ = make_service(store=store, encoder=service.encoder)
    other.engine.serve(EXPLORATION, MODEL, 1, IMAGE_SIZE)
    service.sweep_parked()
    [scored] = service.publisher.of(topics.IMAGES_SCORED)
    assert scored.model.version == 1
    assert scored.reward == pytest.approx(reference_reward(1, image, targets), abs=1e-5)
    assert parked_keys(store) == []


def test_decisions_no_model_ever_serves_are_dead_lettered_after_the_park_timeout(ready):
    service, store, _, _ = ready
    hostile = decision(png((9, 9, 9)), store)
    hostile.exploration_id = "never-gets-a-model"
    service.handle_decision(hostile, EventContext(topic=topics.DECISIONS.name, partition=3, offset=42, key="k", headers={}, timestamp_ms=0))
    service.before_commit()
    assert len(parked_keys(store)) == 1
    timeout = service.settings.scorer_park_timeout_s
    service.sweep_parked(now=time.time() + timeout / 2)  # still within the timeout: kept
    assert len(parked_keys(store)) == 1 and service.publisher.of(topics.DECISIONS.dead_letter) == []
    service.sweep_parked(now=time.time() + timeout + 1)
    [letter] = service.publisher.of(topics.DECISIONS.dead_letter)
    assert letter.reason == "no_model_serving"
    assert (letter.partition, letter.offset) == (3, 42)
    assert events_pb2.ImageDecision.FromString(letter.value) == hostile
    assert parked_keys(store) == [] and service.publisher.of(topics.IMAGES_SCORED) == []


def test_s3_away_while_parking_keeps_the_decision_for_the_retry(ready):
    service, store, _, _ = ready
    event = decision(png((7, 7, 7)), store)
    service.handle_decision(event)
    store.up = False
    with pytest.raises(DependencyUnavailable):
        service.before_commit()
    assert service.pending_decisions == 1
    store.up = True
    service.before_commit()
    assert service.pending_decisions == 0 and len(parked_keys(store)) == 1


def test_restarted_scorer_restores_serving_state(ready):
    service, store, _, targets = ready
    service.handle_model_published(model_published(1))
    service.handle_model_published(model_published(2))

    # A new replica, and a restarted Triton that has nothing loaded (explicit model control).
    restarted, _, fresh_triton = make_service(store=store)
    image = png((90, 200, 90))
    score(restarted, decision(image, store))
    assert fresh_triton.load_calls == [(MODEL, 2)]
    [scored] = restarted.publisher.of(topics.IMAGES_SCORED)
    assert scored.model.version == 2
    assert scored.reward == pytest.approx(reference_reward(2, image, targets), abs=1e-5)
    # The redelivered ModelPublished v2 re-announces the original serving_since.
    restarted.handle_model_published(model_published(2))
    assert restarted.publisher.of(topics.MODELS_SERVING)[0] == service.publisher.of(topics.MODELS_SERVING)[1]


def test_restore_falls_back_to_newest_ready_version(ready):
    service, store, _, targets = ready
    service.handle_model_published(model_published(1))
    restarted, _, triton = make_service(store=store)
    triton.absent.add(1)  # pruned from the repository while the scorer was away
    triton.loaded.add((MODEL, 3))
    image = png((200, 50, 50))
    score(restarted, decision(image, store))
    [scored] = restarted.publisher.of(topics.IMAGES_SCORED)
    assert scored.model.version == 3
    assert scored.reward == pytest.approx(reference_reward(3, image, targets), abs=1e-5)


def test_triton_restart_reloads_serving_version(ready):
    service, store, encoder, targets = ready
    service.handle_model_published(model_published(1))
    encoder.loaded.clear()  # Triton restarted: the model is gone
    image = png((120, 10, 10))
    score(service, decision(image, store))
    [scored] = service.publisher.of(topics.IMAGES_SCORED)
    assert scored.reward == pytest.approx(reference_reward(1, image, targets), abs=1e-5)
    assert encoder.load_calls == [(MODEL, 1), (MODEL, 1)]


def test_triton_down_while_scoring_is_retried(ready):
    service, store, encoder, _ = ready
    service.handle_model_published(model_published(1))
    encoder.up = False
    event = decision(png((5, 5, 5)), store)
    with pytest.raises(DependencyUnavailable):
        score(service, event)
    assert service.pending_decisions == 1  # kept for the retry of the commit
    encoder.up = True
    service.before_commit()
    assert len(service.publisher.of(topics.IMAGES_SCORED)) == 1
    assert service.pending_decisions == 0


def test_duplicates_hit_the_embedding_cache(ready):
    service, store, encoder, _ = ready
    service.handle_model_published(model_published(1))
    event = decision(png((50, 60, 70)), store)
    score(service, event)
    embedded = encoder.embedded_images
    score(service, event)  # redelivery, or the same picture found again
    first, second = service.publisher.of(topics.IMAGES_SCORED)
    assert encoder.embedded_images == embedded
    assert first.reward == second.reward


def test_bytes_carried_by_the_decision_are_scored_without_reading_s3(ready):
    service, store, _, _ = ready
    service.handle_model_published(model_published(1))
    read = decision(png((90, 30, 200)), store, name="read")
    score(service, read)
    carried = decision(png((90, 30, 200)), store, name="carried")
    carried.image_data = store.get_or_none(BUCKET, carried.object_key)
    store.delete(BUCKET, carried.object_key)  # were it read, it would be dead-lettered as object_missing
    score(service, carried)
    assert service.publisher.of(topics.DECISIONS.dead_letter) == []
    first, second = service.publisher.of(topics.IMAGES_SCORED)
    assert first.reward == second.reward


def test_missing_or_undecodable_object_is_dead_lettered(ready):
    service, store, _, _ = ready
    service.handle_model_published(model_published(1))
    missing = decision(b"", store, name="gone")
    store.delete(BUCKET, missing.object_key)
    junk = decision(b"not an image", store, name="junk")
    before = metric("iex_scorer_decisions_dead_lettered_total", reason="object_missing")
    score(service, missing, junk)
    letters = service.publisher.of(topics.DECISIONS.dead_letter)
    assert [letter.reason for letter in letters] == ["object_missing", "undecodable_image"]
    assert events_pb2.ImageDecision.FromString(letters[0].value) == missing
    assert letters[0].topic == topics.DECISIONS.name and letters[0].consumer_group == "iex-scorer"
    assert metric("iex_scorer_decisions_dead_lettered_total", reason="object_missing") == before + 1
    # A decision without an object is refused by the handler itself (the loop dead-letters it).
    no_key = decision(png((1, 1, 1)), store)
    no_key.object_key = ""
    with pytest.raises(PermanentError) as info:
        service.handle_decision(no_key)
    assert info.value.reason == "missing_object_key"
    assert service.publisher.of(topics.IMAGES_SCORED) == []


def test_s3_outage_is_retried(ready):
    service, store, _, _ = ready
    service.handle_model_published(model_published(1))
    event = decision(png((5, 50, 5)), store)
    store.up = False
    with pytest.raises(DependencyUnavailable):
        score(service, event)


def test_handlers_and_dependencies_are_wired(ready):
    service, _, encoder, _ = ready
    assert set(service.handlers()) == {topics.EXPLORATIONS.name, topics.MODELS.name, topics.DECISIONS.name}
    checks = service.dependencies()
    assert checks["triton"]() is True
    encoder.up = False
    assert checks["triton"]() is False


# ---- gRPC ------------------------------------------------------------------------------------
@pytest.fixture
def grpc_stub(ready):
    service, store, encoder, targets = ready
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    names = service.register(server)
    assert names == ["iex.v1.ScorerService"]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield scorer_pb2_grpc.ScorerServiceStub(channel), service, store, encoder, targets
    finally:
        channel.close()
        server.stop(grace=None)


def test_score_images_returns_reference_rewards(grpc_stub):
    stub, service, _, _, targets = grpc_stub
    service.handle_model_published(model_published(2))
    images = [png((200, 20, 20)), png((20, 200, 20)), png((200, 20, 20))]
    response = stub.ScoreImages(scorer_pb2.ScoreImagesRequest(exploration_id=EXPLORATION, images=images))
    assert (response.model.name, response.model.version) == (MODEL, 2)
    expected = [reference_reward(2, image, targets) for image in images]
    np.testing.assert_allclose(list(response.rewards), expected, atol=1e-5)

    serving = stub.GetServingModel(scorer_pb2.GetServingModelRequest(exploration_id=EXPLORATION))
    assert (serving.model.name, serving.model.version, serving.target_bank_size) == (MODEL, 2, len(targets))


def _code_and_details(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_score_images_validation(grpc_stub):
    stub, service, _, _, _ = grpc_stub
    service.handle_model_published(model_published(1))
    good = png((1, 2, 3))

    def score(exploration_id=EXPLORATION, images=(good,)):
        return lambda: stub.ScoreImages(scorer_pb2.ScoreImagesRequest(exploration_id=exploration_id, images=list(images)))

    assert _code_and_details(score(exploration_id="")) == (grpc.StatusCode.INVALID_ARGUMENT, "exploration_id: required")
    code, details = _code_and_details(score(exploration_id="nope"))
    assert code == grpc.StatusCode.NOT_FOUND and details.startswith("exploration_id:")
    code, details = _code_and_details(score(images=()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("images:")
    code, details = _code_and_details(score(images=[good] * 257))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("images:")
    code, details = _code_and_details(score(images=[good, good, b"junk"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("images[2]:")


def test_score_images_before_any_model(grpc_stub):
    stub, _, _, _, _ = grpc_stub
    code, _ = _code_and_details(lambda: stub.ScoreImages(scorer_pb2.ScoreImagesRequest(exploration_id=EXPLORATION, images=[png((1, 1, 1))])))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    response = stub.GetServingModel(scorer_pb2.GetServingModelRequest(exploration_id=EXPLORATION))
    assert not response.HasField("model") and response.target_bank_size == 0


def test_get_serving_model_unknown_exploration(grpc_stub):
    stub, _, _, _, _ = grpc_stub
    code, _ = _code_and_details(lambda: stub.GetServingModel(scorer_pb2.GetServingModelRequest(exploration_id="other")))
    assert code == grpc.StatusCode.NOT_FOUND


def test_score_images_with_triton_down(grpc_stub):
    stub, service, _, encoder, _ = grpc_stub
    service.handle_model_published(model_published(1))
    encoder.up = False
    code, _ = _code_and_details(lambda: stub.ScoreImages(scorer_pb2.ScoreImagesRequest(exploration_id=EXPLORATION, images=[png((9, 9, 9))])))
    assert code == grpc.StatusCode.UNAVAILABLE
