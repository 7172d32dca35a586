"""The in-memory near-duplicate index (multi-index hashing) and the S3 formats of the shared index."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from services.dedup import nearindex, segments
from services.dedup.hashing import hamming, popcount64
from services.dedup.nearindex import NearIndex
from services.dedup.segments import Intent, SegmentError


def sha(i: int) -> str:
    return hashlib.sha256(f"image-{i}".encode()).hexdigest()


def flip(value: int, bits) -> int:
    for bit in bits:
        value ^= 1 << int(bit)
    return value


def random_hashes(rng, n):
    return (
        rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, n).astype(np.uint64),
        rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, n).astype(np.uint64),
    )


def test_popcount_matches_python():
    rng = np.random.default_rng(3)
    values = np.concatenate([np.array([0, 2**64 - 1], dtype=np.uint64), random_hashes(rng, 50)[0]])
    assert popcount64(values).tolist() == [int(v).bit_count() for v in values.tolist()]


@pytest.mark.parametrize("rows", [500, 9000])  # a linear scan, then tables with a tail
def test_within_finds_exactly_what_a_full_scan_finds(rows):
    rng = np.random.default_rng(rows)
    phash, dhash = random_hashes(rng, rows)
    index = NearIndex()
    index.add_many(np.frombuffer(b"".join(bytes.fromhex(sha(i)) for i in range(rows)), dtype=np.uint8).reshape(-1, 32), phash, dhash)
    if rows > nearindex.TABLE_MIN_ROWS:
        assert index._order is not None  # the tables path is what this case exercises
        # More entries after the tables were built sit in the tail.
        extra_p, extra_d = random_hashes(rng, 300)
        for i in range(300):
            index.add(sha(rows + i), int(extra_p[i]), int(extra_d[i]))
        phash, dhash = np.concatenate([phash, extra_p]), np.concatenate([dhash, extra_d])
        assert 0 < len(index) - index._indexed <= nearindex.TAIL_MAX_ROWS
    for _ in range(60):
        target = int(rng.integers(len(phash)))
        flips = rng.choice(128, size=int(rng.integers(0, 26)), replace=False)
        p = flip(int(phash[target]), [b for b in flips if b < 64])
        d = flip(int(dhash[target]), [b - 64 for b in flips if b >= 64])
        full = popcount64(phash ^ np.uint64(p)) + popcount64(dhash ^ np.uint64(d))
        for radius in (0, 12, 20, 26):
            rows_found, distances = index.within(p, d, radius)
            expected = np.flatnonzero(full <= radius)
            assert sorted(rows_found.tolist()) == expected.tolist()
            assert dict(zip(rows_found.tolist(), distances.tolist())) == {r: int(full[r]) for r in expected}


def test_nearest_prefers_the_closest_then_the_earliest_and_honours_exclusions():
    index = NearIndex()
    base_p, base_d = 0x0123_4567_89AB_CDEF, 0xFEDC_BA98_7654_3210
    index.add(sha(1), flip(base_p, [1, 2, 3]), base_d)  # distance 3
    index.add(sha(2), base_p, flip(base_d, [5]))  # distance 1
    index.add(sha(3), flip(base_p, [9]), base_d)  # distance 1, added later
    match = index.nearest(base_p, base_d, 20)
    assert (match.pixel_sha256, match.distance) == (sha(2), 1)
    assert index.nearest(base_p, base_d, 20, exclude=sha(2)).pixel_sha256 == sha(3)
    assert index.nearest(base_p, base_d, 0) is None
    index.disable(index.row_of(sha(2)))
    index.disable(index.row_of(sha(3)))
    assert index.nearest(base_p, base_d, 20).pixel_sha256 == sha(1)
    assert index.nearest(base_p, base_d, -1) is None


def test_an_image_is_added_once():
    index = NearIndex()
    assert index.add(sha(1), 1, 2)
    assert not index.add(sha(1), 1, 2)
    shas = np.frombuffer(bytes.fromhex(sha(2)) * 2 + bytes.fromhex(sha(1)), dtype=np.uint8).reshape(3, 32)
    added = index.add_many(shas, np.array([5, 5, 1], dtype=np.uint64), np.array([6, 6, 2], dtype=np.uint64))
    assert added.tolist() == [True, False, False]
    assert len(index) == 2 and sha(2) in index and sha(3) not in index
    assert index.hashes_at(index.row_of(sha(2))) == (5, 6)


def test_segments_round_trip_and_refuse_damage():
    rng = np.random.default_rng(0)
    phash, dhash = random_hashes(rng, 7)
    shas = rng.integers(0, 256, (7, 32), dtype=np.uint8)
    data = segments.encode_segment(shas, phash, dhash, "writer-1")
    back = segments.decode_segment(data)
    assert np.array_equal(back[0], shas) and np.array_equal(back[1], phash) and np.array_equal(back[2], dhash)
    for damaged in (data[:-1], data[:-48], b"garbage", data.replace(b"IEXNEAR1", b"IEXNEAR9"), data[:-1] + bytes([data[-1] ^ 1])):
        with pytest.raises(SegmentError):
            segments.decode_segment(damaged)
    key = segments.new_segment_key(7, "pod/a b")
    assert key.startswith(segments.segments_prefix()) and segments.segment_count(key) == 7
    assert segments.segment_count(segments.wal_key(sha(1))) is None
    assert segments.wal_sha(segments.wal_key(sha(1))) == sha(1)


def test_intents_round_trip():
    intent = Intent(sha(1), 2**64 - 1, 7, "iex", "staging/ab/cd/x", "f" * 64, {"query-id": "q-1"}, "writer")
    assert Intent.from_json(intent.to_json()) == intent
    broken = intent.to_json() | {"phash": "zz"}
    with pytest.raises(SegmentError):
        Intent.from_json(broken)
    with pytest.raises(SegmentError):
        Intent.from_json(intent.to_json() | {"hash_version": "0"})


def test_hamming_is_the_distance_the_index_uses():
    index = NearIndex()
    index.add(sha(1), 0b1011, 0b1)
    rows, distances = index.within(0b0000, 0b0, 10)
    assert distances.tolist() == [hamming(0b1011, 0) + hamming(0b1, 0)] == [4]
