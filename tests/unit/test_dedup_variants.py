"""What the web does to a picture (re-encode, resize, crop, recolour, watermark) is caught as a
near-duplicate at the default threshold; distinct pictures of the same concept are not; a copy of a
target evaluation image is refused.

Pictures come from services.dedup.synthetic (photo-like scenes in families of look-alikes); bench/dedup
measures the same on 10,000 images against imagededup.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from iex.v1 import common_pb2
from services.common import topics
from services.dedup import synthetic
from services.dedup.settings import DedupSettings
from services.dedup.store import DedupPolicy
from test_dedup import BUCKET, TARGET_URI, FakeObjectStore, fetched_event, make_deduplicator, make_service, put_target

UNIQUE = common_pb2.DECISION_KIND_UNIQUE
NEAR_DUPLICATE = common_pb2.DECISION_KIND_NEAR_DUPLICATE
CONTAMINATES_TARGET = common_pb2.DECISION_KIND_CONTAMINATES_TARGET

DEFAULT_MAX_DISTANCE = DedupSettings.__dataclass_fields__["near_duplicate_max_distance"].default
PICTURES = 8


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def picture(index: int, member: int = 0) -> Image.Image:
    return synthetic.draw_scene(synthetic.new_family(7000 + index), member)


@pytest.fixture
def store() -> FakeObjectStore:
    return FakeObjectStore()


@pytest.fixture
def dedup(store):
    deduplicator, directory = make_deduplicator(store, near_max_distance=DEFAULT_MAX_DISTANCE)
    directory.remember("exp-1", TARGET_URI)
    return deduplicator


@pytest.mark.parametrize("kind", synthetic.VARIANT_KINDS)
def test_every_kind_of_variant_is_a_near_duplicate_of_the_stored_original(store, dedup, kind):
    rng = np.random.default_rng(11)
    originals = []
    for i in range(PICTURES):
        image = picture(i)
        outcome = dedup.decide_and_store(fetched_event(store, jpeg(image), query=f"q-o{i}", url=f"https://a.example/{i}.jpg"))
        assert outcome.decision.kind == UNIQUE
        originals.append((image, outcome.decision))
    objects = store.keys("images/")
    assert len(objects) == PICTURES

    for i, (image, original) in enumerate(originals):
        variant = synthetic.make_variant(image, kind, rng)
        data = jpeg(variant, quality=60 if kind == "q60" else 88)
        outcome = dedup.decide_and_store(fetched_event(store, data, query=f"q-v{i}", url=f"https://b.example/{kind}/{i}.jpg"))
        decision = outcome.decision
        assert decision.kind == NEAR_DUPLICATE, f"{kind} variant {i}: {decision}"
        assert decision.duplicate_of == original.pixel_sha256 != decision.pixel_sha256
        assert decision.object_key == original.object_key
        assert decision.hamming_distance <= DEFAULT_MAX_DISTANCE
        assert decision.reason == "near_hash" and outcome.stored is None and outcome.bytes_written == 0
        # Its query and URL are credited to the stored original.
        provenance = [store.get_json(BUCKET, k) for k in store.keys(f"provenance/{original.pixel_sha256}/")]
        credited = [p for p in provenance if p["query_id"] == f"q-v{i}"]
        assert len(credited) == 1 and credited[0]["kind"] == "DECISION_KIND_NEAR_DUPLICATE"
        assert credited[0]["fetched_pixel_sha256"] == decision.pixel_sha256
    assert store.keys("images/") == objects  # nothing new stored


def test_distinct_pictures_of_the_same_concept_are_all_stored(store, dedup):
    # Families share palette, lighting and background: the look-alikes a near-duplicate test must not merge.
    kinds = []
    for family in range(4):
        for member in range(4):
            data = jpeg(picture(family, member))
            kinds.append(dedup.decide_and_store(fetched_event(store, data, query=f"q-{family}-{member}")).decision.kind)
    assert kinds == [UNIQUE] * 16
    assert len(store.keys("images/")) == 16


def test_a_threshold_of_minus_one_keeps_only_exact_duplicates(store):
    deduplicator, directory = make_deduplicator(store, near_max_distance=-1)
    directory.remember("exp-1", "")
    image = picture(1)
    deduplicator.decide_and_store(fetched_event(store, jpeg(image), query="q-1"))
    again = deduplicator.decide_and_store(fetched_event(store, jpeg(image, quality=60), query="q-2"))
    assert again.decision.kind == UNIQUE and len(store.keys("images/")) == 2


@pytest.mark.parametrize("kind", ["q60", "crop5", "watermark"])
def test_a_target_test_image_arriving_from_the_web_is_refused(store, dedup, kind):
    eval_image = picture(30)
    put_target(store, {"eval/birds/0001.jpg": jpeg(eval_image, quality=95), "eval/birds/0002.jpg": jpeg(picture(31), quality=95)})
    web_copy = jpeg(synthetic.make_variant(eval_image, kind, np.random.default_rng(5)), quality=60 if kind == "q60" else 85)
    outcome = dedup.decide_and_store(fetched_event(store, web_copy, query="q-web"))
    decision = outcome.decision
    assert decision.kind == CONTAMINATES_TARGET
    assert decision.contaminated_target_id == f"{TARGET_URI}/eval/birds/0001.jpg"
    assert 0 < decision.hamming_distance <= DedupPolicy().contamination_max_distance
    assert outcome.stored is None and store.keys("images/") == [] and store.keys("provenance/") == []
    # Another picture of the same scene family is not evaluation data.
    other = dedup.decide_and_store(fetched_event(store, jpeg(picture(30, member=2)), query="q-other"))
    assert other.decision.kind == UNIQUE


def test_flat_pictures_are_compared_by_identity_only(store, dedup):
    grey = Image.new("RGB", (200, 150), (120, 120, 120))
    darker = Image.new("RGB", (200, 150), (60, 60, 60))
    kinds = [dedup.decide_and_store(fetched_event(store, jpeg(i), query=f"q-{n}")).decision.kind for n, i in enumerate((grey, darker))]
    assert kinds == [UNIQUE, UNIQUE]
    assert len(dedup.near) == 0  # never entered the index: their hash bits are noise


def test_the_service_publishes_near_duplicates_without_storing_them(store):
    service = make_service(store, near_duplicate_max_distance=DEFAULT_MAX_DISTANCE)
    service.directory.remember("exp-1", "")
    image = picture(40)
    first = service.handle_image_fetched(fetched_event(store, jpeg(image), query="q-1"), None)
    near = service.handle_image_fetched(fetched_event(store, jpeg(image.resize((image.width // 2, image.height // 2))), query="q-2"), None)
    decisions = service.publisher.on(topics.DECISIONS)
    assert [d.kind for d, _ in decisions] == [UNIQUE, NEAR_DUPLICATE]
    assert decisions[1][0].duplicate_of == first.decision.pixel_sha256 == near.decision.duplicate_of
    assert len(service.publisher.on(topics.IMAGES_STORED)) == 1
    _, counts = service.stats.totals()
    assert counts == {"DECISION_KIND_UNIQUE": 1, "DECISION_KIND_NEAR_DUPLICATE": 1}
    # Between batches the entry goes into a segment for the other replicas.
    service.near.flush(force=True)
    assert len(store.keys("dedup/near-index/v2/segments/")) == 1
    assert store.keys("dedup/near-index/v2/wal/") == []


def test_synthetic_sets_are_reproducible(tmp_path):
    items = synthetic.generate(tmp_path / "a", originals=6, variants=5, seed=3)
    again = synthetic.generate(tmp_path / "b", originals=6, variants=5, seed=3)
    assert [i.name for i in items] == [i.name for i in again]
    assert sorted(i.kind for i in items if i.kind) == sorted(synthetic.VARIANT_KINDS)
    for item in items:
        assert (tmp_path / "a" / item.name).read_bytes() == (tmp_path / "b" / item.name).read_bytes()
    assert {v for _, v, _ in synthetic.duplicate_pairs(items)} == {i.name for i in items if i.original}
