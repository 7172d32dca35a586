"""The scorer service on the real stack: versions move through the real tritonserver under load.

The test plays the planner, dedup and (for versions 2 and 3) the trainer: it publishes
ExplorationCreated, lets the real trainer export version 1 and the real scorer load it, scores
images through events and through the gRPC API, then writes version 2 into the model repository
and publishes it while two threads keep calling ScoreImages: the scorer must move to version 2
without one failed request. A deliberately broken version 3 must fail to load (ModelLoadFailed,
the alert gauge up, the version removed from the repository) while version 2 keeps serving.

Every reward is checked against an in-process reference: the same ONNX graph in onnxruntime, the
same decoding, and a brute-force numpy k-nearest-target mean.
"""

from __future__ import annotations

import hashlib
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from iex.v1 import common_pb2, events_pb2, scorer_pb2, scorer_pb2_grpc
from services.common import topics
from services.common.endpoints import LOOPBACK, SERVICE_PORTS
from services.common.objectstore import ObjectStore, parse_s3_uri
from services.common.rewards import concept_reward
from services.scorer.preprocess import decode_image

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from services.cli.demo import upload_target  # noqa: E402
from services.common import modelrepo as mr  # noqa: E402
from services.search import synthetic  # noqa: E402

BUCKET = "iex"
SIZE = 64
BACKBONE = "mobilenetv3_small_050"
K = 15  # the scorer's default
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TARGET_CONCEPTS = ("red circle", "orange circle")
PROBES = ("red circle", "blue square", "green triangle", "orange star")
REWARD_ATOL = 2e-4


class TopicReader:
    """One consumer (own group, from the beginning) over several topics; keeps what it has read."""

    def __init__(self, bootstrap: str, wanted: list[topics.Topic | str]) -> None:
        self.types = {}
        for topic in wanted:
            if isinstance(topic, topics.Topic):
                self.types[topic.name] = topic.message
            else:
                self.types[topic] = events_pb2.DeadLetter
        self.consumer = KafkaConsumer(
            *self.types,
            bootstrap_servers=bootstrap.split(","),
            group_id=f"test-scorer-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            session_timeout_ms=6000,
            heartbeat_interval_ms=2000,
        )
        self.seen: dict[str, list] = {name: [] for name in self.types}

    def poll(self) -> None:
        for records in self.consumer.poll(timeout_ms=500).values():
            for record in records:
                self.seen[record.topic].append(self.types[record.topic].FromString(record.value))

    def wait(self, topic, predicate, count: int = 1, timeout_s: float = 120.0) -> list:
        name = topic.name if isinstance(topic, topics.Topic) else topic
        deadline = time.monotonic() + timeout_s
        while True:
            found = [m for m in self.seen[name] if predicate(m)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)}/{count} matching events on {name} after {timeout_s:.0f}s")
            self.poll()

    def close(self) -> None:
        self.consumer.close()


class Reference:
    """The scorer's computation, in-process: same graph (onnxruntime), same decoding, numpy kNN."""

    def __init__(self, onnx_path: Path, store: ObjectStore, target_uri: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
        bucket, prefix = parse_s3_uri(target_uri)
        keys = [k for k in store.list_keys(bucket, f"{prefix}/train/") if k.endswith(".png")]
        assert keys, "target has no train images"
        self.bank = self.embed([store.get_bytes(bucket, k) for k in keys])

    def embed(self, images: list[bytes]) -> np.ndarray:
        pixels = np.stack([decode_image(data, SIZE) for data in images])
        out = self.session.run([mr.OUTPUT_NAME], {mr.INPUT_NAME: pixels})[0].astype(np.float64)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def rewards(self, images: list[bytes]) -> np.ndarray:
        sims = self.embed(images) @ self.bank.T
        k = min(K, self.bank.shape[0])
        return np.array([np.mean(sorted(row, reverse=True)[:k]) for row in sims])


class ScoreStream:
    """Threads calling ScoreImages back to back; every answer and every error is recorded."""

    def __init__(self, exploration_id: str, images: list[bytes], threads: int = 2) -> None:
        self.request = scorer_pb2.ScoreImagesRequest(exploration_id=exploration_id, images=images)
        self.calls: list[tuple[str, object, object]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        channel = grpc.insecure_channel(f"{LOOPBACK}:{SERVICE_PORTS['scorer'].grpc}")
        stub = scorer_pb2_grpc.ScorerServiceStub(channel)
        try:
            while not self.stop.is_set():
                try:
                    response = stub.ScoreImages(self.request, timeout=60)
                    entry = ("ok", response.model.version, list(response.rewards))
                except grpc.RpcError as exc:
                    entry = ("error", exc.code(), exc.details())
                with self.lock:
                    self.calls.append(entry)
                time.sleep(0.05)
        finally:
            channel.close()

    def __enter__(self) -> "ScoreStream":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=90)

    def versions(self) -> list[int]:
        with self.lock:
            return [int(version) for status, version, _ in self.calls if status == "ok"]

    def wait_for(self, version: int, count: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.versions().count(version) < count:
            assert time.monotonic() < deadline, f"fewer than {count} answers with version {version}: {self.calls[-5:]}"
            time.sleep(0.2)


def scorer_metric(name: str) -> float:
    url = f"http://{LOOPBACK}:{SERVICE_PORTS['scorer'].metrics}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - the local scorer
        text = response.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples if sample.name == name)


def publish(producer: KafkaProducer, topic: topics.Topic, message, key: str) -> None:
    producer.send(topic.name, value=message.SerializeToString(), key=key.encode())


def stored_decisions(store: ObjectStore, exploration_id: str, images: list[bytes], queries: list[str], iteration: int) -> list:
    events = []
    for data, query in zip(images, queries):
        sha = hashlib.sha256(data).hexdigest()
        # Not under images/: the vertical slice counts that prefix as its own.
        key = f"scorer-it/{exploration_id}/{sha}.png"
        store.put_bytes(BUCKET, key, data, content_type="image/png")
        events.append(
            events_pb2.ImageDecision(
                exploration_id=exploration_id,
                iteration=iteration,
                query_id=query,
                concept=query.split(":", 1)[-1],
                url=f"http://offline.test/{sha[:16]}.png",
                raw_sha256=sha,
                pixel_sha256=sha,
                kind=common_pb2.DECISION_KIND_UNIQUE,
                object_key=key,
            )
        )
    return events


def new_version(repository: Path, model_name: str, version: int, dim: int, scratch: Path, seed: int) -> Path:
    """What the trainer does for a new version: export the encoder and write it into the repository."""
    torch.manual_seed(seed)
    model = timm.create_model(BACKBONE, num_classes=0).eval()
    onnx_path = scratch / f"v{version}.onnx"
    mr.export_encoder_onnx(model, SIZE, onnx_path, MEAN, STD)
    signature = mr.read_onnx_signature(onnx_path)
    assert (signature.image_size, signature.embedding_dim) == (SIZE, dim), "the stand-in trainer must match the real one's tensor shapes"
    mr.write_model_version(repository, model_name, version, onnx_path, SIZE, dim)
    return onnx_path


def test_scorer_switches_versions_under_load_and_survives_a_broken_one(stack_env, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    bootstrap = stack_env["IEX_KAFKA_BOOTSTRAP"]
    repository = Path(stack_env["IEX_MODEL_REPOSITORY"])
    store = ObjectStore(stack_env["IEX_S3_ENDPOINT"], stack_env["IEX_S3_ACCESS_KEY"], stack_env["IEX_S3_SECRET_KEY"])
    store.ensure_bucket(BUCKET)
    exploration_id = f"scorer-it-{uuid.uuid4().hex[:8]}"
    target_uri = upload_target(store, BUCKET, f"targets/{exploration_id}", TARGET_CONCEPTS, n_train=6, n_eval=2)
    rng = np.random.default_rng(3)
    probes = [synthetic.png_bytes(synthetic.render(concept, rng)) for concept in PROBES]
    scorer = scorer_pb2_grpc.ScorerServiceStub(grpc.insecure_channel(f"{LOOPBACK}:{SERVICE_PORTS['scorer'].grpc}"))
    mine = lambda m: m.exploration_id == exploration_id  # noqa: E731

    reader = TopicReader(
        bootstrap,
        [topics.MODELS, topics.MODELS_SERVING, topics.MODEL_LOAD_FAILED, topics.IMAGES_SCORED, topics.CONCEPT_REWARDS, topics.DECISIONS.dead_letter],
    )
    producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), acks="all", enable_idempotence=False)
    try:
        # ---- version 1: exported by the real trainer, loaded by the real scorer ------------------
        publish(
            producer,
            topics.EXPLORATIONS,
            events_pb2.ExplorationCreated(exploration_id=exploration_id, target_uri=target_uri, init="random", backbone=BACKBONE, image_size=SIZE),
            exploration_id,
        )
        producer.flush()
        [v1] = reader.wait(topics.MODELS, lambda m: mine(m) and m.model.version == 1, timeout_s=240)
        model_name, dim = v1.model.name, v1.embedding_dim
        [serving] = reader.wait(topics.MODELS_SERVING, lambda m: mine(m) and m.model.version == 1, timeout_s=180)
        reference = {1: Reference(repository / model_name / "1" / "model.onnx", store, target_uri)}
        assert serving.target_bank_size == reference[1].bank.shape[0] == 2 * 6 and serving.model.name == model_name

        # Events: five images of two queries, scored as one batch through Triton.
        queries = ["q-a:red circle"] * 3 + ["q-b:blue square"] * 2
        images = probes + [synthetic.png_bytes(synthetic.render("red circle", rng))]
        decisions = stored_decisions(store, exploration_id, images, queries, iteration=0)
        for event in decisions:
            publish(producer, topics.DECISIONS, event, exploration_id)
        producer.flush()
        scored = reader.wait(topics.IMAGES_SCORED, mine, count=len(decisions), timeout_s=120)
        by_key = {s.object_key: s for s in scored}
        expected = reference[1].rewards(images)
        for event, want in zip(decisions, expected):
            got = by_key[event.object_key]
            assert got.model.version == 1 and got.reward == pytest.approx(want, abs=REWARD_ATOL)
        # Running concept rewards: the mean of the top-10 (here: all) image rewards per query.
        for query in ("q-a:red circle", "q-b:blue square"):
            values = [by_key[e.object_key].reward for e in decisions if e.query_id == query]
            updates = reader.wait(topics.CONCEPT_REWARDS, lambda u, q=query, n=len(values): mine(u) and u.query_id == q and u.images_scored == n)
            latest = updates[-1]
            assert latest.reward == pytest.approx(concept_reward(values, 10), abs=1e-6) and latest.model.version == 1
        # Embeddings stored per model version, served back by GetEmbeddings.
        shas = [e.pixel_sha256 for e in decisions]
        stored = scorer.GetEmbeddings(scorer_pb2.GetEmbeddingsRequest(exploration_id=exploration_id, pixel_sha256=shas), timeout=30)
        assert not stored.missing and stored.model.version == 1 and stored.dimension == dim
        vectors = np.array([list(item.values) for item in stored.embeddings])
        np.testing.assert_allclose(np.sum(vectors * reference[1].embed(images), axis=1), 1.0, atol=1e-4)
        assert any(store.list_keys(BUCKET, f"embeddings/{model_name}/v1/images/"))

        with ScoreStream(exploration_id, probes) as stream:
            stream.wait_for(1, count=3)

            # ---- version 2: published while requests keep coming ----------------------------------
            v2_onnx = new_version(repository, model_name, 2, dim, tmp_path, seed=1)
            publish(
                producer,
                topics.MODELS,
                events_pb2.ModelPublished(
                    exploration_id=exploration_id,
                    model=common_pb2.ModelRef(name=model_name, version=2),
                    iteration=1,
                    embedding_dim=dim,
                    image_size=SIZE,
                ),
                exploration_id,
            )
            producer.flush()
            reader.wait(topics.MODELS_SERVING, lambda m: mine(m) and m.model.version == 2, timeout_s=180)
            stream.wait_for(2, count=3)
            reference[2] = Reference(v2_onnx, store, target_uri)

            # ---- version 3: broken; version 2 keeps serving -----------------------------------------
            failing_before = scorer_metric("iex_scorer_model_load_failing")
            new_version(repository, model_name, 3, dim, tmp_path, seed=2)
            (repository / model_name / "3" / "model.onnx").write_bytes(b"\x00 not an onnx graph")
            publish(
                producer,
                topics.MODELS,
                events_pb2.ModelPublished(
                    exploration_id=exploration_id,
                    model=common_pb2.ModelRef(name=model_name, version=3),
                    iteration=2,
                    embedding_dim=dim,
                    image_size=SIZE,
                ),
                exploration_id,
            )
            producer.flush()
            [failed] = reader.wait(topics.MODEL_LOAD_FAILED, lambda m: mine(m) and m.model.version == 3, timeout_s=180)
            answers_at_failure = len(stream.versions())
            stream.wait_for(2, count=stream.versions().count(2) + 3)

        assert failed.serving.name == model_name and failed.serving.version == 2
        assert "removed from the model repository" in failed.reason
        assert 3 not in mr.list_versions(repository, model_name)
        assert scorer_metric("iex_scorer_model_load_failing") >= max(1.0, failing_before)
        response = scorer.GetServingModel(scorer_pb2.GetServingModelRequest(exploration_id=exploration_id), timeout=10)
        assert response.model.version == 2

        # Not one failed request, and versions only ever moved forward: 1 ... 1, 2 ... 2.
        errors = [call for call in stream.calls if call[0] != "ok"]
        assert errors == [], errors[:5]
        versions = stream.versions()
        assert versions[0] == 1 and versions[-1] == 2 and versions == sorted(versions)
        assert all(v == 2 for v in versions[answers_at_failure:])
        want = {version: ref.rewards(probes) for version, ref in reference.items()}
        assert np.max(np.abs(want[1] - want[2])) > 10 * REWARD_ATOL  # the two versions really differ
        for _, version, rewards in stream.calls:
            np.testing.assert_allclose(rewards, want[version], atol=REWARD_ATOL)
        print(f"\nScoreImages during the switches: {len(versions)} answers ({versions.count(1)} v1, {versions.count(2)} v2), 0 errors")

        # Events after the failed load are scored with version 2.
        late = stored_decisions(store, exploration_id, [synthetic.png_bytes(synthetic.render("orange circle", rng))], ["q-c:orange circle"], 2)
        publish(producer, topics.DECISIONS, late[0], exploration_id)
        producer.flush()
        [late_scored] = reader.wait(topics.IMAGES_SCORED, lambda s: mine(s) and s.query_id == "q-c:orange circle", timeout_s=120)
        assert late_scored.model.version == 2
        assert late_scored.reward == pytest.approx(reference[2].rewards([store.get_bytes(BUCKET, late[0].object_key)])[0], abs=REWARD_ATOL)
        assert [m for m in reader.seen[topics.DECISIONS.dead_letter] if mine(events_pb2.ImageDecision.FromString(m.value))] == []
    finally:
        producer.close()
        reader.close()
