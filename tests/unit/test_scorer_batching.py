"""Scorer: decisions batched across events, embeddings kept per model version, running concept
rewards, the load-failure alert and the removal of unloadable versions, GetEmbeddings.

Same in-memory fakes as test_scorer_service (Triton, S3, Kafka); every expected value is recomputed
independently from the fake encoder's projection.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import numpy as np
import pytest

from iex.v1 import common_pb2, events_pb2, scorer_pb2
from services.common import topics
from services.common.errors import DependencyUnavailable
from services.common.kafka import EventContext
from services.common.modelrepo import InferenceError, list_versions
from services.common.rewards import concept_reward
from services.scorer import concepts as concepts_mod
from services.scorer import embeddings as emb
from services.scorer.preprocess import decode_image
from test_scorer_service import (  # noqa: F401 - grpc_stub and ready are fixtures used below
    BUCKET,
    EXPLORATION,
    IMAGE_SIZE,
    MODEL,
    FakeStore,
    decision,
    exploration_created,
    fake_features,
    grpc_stub,
    make_service,
    metric,
    model_published,
    png,
    ready,
    reference_reward,
    score,
    seed_target,
)

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 120, 20), (90, 90, 90), (250, 250, 10), (10, 200, 200)]


def real_decision(data: bytes, store, *, query="q-1", kind=common_pb2.DECISION_KIND_UNIQUE, duplicate_of="", url=None):
    """A decision whose pixel_sha256 is a real sha256 of the bytes (as dedup would name it)."""
    sha = hashlib.sha256(data).hexdigest()
    event = decision(data, store, kind=kind, name=sha)
    event.pixel_sha256 = sha
    event.query_id = query
    event.duplicate_of = duplicate_of
    event.raw_sha256 = hashlib.sha256(b"raw" + data + (url or "").encode()).hexdigest()
    event.url = url or f"http://example.test/{sha[:12]}.png"
    return event


def embedding_of(version: int, data: bytes) -> np.ndarray:
    return fake_features(version, decode_image(data, IMAGE_SIZE)[None])[0]


def ctx(offset: int, partition: int = 0) -> EventContext:
    return EventContext(topic=topics.DECISIONS.name, partition=partition, offset=offset, key=EXPLORATION, headers={}, timestamp_ms=0)


# ---- batching across events ------------------------------------------------------------------
def test_polled_batch_is_scored_with_one_embedding_call(ready):
    service, store, encoder, targets = ready
    service.handle_model_published(model_published(1))
    encoder.embed_calls.clear()
    images = [png(c) for c in COLOURS]
    events = [decision(data, store, name=f"img{i}") for i, data in enumerate(images)]
    requests_before = metric("iex_scorer_inference_batch_images_count", purpose="score")
    batches_before = metric("iex_scorer_decision_batch_decisions_sum")

    for event in events:
        service.handle_decision(event)
    assert service.publisher.of(topics.IMAGES_SCORED) == []  # buffered until the commit
    service.before_commit()

    assert encoder.embed_calls == [(1, len(images))]  # one call for the whole polled batch
    # ... sent as requests of batch_size (4): 4 + 3 images.
    assert metric("iex_scorer_inference_batch_images_count", purpose="score") == requests_before + 2
    assert metric("iex_scorer_decision_batch_decisions_sum") == batches_before + len(images)
    scored = service.publisher.of(topics.IMAGES_SCORED)
    assert [s.object_key for s in scored] == [e.object_key for e in events]
    np.testing.assert_allclose([s.reward for s in scored], [reference_reward(1, data, targets) for data in images], atol=1e-5)
    assert service.pending_decisions == 0


def test_model_switch_inside_a_batch_keeps_the_order(ready):
    service, store, _, targets = ready
    service.handle_model_published(model_published(1))
    first, second, third = png(COLOURS[0]), png(COLOURS[1]), png(COLOURS[2])
    service.handle_decision(decision(first, store, name="a"))
    service.handle_decision(decision(second, store, name="b"))
    service.handle_model_published(model_published(2))  # same polled batch
    service.handle_decision(decision(third, store, name="c"))
    service.before_commit()

    scored = {s.object_key.rsplit("/", 1)[-1]: s for s in service.publisher.of(topics.IMAGES_SCORED)}
    assert (scored["a"].model.version, scored["b"].model.version, scored["c"].model.version) == (1, 1, 2)
    assert scored["a"].reward == pytest.approx(reference_reward(1, first, targets), abs=1e-5)
    assert scored["c"].reward == pytest.approx(reference_reward(2, third, targets), abs=1e-5)
    # The switch was announced after the decisions handled before it were published.
    names = [name for name, _, _ in service.publisher.events]
    assert names.index(topics.MODELS_SERVING.name, 1) > max(i for i, n in enumerate(names[:4]) if n == topics.IMAGES_SCORED.name)


def test_decisions_before_the_first_model_wait_in_the_buffer(ready):
    service, store, _, targets = ready
    image = png(COLOURS[3])
    service.handle_decision(decision(image, store), ctx(0))
    service.handle_model_published(model_published(1))  # must not block on the buffered decision
    assert service.pending_decisions == 1
    service.before_commit()
    [scored] = service.publisher.of(topics.IMAGES_SCORED)
    assert scored.model.version == 1
    assert scored.reward == pytest.approx(reference_reward(1, image, targets), abs=1e-5)


def test_same_record_handed_twice_is_buffered_once(ready):
    service, store, _, _ = ready
    service.handle_model_published(model_published(1))
    event = decision(png(COLOURS[0]), store)
    service.handle_decision(event, ctx(5))
    service.handle_decision(event, ctx(5))
    service.handle_decision(event, ctx(6))  # the same image in another record: scored again
    assert service.pending_decisions == 2


def test_outage_during_the_flush_keeps_the_batch_for_the_retry(ready):
    service, store, _, targets = ready
    service.handle_model_published(model_published(1))
    images = [png(c) for c in COLOURS[:3]]
    for i, data in enumerate(images):
        service.handle_decision(decision(data, store, name=f"o{i}"), ctx(i))
    store.up = False
    with pytest.raises(DependencyUnavailable):
        service.before_commit()
    assert service.pending_decisions == 3
    store.up = True
    service.before_commit()
    scored = service.publisher.of(topics.IMAGES_SCORED)
    assert len(scored) == 3 and service.pending_decisions == 0
    np.testing.assert_allclose([s.reward for s in scored], [reference_reward(1, d, targets) for d in images], atol=1e-5)


def test_a_batch_that_fails_is_scored_one_by_one(ready):
    service, store, encoder, targets = ready
    service.handle_model_published(model_published(1))
    real_embed = encoder.embed

    def poisoned(name, version, images, **options):
        if any(int(image.max()) == 0 for image in images):  # Triton chokes on an all-black image
            raise InferenceError("onnxruntime failed: bad input [StatusCode.INTERNAL]")
        return real_embed(name, version, images, **options)

    encoder.embed = poisoned
    good = [png(COLOURS[0]), png(COLOURS[1])]
    events = [decision(good[0], store, name="g0"), decision(png((0, 0, 0)), store, name="black"), decision(good[1], store, name="g1")]
    score(service, *events)

    scored = service.publisher.of(topics.IMAGES_SCORED)
    assert [s.object_key for s in scored] == [events[0].object_key, events[2].object_key]
    np.testing.assert_allclose([s.reward for s in scored], [reference_reward(1, d, targets) for d in good], atol=1e-5)
    [letter] = service.publisher.of(topics.DECISIONS.dead_letter)
    assert letter.reason == "InferenceError"
    assert events_pb2.ImageDecision.FromString(letter.value).object_key == events[1].object_key


# ---- embeddings in S3 ------------------------------------------------------------------------
def test_embeddings_are_stored_per_model_version(ready):
    service, store, _, _ = ready
    service.handle_model_published(model_published(1))
    images = [png(c) for c in COLOURS[:3]]
    events = [real_decision(data, store) for data in images]
    # A duplicate of the first image is credited with the first image's object and identity.
    duplicate = real_decision(png((201, 30, 30)), store, kind=common_pb2.DECISION_KIND_NEAR_DUPLICATE, duplicate_of=events[0].pixel_sha256)
    duplicate.object_key = events[0].object_key
    score(service, *events, duplicate)

    shas = [e.pixel_sha256 for e in events]
    found = service.engine.embeddings.lookup(MODEL, 1, shas + ["f" * 64])
    assert set(found) == set(shas)
    for sha, data in zip(shas, images):
        np.testing.assert_allclose(found[sha], embedding_of(1, data), atol=1e-6)
    shards = [k for _, k in store.objects if k.startswith(emb.images_prefix(MODEL, 1))]
    assert len(shards) == 1
    assert metric("iex_scorer_embeddings_stored_total") >= 3

    # Redelivered batch: nothing new is written; a restarted replica rewrites the same shard.
    score(service, *events)
    restarted, _, _ = make_service(store=store)
    score(restarted, *events, duplicate)
    assert [k for _, k in store.objects if k.startswith(emb.images_prefix(MODEL, 1))] == shards

    # Another version, another place.
    service.handle_model_published(model_published(2))
    score(service, events[0])
    assert service.engine.embeddings.lookup(MODEL, 2, [shas[0]])[shas[0]] == pytest.approx(embedding_of(2, images[0]), abs=1e-6)


def test_embedding_store_lookup_and_banks():
    store = FakeStore()
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 4)).astype(np.float32)
    keys = [f"{i:064x}" for i in range(5)]
    clock = [0.0]
    writer = emb.EmbeddingStore(store, BUCKET)
    shards = emb.EmbeddingStore(store, BUCKET, min_refresh_interval_s=10.0, clock=lambda: clock[0])  # another replica
    first = writer.put_images("m", 1, keys[:3] + [keys[0]], np.concatenate([vectors[:3], vectors[:1]]))
    assert first == writer.put_images("m", 1, [keys[2], keys[1], keys[0]], vectors[[2, 1, 0]])  # same keys, same shard
    found = shards.lookup("m", 1, keys)
    assert sorted(found) == keys[:3]
    writer.put_images("m", 1, keys[3:], vectors[3:])
    assert sorted(writer.lookup("m", 1, keys)) == keys  # the writer knows its own shards
    assert sorted(shards.lookup("m", 1, keys)) == keys[:3]  # listed a moment ago: not listed again yet
    clock[0] = 11.0
    found = shards.lookup("m", 1, keys)
    assert sorted(found) == keys
    for i, key in enumerate(keys):
        np.testing.assert_array_equal(found[key], vectors[i])
    assert shards.lookup("m", 2, keys) == {}
    assert sum(len(k) for k, _ in shards.iter_images("m", 1)) == 5

    # A foreign object in the prefix is ignored, never fatal.
    store.put_bytes(BUCKET, emb.images_prefix("m", 1) + "junk.npz", b"not a shard")
    clock[0] = 30.0
    assert len(shards.lookup("m", 1, keys + ["0" * 63 + "x"])) == 5
    with pytest.raises(emb.ShardError):
        emb.decode_shard(b"not a shard")
    with pytest.raises(ValueError):
        shards.lookup("../etc", 1, keys)

    digest = emb.bank_digest("s3://iex/t", 16, keys)
    assert digest != emb.bank_digest("s3://iex/t", 32, keys) and digest != emb.bank_digest("s3://iex/t", 16, keys[:-1])
    assert shards.get_bank("m", 1, digest) is None
    shards.put_bank("m", 1, digest, keys, vectors)
    bank_keys, bank = shards.get_bank("m", 1, digest)
    assert bank_keys == keys and np.array_equal(bank, vectors) and not bank.flags.writeable


def test_restart_reads_the_target_bank_back(ready):
    service, store, _, targets = ready
    service.handle_model_published(model_published(1))
    restarted, _, fresh_triton = make_service(store=store)
    reused = metric("iex_scorer_target_banks_reused_total")
    image = png(COLOURS[4])
    score(restarted, decision(image, store))
    assert fresh_triton.embedded_images == 1  # the image only: the six target images were not re-embedded
    assert metric("iex_scorer_target_banks_reused_total") == reused + 1
    [scored] = restarted.publisher.of(topics.IMAGES_SCORED)
    assert scored.reward == pytest.approx(reference_reward(1, image, targets), abs=1e-5)


# ---- concept rewards -------------------------------------------------------------------------
def test_concept_rewards_are_the_mean_of_the_top_image_rewards(ready):
    service, store, _, _ = ready
    service.handle_model_published(model_published(1))
    rng = np.random.default_rng(4)
    colours = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(15)]
    events = [real_decision(png(c), store, query="q-1") for c in colours[:12]]
    events += [real_decision(png(c), store, query="q-2") for c in colours[12:]]
    score(service, *events)

    rewards: dict[str, list[float]] = {}
    for s in service.publisher.of(topics.IMAGES_SCORED):
        rewards.setdefault(s.query_id, []).append(s.reward)
    updates = {u.query_id: u for u in service.publisher.of(topics.CONCEPT_REWARDS)}
    assert set(updates) == {"q-1", "q-2"}
    for query, values in rewards.items():
        update = updates[query]
        assert update.reward == pytest.approx(concept_reward(values, 10), abs=1e-6)
        assert update.reward == pytest.approx(float(np.mean(sorted(values, reverse=True)[:10])), abs=1e-6)
        assert update.images_scored == len(values) and update.top == 10
        assert update.best_image_reward == pytest.approx(max(values), abs=1e-6)
        assert (update.model.name, update.model.version, update.exploration_id) == (MODEL, 1, EXPLORATION)
    assert len(rewards["q-1"]) == 12  # more than the top 10: the mean really drops the worst two

    # Redelivered: the same values are re-announced, nothing is counted twice.
    published = len(service.publisher.of(topics.CONCEPT_REWARDS))
    score(service, *events[12:])
    again = service.publisher.of(topics.CONCEPT_REWARDS)[published:]
    assert [(u.query_id, u.images_scored, u.reward) for u in again] == [("q-2", 3, updates["q-2"].reward)]

    # A restarted replica carries on from S3.
    restarted, _, _ = make_service(store=store)
    extra = real_decision(png((1, 2, 250)), store, query="q-2")
    score(restarted, extra)
    [update] = restarted.publisher.of(topics.CONCEPT_REWARDS)
    [extra_scored] = restarted.publisher.of(topics.IMAGES_SCORED)
    assert update.images_scored == 4
    assert update.reward == pytest.approx(concept_reward(rewards["q-2"] + [extra_scored.reward], 10), abs=1e-6)


def test_a_newer_model_starts_a_query_aggregate_over():
    store = FakeStore()
    aggregator = concepts_mod.ConceptAggregator(store, BUCKET, top=2)

    def image(n: int, reward: float, version: int) -> concepts_mod.ScoredImage:
        return concepts_mod.ScoredImage(EXPLORATION, 1, "q", "rose", f"d{n}", reward, MODEL, version)

    [agg] = aggregator.add([image(1, 0.9, 1), image(2, 0.5, 1), image(3, 0.1, 1)])
    assert agg.reward(2) == pytest.approx(0.7) and agg.model_version == 1
    [agg] = aggregator.add([image(4, 0.2, 2)])
    assert agg.rewards == {"d4": 0.2} and agg.model_version == 2
    [agg] = aggregator.add([image(5, 0.99, 1)])  # an older version's reward is left out
    assert agg.rewards == {"d4": 0.2}
    stored = store.get_json(BUCKET, concepts_mod.aggregate_key(EXPLORATION, "q"))
    assert stored["model_version"] == 2 and stored["rewards"] == {"d4": 0.2}
    # Odd query ids still make one safe object key.
    assert "/" not in concepts_mod.aggregate_key(EXPLORATION, "a/../b").rsplit(f"{EXPLORATION}/", 1)[1]


# ---- load failures ---------------------------------------------------------------------------
def test_load_failure_raises_the_alert_until_a_newer_version_serves(ready):
    service, _, encoder, _ = ready
    service.handle_model_published(model_published(1))
    assert metric("iex_scorer_model_load_failing") == 0
    encoder.broken.add(2)
    service.handle_model_published(model_published(2))
    assert metric("iex_scorer_model_load_failing") == 1
    assert service.engine.failing_version(EXPLORATION) == 2
    service.handle_model_published(model_published(1))  # redelivered older event: still failing
    assert metric("iex_scorer_model_load_failing") == 1
    service.handle_model_published(model_published(3))
    assert metric("iex_scorer_model_load_failing") == 0
    assert service.engine.failing_version(EXPLORATION) is None


def _repository(tmp_path: Path, versions) -> Path:
    for version in versions:
        (tmp_path / MODEL / str(version)).mkdir(parents=True)
        (tmp_path / MODEL / str(version) / "model.onnx").write_bytes(b"graph")
    return tmp_path


def test_unloadable_version_is_removed_from_the_repository(tmp_path):
    repository = _repository(tmp_path, [1, 2, 3])
    service, store, encoder = make_service(model_repository=str(repository))
    seed_target(store)
    service.handle_exploration_created(exploration_created())
    service.handle_model_published(model_published(1))
    service.handle_model_published(model_published(2))
    encoder.broken.add(3)
    discarded = metric("iex_scorer_model_versions_discarded_total")
    service.handle_model_published(model_published(3))
    [failed] = service.publisher.of(topics.MODEL_LOAD_FAILED)
    assert "removed from the model repository" in failed.reason and failed.serving.version == 2
    assert list_versions(repository, MODEL) == [1, 2]
    assert metric("iex_scorer_model_versions_discarded_total") == discarded + 1


def test_versions_are_kept_when_discarding_is_off_or_triton_serves_them(tmp_path):
    repository = _repository(tmp_path, [1, 2, 3])
    service, store, encoder = make_service(model_repository=str(repository), scorer_discard_failed_versions=False)
    seed_target(store)
    service.handle_exploration_created(exploration_created())
    service.handle_model_published(model_published(1))
    encoder.broken.add(2)
    service.handle_model_published(model_published(2))
    assert list_versions(repository, MODEL) == [1, 2, 3]

    service, store, encoder = make_service(model_repository=str(repository))
    seed_target(store)
    service.handle_exploration_created(exploration_created())
    service.handle_model_published(model_published(1))
    encoder.loaded.add((MODEL, 3))  # Triton reports it ready, whatever the load said
    encoder.broken.add(3)
    service.handle_model_published(model_published(3))
    assert list_versions(repository, MODEL) == [1, 2, 3]


# ---- GetEmbeddings ---------------------------------------------------------------------------
def _code(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_get_embeddings_returns_stored_vectors(grpc_stub):
    stub, service, store, _, _ = grpc_stub
    service.handle_model_published(model_published(1))
    images = [png(COLOURS[0]), png(COLOURS[1])]
    events = [real_decision(data, store) for data in images]
    score(service, *events)
    unknown = "e" * 64
    response = stub.GetEmbeddings(
        scorer_pb2.GetEmbeddingsRequest(exploration_id=EXPLORATION, pixel_sha256=[events[0].pixel_sha256, unknown, events[1].pixel_sha256])
    )
    assert (response.model.name, response.model.version, response.dimension) == (MODEL, 1, 8)
    assert [e.pixel_sha256 for e in response.embeddings] == [events[0].pixel_sha256, events[1].pixel_sha256]
    for item, data in zip(response.embeddings, images):
        np.testing.assert_allclose(item.values, embedding_of(1, data), atol=1e-6)
    assert list(response.missing) == [unknown]

    other = stub.GetEmbeddings(
        scorer_pb2.GetEmbeddingsRequest(
            exploration_id=EXPLORATION, pixel_sha256=[events[0].pixel_sha256], model=common_pb2.ModelRef(name=MODEL, version=2)
        )
    )
    assert list(other.missing) == [events[0].pixel_sha256] and not other.embeddings


def test_get_embeddings_validation(grpc_stub):
    stub, service, _, _, _ = grpc_stub

    def get(exploration_id=EXPLORATION, shas=("a" * 64,), model=None):
        request = scorer_pb2.GetEmbeddingsRequest(exploration_id=exploration_id, pixel_sha256=list(shas), model=model)
        return lambda: stub.GetEmbeddings(request)

    code, details = _code(get())
    assert code == grpc.StatusCode.FAILED_PRECONDITION and details.startswith("exploration_id:")
    service.handle_model_published(model_published(1))
    assert _code(get(shas=()))[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, details = _code(get(shas=["A" * 64]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("pixel_sha256[0]:")
    code, details = _code(get(shas=["a" * 64] * 257))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("pixel_sha256:")
    code, details = _code(get(model=common_pb2.ModelRef(name="../x", version=1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("model:")
    code, details = _code(get(model=common_pb2.ModelRef(name="other-model")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("model.version:")
    assert _code(get(exploration_id="nope"))[0] == grpc.StatusCode.NOT_FOUND
