"""Trainer handlers and gRPC status with in-memory S3 and Kafka fakes and a temporary model
repository: versions appear on disk and on the topics once, and redeliveries never retrain."""

from __future__ import annotations

import io
import json
import shutil

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from iex.v1 import events_pb2, trainer_pb2
from services.common import modelrepo, topics
from services.common.errors import DependencyUnavailable, PermanentError
from services.common.settings import SettingsError, load_service_settings
from services.trainer import data, evaluation, pretrained
from services.trainer import jobs as jobs_module
from services.trainer.encoder import EncoderState, ModelConfig
from services.trainer.service import TrainerService, TrainerSettings, TrainerStatusServicer, checkpoint_key, model_name_for

BUCKET = "iex"
EXPLORATION = "exp-1"
MODEL = "enc_exp_1"
TARGET_URI = "s3://targets/flowers"


# ---- fakes -----------------------------------------------------------------------------------
class FakeStore:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], tuple[bytes, dict[str, str]]] = {}
        self.puts: list[str] = []
        self.deletes: list[str] = []
        self.up = True

    def _check(self):
        if not self.up:
            raise DependencyUnavailable("s3 down")

    def put_bytes(self, bucket, key, data, content_type="application/octet-stream", metadata=None):
        self._check()
        self.objects[(bucket, key)] = (bytes(data), {k.lower(): str(v) for k, v in (metadata or {}).items()})
        self.puts.append(key)

    def get_bytes(self, bucket, key):
        found = self.get_or_none(bucket, key)
        if found is None:
            raise KeyError(key)
        return found

    def get_or_none(self, bucket, key):
        self._check()
        entry = self.objects.get((bucket, key))
        return None if entry is None else entry[0]

    def exists(self, bucket, key):
        self._check()
        return (bucket, key) in self.objects

    def stat_metadata(self, bucket, key):
        self._check()
        entry = self.objects.get((bucket, key))
        return None if entry is None else dict(entry[1])

    def put_json(self, bucket, key, value):
        self.put_bytes(bucket, key, json.dumps(value, sort_keys=True).encode(), content_type="application/json")

    def get_json(self, bucket, key):
        raw = self.get_or_none(bucket, key)
        return None if raw is None else json.loads(raw)

    def delete(self, bucket, key):
        self._check()
        self.objects.pop((bucket, key), None)
        self.deletes.append(key)

    def list_keys(self, bucket, prefix, recursive=True):
        self._check()
        return iter(sorted(k for b, k in self.objects if b == bucket and k.startswith(prefix)))

    def ensure_bucket(self, bucket):
        pass

    def ping(self):
        return self.up


class FakePublisher:
    def __init__(self) -> None:
        self.events: list[tuple[str, object, str]] = []

    def publish(self, topic, message, key, headers=None):
        self.events.append((topic.name if hasattr(topic, "name") else topic, message, key))

    def of(self, topic):
        return [m for t, m, _ in self.events if t == topic.name]

    def flush(self, timeout_s=30.0):
        pass


class AbortCalled(Exception):
    pass


class FakeContext:
    def abort(self, code, details):
        self.code, self.details = code, details
        raise AbortCalled(details)


# ---- helpers ---------------------------------------------------------------------------------
def image_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    pixels = np.clip(base + rng.normal(0, 40, size=(30, 40, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def store():
    store = FakeStore()
    for i in range(6):
        store.put_bytes("targets", f"flowers/train/{i}.png", image_bytes(i))
    for label in ("rose", "tulip"):
        for i in range(3):
            store.put_bytes("targets", f"flowers/eval/{label}/{i}.png", image_bytes(100 + 10 * len(label) + i))
    for i in range(4):
        store.put_bytes(BUCKET, f"images/c{i}", image_bytes(200 + i))
    store.puts.clear()
    return store


def make_trainer(tmp_path, store, monkeypatch, **overrides):
    values = dict(
        model_repository=str(tmp_path / "models"),
        trainer_backbone="test_resnet",
        trainer_image_size=32,
        trainer_batch_size=8,
        trainer_max_steps=3,
        trainer_mlp_dim=64,
        trainer_projection_dim=32,
        trainer_fetch_workers=2,
        trainer_knn_k=3,
    )
    values.update(overrides)
    settings = load_service_settings(TrainerSettings, "trainer", environ={}, **values)
    service = TrainerService(settings)
    service.store = store
    service.publisher = FakePublisher()
    service.repository.mkdir(parents=True)
    runs = []
    real_train = jobs_module.train

    def counting_train(*args, **kwargs):
        runs.append(args)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(jobs_module, "train", counting_train)
    service.training_runs = runs
    return service


@pytest.fixture
def trainer(tmp_path, store, monkeypatch):
    return make_trainer(tmp_path, store, monkeypatch)


def created(**changes) -> events_pb2.ExplorationCreated:
    event = events_pb2.ExplorationCreated(exploration_id=EXPLORATION, target_uri=TARGET_URI, init="random", seed=7)
    for name, value in changes.items():
        setattr(event, name, value)
    return event


def write_manifest(store: FakeStore, iteration: int = 1, exploration: str = EXPLORATION, target: str = "flowers") -> events_pb2.IterationFinished:
    key = f"explorations/{exploration}/iterations/{iteration}/manifest.json"
    store.put_json(
        BUCKET,
        key,
        {
            "exploration_id": exploration,
            "iteration": iteration,
            "images_bucket": BUCKET,
            "candidates": [f"images/c{i}" for i in range(4)],
            "replay": ["images/c0", "images/c1"],
            "target_bucket": "targets",
            "target_uri": f"s3://targets/{target}",
            "target_train": [f"{target}/train/{i}.png" for i in range(6)],
            "target_eval": [{"key": f"{target}/eval/{label}/{i}.png", "label": label} for label in ("rose", "tulip") for i in range(3)],
        },
    )
    return events_pb2.IterationFinished(exploration_id=exploration, iteration=iteration, manifest_key=key, candidates=4, replay_selected=2)


# ---- tests -----------------------------------------------------------------------------------
def test_exploration_created_publishes_version_one(trainer, store):
    trainer.handle_exploration_created(created())

    assert modelrepo.list_versions(trainer.repository, MODEL) == [1]
    version_dir = trainer.repository / MODEL / "1"
    assert (version_dir / "model.onnx").is_file() and (trainer.repository / MODEL / "config.pbtxt").is_file()
    signature = modelrepo.read_onnx_signature(version_dir / "model.onnx")
    assert signature.image_size == 32

    published = trainer.publisher.of(topics.MODELS)
    assert len(published) == 1
    event = published[0]
    assert (event.model.name, event.model.version, event.iteration) == (MODEL, 1, 0)
    assert event.checkpoint_key == checkpoint_key(EXPLORATION, 1) == "checkpoints/exp-1/v1.pt"
    assert (event.image_size, event.embedding_dim) == (32, signature.embedding_dim)
    assert all(key == EXPLORATION for _, _, key in trainer.publisher.events)

    evaluations = trainer.publisher.of(topics.EVALUATIONS)
    assert len(evaluations) == 1 and evaluations[0].eval_images == 6 and evaluations[0].iteration == 0
    # No train_labels.json: the within-split fallback, said so, never "measurable".
    assert (evaluations[0].protocol, evaluations[0].train_images, evaluations[0].measurable) == ("eval-split-cv", 0, False)
    assert "train_labels.json" in evaluations[0].not_measurable_reason
    assert store.get_json(BUCKET, evaluations[0].record_key)["protocol"] == "eval-split-cv"

    state = EncoderState.from_bytes(store.get_bytes(BUCKET, "checkpoints/exp-1/v1.pt"), torch.device("cpu"))
    assert (state.config.seed, state.config.backbone, state.iteration, state.global_step) == (7, "test_resnet", 0, 0)

    # The served graph embeds exactly as the trainer's own evaluation does.
    import onnxruntime as ort

    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    served = session.run(["embeddings"], {"images": pixels})[0]
    own = evaluation.embed(state.backbone, torch.from_numpy(pixels).permute(0, 3, 1, 2), state.config.mean, state.config.std, torch.device("cpu"))
    np.testing.assert_allclose(served, own.numpy(), atol=1e-4)


def test_exploration_created_again_republishes_without_rebuilding(trainer, store):
    trainer.handle_exploration_created(created())
    store.puts.clear()
    onnx_before = (trainer.repository / MODEL / "1" / "model.onnx").read_bytes()
    trainer.handle_exploration_created(created())
    assert store.puts == []  # no second checkpoint
    assert (trainer.repository / MODEL / "1" / "model.onnx").read_bytes() == onnx_before
    first, second = trainer.publisher.of(topics.MODELS)
    assert (second.model, second.iteration, second.embedding_dim) == (first.model, first.iteration, first.embedding_dim)


def test_unsupported_init_and_backbone_are_permanent_errors(trainer, store):
    with pytest.raises(PermanentError) as init:
        trainer.handle_exploration_created(created(init="imagenet"))
    assert init.value.reason == "unsupported_init"
    with pytest.raises(PermanentError) as backbone:
        trainer.handle_exploration_created(created(backbone="no_such_net"))
    assert backbone.value.reason == "unknown_backbone"
    with pytest.raises(PermanentError):
        trainer.handle_exploration_created(created(exploration_id="../etc"))
    assert store.puts == [] and trainer.publisher.events == []


def test_iteration_finished_trains_version_two_once(trainer, store):
    trainer.handle_exploration_created(created())
    finished = write_manifest(store)
    trainer.publisher.events.clear()

    trainer.handle_iteration_finished(finished)
    assert len(trainer.training_runs) == 1
    assert modelrepo.list_versions(trainer.repository, MODEL) == [1, 2]
    (event,) = trainer.publisher.of(topics.MODELS)
    assert (event.model.version, event.iteration) == (2, 1)
    assert event.train_steps >= 1 and event.final_loss > 0
    (evaluation,) = trainer.publisher.of(topics.EVALUATIONS)
    assert evaluation.model.version == 2 and evaluation.eval_images == 6 and 0.0 <= evaluation.knn_top1 <= 1.0
    assert 0.0 <= evaluation.linear_probe_top1 <= 1.0
    assert float(store.stat_metadata(BUCKET, "checkpoints/exp-1/v2.pt")["linear-probe-top1"]) == pytest.approx(evaluation.linear_probe_top1)
    state = EncoderState.from_bytes(store.get_bytes(BUCKET, "checkpoints/exp-1/v2.pt"), torch.device("cpu"))
    assert state.iteration == 1 and state.global_step == event.train_steps
    replay = store.get_json(BUCKET, f"explorations/{EXPLORATION}/replay.json")
    assert replay["iterations"] == {"1": ["s3://iex/images/c0", "s3://iex/images/c1"]}

    # Redelivery: same events, no training, no new checkpoint.
    store.puts.clear()
    trainer.handle_iteration_finished(finished)
    assert len(trainer.training_runs) == 1 and store.puts == []
    again = trainer.publisher.of(topics.MODELS)[-1]
    assert (again.model.version, again.train_steps, again.final_loss) == (2, event.train_steps, event.final_loss)
    assert trainer.publisher.of(topics.EVALUATIONS)[-1].knn_top1 == evaluation.knn_top1

    # Redelivery after the repository lost the version: re-exported from the checkpoint.
    shutil.rmtree(trainer.repository / MODEL / "2")
    trainer.handle_iteration_finished(finished)
    assert len(trainer.training_runs) == 1
    assert modelrepo.list_versions(trainer.repository, MODEL) == [1, 2]

    # A stale event (older than the newest version) republishes nothing.
    count = len(trainer.publisher.events)
    trainer.handle_exploration_created(created())
    assert len(trainer.publisher.events) == count


def test_the_labelled_split_is_never_trained_on(trainer, store):
    trainer.handle_exploration_created(created())
    finished = write_manifest(store)
    manifest = store.get_json(BUCKET, finished.manifest_key)
    leaked = "s3://targets/flowers/eval/rose/0.png"
    manifest["candidates"].append(leaked)  # e.g. a web copy of an eval image that dedup missed
    manifest["target_train"].append("flowers/eval/tulip/1.png")
    store.put_json(BUCKET, finished.manifest_key, manifest)
    trainer.handle_iteration_finished(finished)
    (run,) = trainer.training_runs
    loader = run[1]
    assert loader.references and not {leaked, "s3://targets/flowers/eval/tulip/1.png"} & set(loader.references)
    assert trainer.m_images_skipped.labels(reason="eval_split")._value.get() == 2


# ---- evaluation: the paper's protocol -----------------------------------------------------------
TRAIN_LABELS = {f"train/{i}.png": ("rose" if i < 3 else "tulip") for i in range(6)}
TEST_KEYS = [f"s3://targets/flowers/eval/{label}/{i}.png" for label in ("rose", "tulip") for i in range(3)]


def write_train_labels(store: FakeStore, labels=None, target: str = "flowers") -> None:
    doc = {"format": 1, "branch": target, "label_by": "folder", "labels": TRAIN_LABELS if labels is None else labels}
    store.put_json("targets", f"{target}/train_labels.json", doc)


def test_evaluation_fits_on_the_labelled_train_split_and_scores_the_test_split(trainer, store):
    write_train_labels(store)
    trainer.handle_exploration_created(created())
    (before,) = trainer.publisher.of(topics.EVALUATIONS)
    assert (before.protocol, before.eval_images, before.train_images, before.classes) == ("train->test", 6, 6, 2)
    # 2 classes with 3 images in each split; 6 test images can show a difference of 3 images (0.5).
    assert before.measurable and before.not_measurable_reason == "" and before.detectable_difference == pytest.approx(0.5)
    assert before.record_key == "evaluations/exp-1/v1.json"
    record = store.get_json(BUCKET, before.record_key)
    assert (record["protocol"], record["version"], record["iteration"], record["classes"]) == ("train->test", 1, 0, ["rose", "tulip"])
    assert record["test"]["keys"] == TEST_KEYS and record["test"]["labels"] == ["rose"] * 3 + ["tulip"] * 3
    train_keys = [f"s3://targets/flowers/train/{i}.png" for i in range(6)]
    assert record["train"]["keys"] == train_keys and record["train"]["by_class"] == {"rose": 3, "tulip": 3}

    # The same numbers, recomputed here from the version's weights with the paper's protocol.
    state = EncoderState.from_bytes(store.get_bytes(BUCKET, "checkpoints/exp-1/v1.pt"), torch.device("cpu"))

    def features(keys):
        pixels = data.fetch_images(store, BUCKET, keys, 32).pixels
        return evaluation.embed(state.backbone, pixels, state.config.mean, state.config.std, torch.device("cpu"))

    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    expected = evaluation.score_splits(features(train_keys), labels, features(TEST_KEYS), labels, k=3)
    assert record["test"]["knn_correct"] == expected.knn_correct.int().tolist()
    assert record["test"]["probe_correct"] == expected.probe_correct.int().tolist()
    assert before.knn_top1 == pytest.approx(expected.knn_top1) and before.linear_probe_top1 == pytest.approx(expected.probe_top1)

    # Every version is scored on the same test images: before/after pair up image by image.
    finished = write_manifest(store)
    trainer.handle_iteration_finished(finished)
    after = trainer.publisher.of(topics.EVALUATIONS)[-1]
    assert (after.protocol, after.train_images, after.record_key) == ("train->test", 6, "evaluations/exp-1/v2.json")
    assert store.get_json(BUCKET, after.record_key)["test"]["keys"] == TEST_KEYS

    # A redelivery republishes the same evaluation from the checkpoint's metadata, evaluating nothing.
    store.puts.clear()
    trainer.handle_iteration_finished(finished)
    again = trainer.publisher.of(topics.EVALUATIONS)[-1]
    fields = ("protocol", "knn_top1", "linear_probe_top1", "eval_images", "train_images", "classes", "measurable", "not_measurable_reason", "detectable_difference", "record_key")
    assert [getattr(again, f) for f in fields] == [getattr(after, f) for f in fields]
    assert store.puts == []


def test_train_labels_are_never_trained_on(trainer, store):
    """Two copies of one target, one with train_labels.json: the same training set, image for image."""
    for key, (blob, _) in list(store.objects.items()):
        if key[0] == "targets" and key[1].startswith("flowers/"):
            store.put_bytes("targets", "plain/" + key[1].removeprefix("flowers/"), blob)
    write_train_labels(store)
    for exploration, target in (("labelled", "flowers"), ("plain", "plain")):
        trainer.handle_exploration_created(created(exploration_id=exploration, target_uri=f"s3://targets/{target}"))
        trainer.handle_iteration_finished(write_manifest(store, exploration=exploration, target=target))
    labelled, plain = (run[1].references for run in trainer.training_runs)
    assert [r.replace("/flowers/", "/plain/") for r in labelled] == list(plain)
    assert not any(r.endswith(".json") or "/eval/" in r for r in labelled)
    protocols = [e.protocol for e in trainer.publisher.of(topics.EVALUATIONS) if e.iteration == 1]
    assert protocols == ["train->test", "eval-split-cv"]


def test_a_split_that_cannot_measure_says_why(trainer, store):
    # Only roses are labelled in train: the tulips of the test split can never be classified right.
    write_train_labels(store, {f"train/{i}.png": "rose" for i in range(6)})
    trainer.handle_exploration_created(created())
    (event,) = trainer.publisher.of(topics.EVALUATIONS)
    assert event.protocol == "train->test" and not event.measurable
    assert event.not_measurable_reason.startswith("fewer than 2 classes")
    record = store.get_json(BUCKET, event.record_key)
    assert record["measurable"] is False and record["not_measurable_reason"] == event.not_measurable_reason
    assert record["test"]["knn_correct"][3:] == [0, 0, 0]  # tulips: no tulip in the memory bank

    # A train_labels.json naming an eval image is refused whole: the within-split fallback, said so.
    write_train_labels(store, {"eval/rose/0.png": "rose", **TRAIN_LABELS}, target="flowers")
    trainer.handle_exploration_created(created(exploration_id="exp-2"))
    assert trainer.publisher.of(topics.EVALUATIONS)[-1].protocol == "eval-split-cv"


def test_eval_max_images_caps_each_split_keeping_every_class(tmp_path, store, monkeypatch):
    trainer = make_trainer(tmp_path, store, monkeypatch, trainer_eval_max_images=4)
    write_train_labels(store)
    trainer.handle_exploration_created(created())
    (event,) = trainer.publisher.of(topics.EVALUATIONS)
    assert (event.eval_images, event.train_images) == (4, 4)
    record = store.get_json(BUCKET, event.record_key)
    assert record["test"]["by_class"] == record["train"]["by_class"] == {"rose": 2, "tulip": 2}


def test_an_interrupted_iteration_resumes_from_its_mid_run_checkpoint(tmp_path, store, monkeypatch):
    trainer = make_trainer(tmp_path, store, monkeypatch, trainer_max_steps=5, trainer_checkpoint_every_steps=2, trainer_early_stop_patience=0)
    # The same exploration twice (same seed, same images): once straight through, once stopped
    # (SIGTERM) during its third step and handled again.
    for exploration in ("straight", "stopped"):
        trainer.handle_exploration_created(created(exploration_id=exploration))
    trainer.handle_iteration_finished(write_manifest(store, exploration="straight"))

    observe = trainer._observe_step

    def stop_after_two(report):
        observe(report)
        if report.step == 2:
            trainer.stopping.set()

    monkeypatch.setattr(trainer, "_observe_step", stop_after_two)
    finished = write_manifest(store, exploration="stopped")
    with pytest.raises(DependencyUnavailable, match="stopping"):
        trainer.handle_iteration_finished(finished)
    # The stop request is honoured after the step in hand (every rank agrees on it there), and
    # that step is checkpointed before the record is handed back.
    running = EncoderState.from_bytes(store.get_bytes(BUCKET, "checkpoints/stopped/v2-running.pt"), torch.device("cpu"))
    assert running.run["step"] == 3 and running.global_step == 3
    assert not store.exists(BUCKET, "checkpoints/stopped/v2.pt")

    trainer.stopping.clear()
    monkeypatch.setattr(trainer, "_observe_step", observe)
    trainer.handle_iteration_finished(finished)
    assert not store.exists(BUCKET, "checkpoints/stopped/v2-running.pt")
    straight = EncoderState.from_bytes(store.get_bytes(BUCKET, "checkpoints/straight/v2.pt"), torch.device("cpu"))
    resumed = EncoderState.from_bytes(store.get_bytes(BUCKET, "checkpoints/stopped/v2.pt"), torch.device("cpu"))
    assert resumed.global_step == straight.global_step == 5
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert trainer.m_resumed._value.get() == 1


def test_exploration_created_from_a_checkpoint_in_s3(trainer, store):
    source = EncoderState.create(ModelConfig(backbone="test_resnet", image_size=32, seed=11, mlp_dim=48, projection_dim=16), torch.device("cpu"))
    store.put_bytes("inits", "other/v4.pt", source.to_bytes())
    trainer.handle_exploration_created(created(init="s3://inits/other/v4.pt"))
    state = EncoderState.from_bytes(store.get_bytes(BUCKET, "checkpoints/exp-1/v1.pt"), torch.device("cpu"))
    assert (state.config.init, state.config.mlp_dim, state.config.projection_dim) == ("s3://inits/other/v4.pt", 48, 16)
    assert all(torch.equal(a, b) for a, b in zip(state.model.state_dict().values(), source.model.state_dict().values()))

    store.puts.clear()
    trainer.publisher.events.clear()
    for init, reason in (("s3://inits/absent.pt", "init_missing"), ("s3://iex/images/c0", "init_unreadable")):
        with pytest.raises(PermanentError) as error:
            trainer.handle_exploration_created(created(exploration_id="exp-2", init=init))
        assert error.value.reason == reason
    with pytest.raises(PermanentError) as error:
        trainer.handle_exploration_created(created(exploration_id="exp-2", init="s3://inits/other/v4.pt", backbone="resnet18"))
    assert error.value.reason == "init_mismatch"
    assert store.puts == [] and trainer.publisher.events == []


def test_exploration_created_from_the_shipped_efficientnet_lite0(trainer, store):
    trainer.handle_exploration_created(created(init="efficientnet-lite0"))
    (event,) = trainer.publisher.of(topics.MODELS)
    assert event.embedding_dim == 1280
    state = EncoderState.from_bytes(store.get_bytes(BUCKET, "checkpoints/exp-1/v1.pt"), torch.device("cpu"))
    assert state.config.backbone == "tf_efficientnet_lite0"
    shipped = pretrained.lite0_state_dict()
    assert torch.equal(state.backbone.state_dict()["conv_stem.weight"], shipped["conv_stem.weight"])
    signature = modelrepo.read_onnx_signature(trainer.repository / MODEL / "1" / "model.onnx")
    assert signature.embedding_dim == 1280


def test_iteration_problems(trainer, store):
    finished = write_manifest(store)
    with pytest.raises(PermanentError) as no_checkpoint:
        trainer.handle_iteration_finished(finished)
    assert no_checkpoint.value.reason == "no_checkpoint"
    with pytest.raises(PermanentError) as missing:
        trainer.handle_iteration_finished(events_pb2.IterationFinished(exploration_id=EXPLORATION, iteration=1, manifest_key="nope.json"))
    assert missing.value.reason == "manifest_missing"
    with pytest.raises(PermanentError):
        trainer.handle_iteration_finished(events_pb2.IterationFinished(exploration_id=EXPLORATION, iteration=0, manifest_key=finished.manifest_key))
    store.up = False
    with pytest.raises(DependencyUnavailable):
        trainer.handle_iteration_finished(finished)


def test_trainer_status(trainer, store):
    servicer = TrainerStatusServicer(trainer)
    context = FakeContext()
    with pytest.raises(AbortCalled):
        servicer.GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest(exploration_id="unknown"), context)
    assert context.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(AbortCalled):
        servicer.GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest(exploration_id="bad/id"), context)
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT

    trainer.handle_exploration_created(created())
    status = servicer.GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest(exploration_id=EXPLORATION), context)
    assert (status.latest_model.name, status.latest_model.version, status.device, status.busy) == (MODEL, 1, "cpu", False)
    overall = servicer.GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest(), context)
    assert overall.latest_model.version == 1

    # A restarted trainer answers from the checkpoints in S3.
    fresh = TrainerService(trainer.settings)
    fresh.store = store
    status = TrainerStatusServicer(fresh).GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest(exploration_id=EXPLORATION), context)
    assert status.latest_model.version == 1


def test_settings_require_a_model_repository_and_known_backbone():
    with pytest.raises(SettingsError, match="IEX_MODEL_REPOSITORY"):
        load_service_settings(TrainerSettings, "trainer", environ={})
    with pytest.raises(SettingsError, match="IEX_TRAINER_BACKBONE"):
        load_service_settings(TrainerSettings, "trainer", environ={"IEX_MODEL_REPOSITORY": "/tmp/x", "IEX_TRAINER_BACKBONE": "nope"})
    with pytest.raises(SettingsError, match="IEX_TRAINER_INIT"):
        load_service_settings(TrainerSettings, "trainer", environ={"IEX_MODEL_REPOSITORY": "/tmp/x", "IEX_TRAINER_INIT": "imagenet"})
    assert model_name_for("a-b-c") == "enc_a_b_c"
