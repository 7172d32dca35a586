"""The trainer on real servers: an exploration initialised from a MoCo-v3 checkpoint in S3.

An ExplorationCreated naming `s3://iex/inits/...` goes through the real broker; the running trainer
service reads the checkpoint from the real S3, loads it strictly, evaluates the initial encoder on
the target's labelled split (k-NN and linear probe), writes version 1 and publishes ModelPublished
and EvaluationFinished. A checkpoint for another architecture is dead-lettered as init_mismatch,
with nothing written.
"""

from __future__ import annotations

import io
import time
import uuid

import numpy as np
import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer
from PIL import Image

from iex.v1 import events_pb2
from services.common import topics
from services.common.objectstore import ObjectStore
from services.trainer.encoder import EncoderState, ModelConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUCKET = "iex"


@pytest.fixture(scope="module")
def store(stack_env) -> ObjectStore:
    s = ObjectStore(stack_env["IEX_S3_ENDPOINT"], stack_env["IEX_S3_ACCESS_KEY"], stack_env["IEX_S3_SECRET_KEY"])
    s.ensure_bucket(BUCKET)
    return s


def png(colour: tuple[int, int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, size=(40, 40, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def moco_v3_checkpoint(model, arch: str) -> bytes:
    """The layout facebookresearch/moco-v3 saves (DDP module, projector in the classifier slot)."""
    state = {f"module.base_encoder.{k}": v for k, v in model.backbone.state_dict().items()}
    state.update({f"module.base_encoder.fc.{k}": v for k, v in model.projector.state_dict().items()})
    state.update({f"module.momentum_encoder.{k}": v for k, v in model.momentum_backbone.state_dict().items()})
    state.update({f"module.momentum_encoder.fc.{k}": v for k, v in model.momentum_projector.state_dict().items()})
    state.update({f"module.predictor.{k}": v for k, v in model.predictor.state_dict().items()})
    buffer = io.BytesIO()
    torch.save({"epoch": 100, "arch": arch, "state_dict": state}, buffer)
    return buffer.getvalue()


def publish(bootstrap: str, event: events_pb2.ExplorationCreated) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap.split(","))
    try:
        producer.send(topics.EXPLORATIONS.name, key=event.exploration_id.encode(), value=event.SerializeToString())
        producer.flush(timeout=30)
    finally:
        producer.close()


def wait_for(bootstrap: str, topic_name: str, decode, match, timeout_s: float = 240.0):
    consumer = KafkaConsumer(
        topic_name,
        bootstrap_servers=bootstrap.split(","),
        group_id=f"test-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
    )
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=1000).values():
                for record in records:
                    message = decode(record.value)
                    if match(message):
                        return message
    finally:
        consumer.close()
    raise AssertionError(f"nothing matching on {topic_name} within {timeout_s:.0f} s")


def test_an_exploration_starts_from_a_moco_v3_checkpoint_in_s3(stack_env, store):
    bootstrap = stack_env["IEX_KAFKA_BOOTSTRAP"]
    suffix = uuid.uuid4().hex[:8]
    target = f"targets/trainer-init-{suffix}"
    for i in range(4):
        store.put_bytes(BUCKET, f"{target}/train/{i}.png", png((200, 40, 40), i))
    for label, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        for i in range(3):
            store.put_bytes(BUCKET, f"{target}/eval/{label}/{i}.png", png(colour, 100 + i))
    source = EncoderState.create(ModelConfig(backbone="test_resnet", image_size=32, seed=5, mlp_dim=48, projection_dim=24), torch.device("cpu")).model
    store.put_bytes(BUCKET, f"inits/{suffix}/moco.pth.tar", moco_v3_checkpoint(source, "test_resnet"))

    good = f"trainer-init-{suffix}"
    publish(bootstrap, events_pb2.ExplorationCreated(exploration_id=good, target_uri=f"s3://{BUCKET}/{target}", init=f"s3://{BUCKET}/inits/{suffix}/moco.pth.tar", image_size=32, seed=3))
    published = wait_for(bootstrap, topics.MODELS.name, events_pb2.ModelPublished.FromString, lambda m: m.exploration_id == good)
    assert published.model.version == 1 and published.iteration == 0 and published.image_size == 32
    state = EncoderState.from_bytes(store.get_bytes(BUCKET, published.checkpoint_key), torch.device("cpu"))
    assert (state.config.backbone, state.config.mlp_dim, state.config.projection_dim) == ("test_resnet", 48, 24)
    for part in ("backbone", "projector", "predictor"):
        for a, b in zip(getattr(state.model, part).state_dict().values(), getattr(source, part).state_dict().values()):
            assert torch.equal(a, b), part
    evaluation = wait_for(bootstrap, topics.EVALUATIONS.name, events_pb2.EvaluationFinished.FromString, lambda m: m.exploration_id == good)
    assert evaluation.eval_images == 6 and 0.0 <= evaluation.knn_top1 <= 1.0 and 0.0 <= evaluation.linear_probe_top1 <= 1.0

    bad = f"trainer-bad-init-{suffix}"
    publish(bootstrap, events_pb2.ExplorationCreated(exploration_id=bad, target_uri=f"s3://{BUCKET}/{target}", init=f"s3://{BUCKET}/inits/{suffix}/moco.pth.tar", backbone="resnet18", image_size=32, seed=3))
    letter = wait_for(
        bootstrap,
        topics.EXPLORATIONS.name + ".dlq",
        events_pb2.DeadLetter.FromString,
        lambda m: m.consumer_group == "iex-trainer" and events_pb2.ExplorationCreated.FromString(m.value).exploration_id == bad,
    )
    assert letter.reason.startswith("init_mismatch")
    assert not list(store.list_keys(BUCKET, f"checkpoints/{bad}/"))
