"""The near-duplicate index shared by replicas through S3: visibility between replicas, the race
window, restarts, crashes at every step of storing an image, orphaned intents, merges and rebuilds.

Replicas here are Deduplicators over one in-memory object store with a hand-driven clock; a crash is
a put that raises at a chosen key, after which the replica is thrown away and a new one started.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from iex.v1 import common_pb2
from services.dedup import reindex, segments, synthetic
from services.dedup.explorations import ExplorationDirectory
from services.dedup.hashing import DEFAULT_MAX_PIXELS
from services.dedup.sharedindex import IndexTimings, SharedNearIndex
from services.dedup.store import Deduplicator, DedupPolicy, image_key
from services.dedup.targets import TargetGuard
from test_dedup import BUCKET, Crash, FakeObjectStore, fetched_event

UNIQUE = common_pb2.DECISION_KIND_UNIQUE
EXACT_DUPLICATE = common_pb2.DECISION_KIND_EXACT_DUPLICATE
NEAR_DUPLICATE = common_pb2.DECISION_KIND_NEAR_DUPLICATE
TIMINGS = IndexTimings(refresh_s=5, flush_s=2, wal_grace_s=20, orphan_after_s=120, max_segments=8)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Replica:
    def __init__(self, store: FakeObjectStore, clock: Clock, name: str, timings: IndexTimings = TIMINGS) -> None:
        self.near = SharedNearIndex(store, BUCKET, name, max_distance=20, timings=timings, clock=clock)
        directory = ExplorationDirectory(store, BUCKET)
        directory.remember("exp-1", "")
        guard = TargetGuard(store, BUCKET, directory.target_uri, max_pixels=DEFAULT_MAX_PIXELS)
        self.dedup = Deduplicator(store, BUCKET, guard, DedupPolicy(), near=self.near)
        self.initialised = self.near.load()

    def decide(self, event):
        return self.dedup.decide_and_store(event)

    def between_batches(self) -> None:
        """What the service does after each batch."""
        self.near.flush()
        if self.near.refresh():
            orphans = self.near.orphans()
            if orphans:
                self.near.adopt(orphans, self.dedup.complete_intent)
            self.near.compact()


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def picture(index: int) -> Image.Image:
    return synthetic.draw_scene(synthetic.new_family(9100 + index), 0)


def half(image: Image.Image) -> Image.Image:
    return image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)


@pytest.fixture
def store() -> FakeObjectStore:
    return FakeObjectStore()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def objects(store: FakeObjectStore) -> list[str]:
    return store.keys("images/")


def fresh_entries(store: FakeObjectStore, clock: Clock) -> set[str]:
    """What a replica starting now finds in the shared index."""
    near = SharedNearIndex(store, BUCKET, "observer", max_distance=20, timings=TIMINGS, clock=clock)
    near.load()
    shas, _, _ = near.index.entries()
    return {row.tobytes().hex() for row in shas}


def test_a_replica_sees_what_another_stored_after_its_flush_and_refresh(store, clock):
    a, b = Replica(store, clock, "a"), Replica(store, clock, "b")
    image = picture(1)
    stored = a.decide(fetched_event(store, jpeg(image), query="q-a"))
    assert stored.decision.kind == UNIQUE
    clock.now += 2
    a.between_batches()  # flushed: one segment, no intent left
    assert len(store.keys(segments.segments_prefix())) == 1 and store.keys(segments.wal_prefix()) == []
    clock.now += 5
    b.between_batches()  # refreshed
    near = b.decide(fetched_event(store, jpeg(half(image)), query="q-b"))
    assert near.decision.kind == NEAR_DUPLICATE
    assert near.decision.duplicate_of == stored.decision.pixel_sha256
    assert objects(store) == [stored.decision.object_key]


def test_the_race_window_stores_both_and_is_counted_when_seen(store, clock):
    a, b = Replica(store, clock, "a"), Replica(store, clock, "b")
    image = picture(2)
    first = a.decide(fetched_event(store, jpeg(image), query="q-a"))
    # B decides the resized copy before A flushed: it cannot know.
    second = b.decide(fetched_event(store, jpeg(half(image)), query="q-b"))
    assert (first.decision.kind, second.decision.kind) == (UNIQUE, UNIQUE)
    clock.now += 5
    a.between_batches()
    b.between_batches()
    assert b.near.late_matches == 1  # the pair is seen and counted
    # From now on the pictures are known everywhere.
    third = b.decide(fetched_event(store, jpeg(image, quality=60), query="q-c"))
    assert third.decision.kind == NEAR_DUPLICATE


def test_a_flush_deletes_its_intents_in_one_request(store, clock):
    a = Replica(store, clock, "a")
    for seed in range(5):
        assert a.decide(fetched_event(store, jpeg(picture(40 + seed)), query=f"q-{seed}")).decision.kind == UNIQUE
    assert len(store.keys(segments.wal_prefix())) == 5
    clock.now += 2
    a.between_batches()
    assert store.keys(segments.wal_prefix()) == [] and store.deletes == [5]


def test_restart_loads_the_whole_index(store, clock):
    a = Replica(store, clock, "a")
    stored = [a.decide(fetched_event(store, jpeg(picture(i)), query=f"q-{i}")).decision for i in range(5)]
    clock.now += 2
    a.between_batches()
    restarted = Replica(store, clock, "a-after-restart")
    assert len(restarted.near) == 5
    near = restarted.decide(fetched_event(store, jpeg(picture(3), quality=60), query="q-again"))
    assert near.decision.kind == NEAR_DUPLICATE and near.decision.duplicate_of == stored[3].pixel_sha256


def test_crash_between_intent_and_object_loses_nothing_and_stores_once(store, clock):
    image = picture(4)
    original = fetched_event(store, jpeg(image), query="q-original")
    a = Replica(store, clock, "a")
    store.crash_on_put = "images/*"
    with pytest.raises(Crash):
        a.decide(original)
    store.crash_on_put = None
    assert objects(store) == [] and len(store.keys(segments.wal_prefix())) == 1

    # After the restart a variant happens to come before the original's redelivery.
    restarted = Replica(store, clock, "a2")
    variant = restarted.decide(fetched_event(store, jpeg(half(image)), query="q-variant"))
    assert variant.decision.kind == NEAR_DUPLICATE
    # The object it points at was written for it, as the original's first finder would have.
    assert objects(store) == [variant.decision.object_key]
    metadata = store.stat_metadata(BUCKET, variant.decision.object_key)
    assert metadata["query-id"] == "q-original"

    redo = restarted.decide(original)
    assert redo.decision.kind == UNIQUE and redo.stored is not None
    assert redo.decision.pixel_sha256 == variant.decision.duplicate_of
    assert objects(store) == [redo.decision.object_key]
    clock.now += 2
    restarted.between_batches()
    assert fresh_entries(store, clock) == {redo.decision.pixel_sha256}


def test_an_intent_of_carried_bytes_completes_the_object_with_nothing_staged(store, clock):
    image = picture(9)
    staged = fetched_event(store, jpeg(image), query="q-original")
    original = type(staged)()
    original.CopyFrom(staged)
    original.data = store.get_bytes(BUCKET, staged.staging_key)
    original.staging_key = ""
    store.delete(BUCKET, staged.staging_key)  # the crawler never staged it
    a = Replica(store, clock, "a")
    store.crash_on_put = "images/*"
    with pytest.raises(Crash):
        a.decide(original)
    store.crash_on_put = None
    # The intent is the only copy of the bytes besides the (uncommitted) event.
    [wal] = store.keys(segments.wal_prefix())
    assert segments.Intent.from_json(store.get_json(BUCKET, wal)).data == original.data

    restarted = Replica(store, clock, "a2")
    variant = restarted.decide(fetched_event(store, jpeg(half(image)), query="q-variant"))
    assert variant.decision.kind == NEAR_DUPLICATE
    assert objects(store) == [variant.decision.object_key]
    assert store.stat_metadata(BUCKET, variant.decision.object_key)["query-id"] == "q-original"
    redo = restarted.decide(original)
    assert redo.decision.kind == UNIQUE and objects(store) == [redo.decision.object_key]


def test_exact_copy_meeting_an_unfinished_intent_is_an_exact_duplicate(store, clock):
    image = picture(5)
    a = Replica(store, clock, "a")
    store.crash_on_put = "images/*"
    with pytest.raises(Crash):
        a.decide(fetched_event(store, jpeg(image), query="q-first"))
    store.crash_on_put = None
    restarted = Replica(store, clock, "a2")
    png = io.BytesIO()
    Image.open(io.BytesIO(jpeg(image))).save(png, format="PNG")  # same pixels, other bytes
    copy = restarted.decide(fetched_event(store, png.getvalue(), query="q-copy"))
    assert copy.decision.kind == EXACT_DUPLICATE
    assert store.stat_metadata(BUCKET, copy.decision.object_key)["query-id"] == "q-first"


def test_crash_between_object_and_record_redoes_the_same_decision(store, clock):
    image = picture(6)
    original = fetched_event(store, jpeg(image), query="q-original")
    a = Replica(store, clock, "a")
    store.crash_on_put = "decisions/*"
    with pytest.raises(Crash):
        a.decide(original)
    store.crash_on_put = None
    restarted = Replica(store, clock, "a2")
    redo = restarted.decide(original)
    assert redo.decision.kind == UNIQUE
    variant = restarted.decide(fetched_event(store, jpeg(image, quality=60), query="q-variant"))
    assert variant.decision.kind == NEAR_DUPLICATE and variant.decision.duplicate_of == redo.decision.pixel_sha256
    assert len(objects(store)) == 1
    # Redelivered again: answered from the record, nothing written.
    puts = len(store.puts)
    assert restarted.decide(original).replayed and len(store.puts) == puts


def test_an_intent_whose_bytes_are_gone_is_dropped(store, clock):
    image = picture(7)
    original = fetched_event(store, jpeg(image), query="q-original")
    a = Replica(store, clock, "a")
    store.crash_on_put = "images/*"
    with pytest.raises(Crash):
        a.decide(original)
    store.crash_on_put = None
    store.delete(BUCKET, original.staging_key)  # staging expired before anyone redid it
    restarted = Replica(store, clock, "a2")
    variant = restarted.decide(fetched_event(store, jpeg(half(image)), query="q-variant"))
    assert variant.decision.kind == UNIQUE  # nothing to be a duplicate of
    assert objects(store) == [variant.decision.object_key]
    assert store.keys(segments.wal_prefix()) == [segments.wal_key(variant.decision.pixel_sha256)]


def test_orphaned_intents_are_loaded_then_adopted_by_another_replica(store, clock):
    a, b = Replica(store, clock, "a"), Replica(store, clock, "b")
    image = picture(8)
    stored = a.decide(fetched_event(store, jpeg(image), query="q-a")).decision
    del a  # killed before its flush: only the intent says the image is in the index
    clock.now += TIMINGS.refresh_s
    b.between_batches()
    assert stored.pixel_sha256 not in b.near  # young intents belong to their writer
    clock.now += TIMINGS.wal_grace_s + 1
    b.between_batches()
    assert stored.pixel_sha256 in b.near
    assert b.decide(fetched_event(store, jpeg(half(image)), query="q-b")).decision.kind == NEAR_DUPLICATE
    clock.now += TIMINGS.orphan_after_s
    b.between_batches()
    assert store.keys(segments.wal_prefix()) == []
    assert fresh_entries(store, clock) == {stored.pixel_sha256}


def test_many_small_segments_are_merged_without_losing_entries(store, clock):
    replicas = [Replica(store, clock, f"r{i}") for i in range(3)]
    stored = set()
    for i in range(12):
        replica = replicas[i % 3]
        stored.add(replica.decide(fetched_event(store, jpeg(picture(20 + i)), query=f"q-{i}")).decision.pixel_sha256)
        clock.now += 2
        replica.near.flush()
    assert len(store.keys(segments.segments_prefix())) == 12
    stale = Replica(store, clock, "stale")  # lists the 12 segments now
    replicas[0].near.refresh(force=True)
    assert replicas[0].near.compact()
    remaining = store.keys(segments.segments_prefix())
    assert len(remaining) <= TIMINGS.max_segments
    assert fresh_entries(store, clock) == stored
    # A replica merging from an older listing finds its inputs gone and leaves things as they are.
    assert not stale.near.compact()
    assert store.keys(segments.segments_prefix()) == remaining


def test_an_index_never_built_is_rebuilt_from_the_stored_objects(store, clock):
    a = Replica(store, clock, "a")
    shas = {a.decide(fetched_event(store, jpeg(picture(40 + i)), query=f"q-{i}")).decision.pixel_sha256 for i in range(3)}
    flat = a.decide(fetched_event(store, jpeg(Image.new("RGB", (64, 64), (9, 9, 9))), query="q-flat")).decision
    # Objects stored before the index existed, one of them with hashes of an older version.
    for key in store.keys(segments.prefix()):
        store.delete(BUCKET, key)
    old = image_key(sorted(shas)[0])
    data, content_type, metadata = store.objects[(BUCKET, old)]
    store.objects[(BUCKET, old)] = (data, content_type, {**metadata, "hash-version": "1", "phash": "0" * 16})
    fresh = Replica(store, clock, "fresh")
    assert not fresh.initialised and len(fresh.near) == 0
    assert reindex.rebuild(fresh.near, workers=2) == 3
    assert flat.pixel_sha256 not in fresh.near
    assert fresh_entries(store, clock) == shas
    assert Replica(store, clock, "later").initialised
    near = fresh.decide(fetched_event(store, jpeg(picture(40), quality=60), query="q-again"))
    assert near.decision.kind == NEAR_DUPLICATE


def test_segments_skip_damaged_objects(store, clock):
    a = Replica(store, clock, "a")
    a.decide(fetched_event(store, jpeg(picture(50)), query="q-1"))
    clock.now += 2
    a.near.flush()
    store.put_bytes(BUCKET, segments.new_segment_key(3, "intruder"), b"IEXNEAR1{not json")
    store.put_json(BUCKET, segments.wal_key("ab" * 32), {"hash_version": "2", "pixel_sha256": "x"})
    assert len(fresh_entries(store, clock)) == 1
