"""The trainer's data: manifest parsing, replay buffer, training-set plan, decoding and fetching."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from services.common.errors import PermanentError
from services.trainer import data

BUCKET = "iex"


class MemoryStore:
    """The ObjectStore methods the trainer's data module uses, over a dict."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}
        self.writes = 0

    def put_bytes(self, bucket, key, value, content_type="application/octet-stream", metadata=None):
        self.objects[(bucket, key)] = bytes(value)
        self.writes += 1

    def get_or_none(self, bucket, key):
        return self.objects.get((bucket, key))

    def put_json(self, bucket, key, value):
        self.put_bytes(bucket, key, json.dumps(value, sort_keys=True).encode())

    def get_json(self, bucket, key):
        raw = self.get_or_none(bucket, key)
        return None if raw is None else json.loads(raw)

    def list_keys(self, bucket, prefix, recursive=True):
        return iter(sorted(k for b, k in self.objects if b == bucket and k.startswith(prefix)))


def png(colour, size=(20, 12), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def manifest_doc(**changes):
    doc = {
        "exploration_id": "exp-1",
        "iteration": 2,
        "images_bucket": "web",
        "candidates": ["images/aa/bb/c1", "images/aa/bb/c2"],
        "replay": ["images/aa/bb/c1"],
        "target_bucket": "targets",
        "target_train": ["flowers/train/1.png", "s3://other/x.png"],
        "target_eval": [{"key": "flowers/eval/rose/1.png", "label": "rose"}],
        "concept_rewards": [],
    }
    doc.update(changes)
    return doc


def test_manifest_references_are_qualified_with_their_group_bucket():
    manifest = data.IterationManifest.parse(manifest_doc(), BUCKET)
    assert manifest.candidates == ("s3://web/images/aa/bb/c1", "s3://web/images/aa/bb/c2")
    assert manifest.replay == ("s3://web/images/aa/bb/c1",)
    assert manifest.target_train == ("s3://targets/flowers/train/1.png", "s3://other/x.png")
    assert manifest.target_eval == (data.LabelledImage("s3://targets/flowers/eval/rose/1.png", "rose"),)
    plain = data.IterationManifest.parse(manifest_doc(images_bucket=None, target_bucket=None, target_eval=None), BUCKET)
    assert plain.candidates[0] == "s3://iex/images/aa/bb/c1" and plain.target_eval == ()
    # The target (where its train labels live): named by the planner, else the one prefix of its train images.
    assert manifest.target_uri == ""  # two prefixes: unknown
    assert data.IterationManifest.parse(manifest_doc(target_uri="s3://targets/flowers/"), BUCKET).target_uri == "s3://targets/flowers"
    assert data.IterationManifest.parse(manifest_doc(target_train=["flowers/train/1.png", "flowers/train/2.png"]), BUCKET).target_uri == "s3://targets/flowers"


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"candidates": "images/x"}, "candidates"),
        ({"target_train": [""]}, "target_train"),
        ({"iteration": -1}, "iteration"),
        ({"exploration_id": "bad id"}, "exploration_id"),
        ({"target_eval": [{"key": "k"}]}, "target_eval"),
        ({"candidates": ["/abs"]}, "candidates"),
        ({"target_uri": "/local/target"}, "target_uri"),
    ],
)
def test_bad_manifests_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        data.IterationManifest.parse(manifest_doc(**changes), BUCKET)


def test_read_manifest_turns_problems_into_permanent_errors():
    store = MemoryStore()
    with pytest.raises(PermanentError) as missing:
        data.read_manifest(store, BUCKET, "explorations/exp-1/iterations/2/manifest.json")
    assert missing.value.reason == "manifest_missing"
    store.put_json(BUCKET, "m.json", {"exploration_id": "exp-1"})
    with pytest.raises(PermanentError) as invalid:
        data.read_manifest(store, BUCKET, "m.json")
    assert invalid.value.reason == "manifest_invalid"


def test_replay_buffer_pool_depends_only_on_earlier_iterations():
    store = MemoryStore()
    buffer = data.ReplayBuffer.load(store, BUCKET, "exp-1")
    buffer.record(store, BUCKET, 1, ["a", "b"])
    buffer.record(store, BUCKET, 2, ["c"])
    writes = store.writes
    buffer.record(store, BUCKET, 2, ["c"])  # redelivery: nothing changes
    assert store.writes == writes
    again = data.ReplayBuffer.load(store, BUCKET, "exp-1")
    assert again.pool_before(1) == []
    assert again.pool_before(2) == ["a", "b"]
    assert again.pool_before(3) == ["a", "b", "c"]
    stored = store.get_json(BUCKET, data.replay_key("exp-1"))
    assert stored["iterations"] == {"1": ["a", "b"], "2": ["c"]} and stored["size"] == 3


def test_training_set_is_candidates_plus_twice_as_many_from_the_pool():
    candidates = [f"c{i}" for i in range(10)]
    pool = [f"p{i}" for i in range(50)]
    plan = data.plan_training_set(candidates, pool, 2.0, random.Random(1))
    assert plan[:10] == candidates and len(plan) == 30
    assert set(plan[10:]) <= set(pool) and len(set(plan[10:])) == 20  # without replacement
    assert plan == data.plan_training_set(candidates, pool, 2.0, random.Random(1))
    small = data.plan_training_set(candidates, pool[:5], 2.0, random.Random(1))
    assert len(small) == 30 and set(pool[:5]) <= set(small)  # small pools are repeated
    capped = data.plan_training_set(candidates, pool, 2.0, random.Random(1), limit=12)
    assert len(capped) == 12 and sum(k.startswith("c") for k in capped) == 4
    assert sorted(data.plan_training_set([], pool[:3], 2.0, random.Random(1))) == pool[:3]
    assert data.plan_training_set(candidates, [], 2.0, random.Random(1)) == candidates


def test_decode_square_centre_crops_and_composites_transparency_on_white():
    pixels = data.decode_square(png((255, 0, 0, 0), size=(40, 20), mode="RGBA"), 16)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    assert (pixels == 255).all()  # fully transparent -> white
    wide = Image.new("RGB", (60, 20), (0, 0, 255))
    wide.paste((0, 255, 0), (0, 0, 20, 20))  # the left third is cropped away
    buffer = io.BytesIO()
    wide.save(buffer, format="PNG")
    centre = data.decode_square(buffer.getvalue(), 10)
    assert tuple(centre[5, 5]) == (0, 0, 255)
    with pytest.raises(Exception):
        data.decode_square(b"not an image", 10)


def test_fetch_skips_missing_and_broken_images_and_keeps_repeats():
    store = MemoryStore()
    store.put_bytes(BUCKET, "a.png", png((10, 20, 30)))
    store.put_bytes("other", "b.png", png((200, 100, 0)))
    store.put_bytes(BUCKET, "broken.png", b"\x89PNG broken")
    batch = data.fetch_images(store, BUCKET, ["a.png", "s3://other/b.png", "missing.png", "broken.png", "a.png"], 8, workers=2)
    assert batch.references == ["a.png", "s3://other/b.png", "a.png"]
    assert batch.pixels.shape == (3, 3, 8, 8)
    assert batch.pixels[0, :, 0, 0].tolist() == [10, 20, 30]
    assert batch.skipped == {"missing": 1, "undecodable": 1}


def test_fetch_treats_a_key_s3_refuses_as_a_bad_reference_not_an_outage():
    """A reference S3 refuses outright (InvalidObjectRequest: a `..` segment, an over-long name) is
    skipped and counted; raising it would fail the whole training set for one hostile manifest line."""
    from services.common.objectstore import InvalidObjectRequest

    class Refusing(MemoryStore):
        def get_or_none(self, bucket, key):
            if ".." in key:
                raise InvalidObjectRequest(f"{bucket}/{key}: InvalidRequest")
            return super().get_or_none(bucket, key)

    store = Refusing()
    store.put_bytes(BUCKET, "a.png", png((10, 20, 30)))
    batch = data.fetch_images(store, BUCKET, ["a.png", "images/../../etc/passwd"], 8, workers=2)
    assert batch.references == ["a.png"]
    assert batch.skipped == {"bad_reference": 1}


def test_target_eval_listing_reads_labels_from_folders():
    store = MemoryStore()
    for key in ["t/eval/rose/1.png", "t/eval/rose/2.png", "t/eval/tulip/1.png", "t/eval/loose.png", "t/train/1.png"]:
        store.put_bytes("targets", key, b"x")
    found = data.list_target_eval(store, "s3://targets/t", limit=10)
    assert found == [
        data.LabelledImage("s3://targets/t/eval/rose/1.png", "rose"),
        data.LabelledImage("s3://targets/t/eval/rose/2.png", "rose"),
        data.LabelledImage("s3://targets/t/eval/tulip/1.png", "tulip"),
    ]
    assert len(data.list_target_eval(store, "s3://targets/t", limit=2)) == 2


def test_train_labels_are_read_for_evaluation_and_only_name_train_images():
    store = MemoryStore()
    assert data.read_train_labels(store, "s3://targets/t") is None  # no file: the target has no train labels
    labels = {f"train/{c}{i}.png": c for c in ("rose", "tulip") for i in range(4)}
    store.put_json("targets", "t/train_labels.json", {"format": 1, "label_by": "folder", "labels": labels})
    found = data.read_train_labels(store, "s3://targets/t")
    assert [(i.key, i.label) for i in found] == sorted((f"s3://targets/t/{k}", v) for k, v in labels.items())
    # A cap keeps every class's share (the listing is sorted by label before it is thinned).
    assert sorted(i.label for i in data.read_train_labels(store, "s3://targets/t", limit=4)) == ["rose", "rose", "tulip", "tulip"]
    for bad in ({"labels": {"eval/rose/1.png": "rose"}}, {"labels": {"train/../eval/x.png": "rose"}}, {"labels": {"train/x.png": ""}}, {"labels": ["train/x.png"]}, [1]):
        store.put_json("targets", "t/train_labels.json", bad)
        with pytest.raises(ValueError, match="train_labels.json"):
            data.read_train_labels(store, "s3://targets/t")
    store.put_bytes("targets", "t/train_labels.json", b"{not json")
    with pytest.raises(ValueError, match="not JSON"):
        data.read_train_labels(store, "s3://targets/t")
