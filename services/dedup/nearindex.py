"""Near-duplicate lookup in memory: which stored image lies within a distance of a new one.

The distance of two images is Hamming(pHash) + Hamming(dHash), a Hamming distance over the 128 bits
of both hashes side by side. Lookups use multi-index hashing (Norouzi, Punjani and Fleet, "Fast
Search in Hamming Space with Multi-Index Hashing", CVPR 2012): the 128 bits are cut into 8 chunks of
16, and if two keys are within distance r then, by pigeonhole, at least one chunk differs in at most
floor(r / 8) bits. So each chunk has a table (its 16-bit values sorted, with offsets: one CSR array
per chunk), a query visits the cells within that radius of its own chunk value in every table (8 x
137 cells at r = 20) and compares only the entries found there in full. The work grows with the
entries that share a chunk, not with the whole index: sub-linear at millions of images.

Tables are static arrays, so new entries go to a tail that is scanned linearly (vectorised), and the
tables are rebuilt when the tail outgrows a bound that grows with the index: amortised O(1) per
insert, and the tail scan stays a small fraction of a query. Small indexes (below TABLE_MIN_ROWS)
are scanned linearly: at that size that is faster than visiting the tables.

Rows are never removed (a stored image stays stored); a row can be disabled (`disable`) when the
image it stands for turned out not to exist (see SharedNearIndex).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from services.dedup.hashing import popcount64

CHUNK_BITS = 16
CHUNKS = 8
# Below this many rows a linear scan beats the tables.
TABLE_MIN_ROWS = 3000
# The tail is folded into the tables when it holds more than max(TAIL_MIN_ROWS, rows / TAIL_FRACTION),
# up to TAIL_MAX_ROWS.
TAIL_MIN_ROWS = 1024
TAIL_FRACTION = 8
TAIL_MAX_ROWS = 65536

_CELLS = 1 << CHUNK_BITS


def _masks(radius: int) -> np.ndarray:
    """Every 16-bit value with at most `radius` bits set (the XOR masks of one chunk's probe)."""
    masks = [0]
    for weight in range(1, radius + 1):
        masks += [sum(1 << bit for bit in bits) for bits in combinations(range(CHUNK_BITS), weight)]
    return np.array(masks, dtype=np.int64)


_MASKS = [_masks(r) for r in range(5)]
# Where each chunk's table starts in the flat offsets.
_CHUNK_BASE = (np.arange(CHUNKS, dtype=np.int64) * (_CELLS + 1))[:, None]


def sha_bytes(pixel_sha256: str) -> bytes:
    return bytes.fromhex(pixel_sha256)


def _chunk_values(phash: np.ndarray, dhash: np.ndarray) -> np.ndarray:
    """(8, n) int64 array of the 16-bit chunks: pHash high to low, then dHash high to low."""
    out = np.empty((CHUNKS, len(phash)), dtype=np.int64)
    for j in range(4):
        shift = np.uint64(48 - 16 * j)
        out[j] = (phash >> shift) & np.uint64(0xFFFF)
        out[4 + j] = (dhash >> shift) & np.uint64(0xFFFF)
    return out


@dataclass(frozen=True)
class NearMatch:
    pixel_sha256: str
    # pHash + dHash Hamming distance.
    distance: int
    row: int


class NearIndex:
    """Rows of (pixel sha256, pHash, dHash); thread-safe."""

    def __init__(self, capacity: int = 1024) -> None:
        self._sha = np.zeros((capacity, 32), dtype=np.uint8)
        self._phash = np.zeros(capacity, dtype=np.uint64)
        self._dhash = np.zeros(capacity, dtype=np.uint64)
        self._enabled = np.ones(capacity, dtype=bool)
        self._n = 0
        # First 8 bytes of the sha -> row (a full comparison settles the astronomically rare clash).
        self._rows: dict[int, int] = {}
        # Tables over rows [0, self._indexed): chunk by chunk, the rows sorted by that chunk's value,
        # all in one array; offsets[j * 65537 + v] is where chunk j's rows of value v start in it.
        self._indexed = 0
        self._order: np.ndarray | None = None  # (8 * indexed,) int32
        self._offsets: np.ndarray | None = None  # (8 * 65537,) int64
        self._lock = threading.RLock()

    # ---- contents ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    def row_of(self, pixel_sha256: str) -> int | None:
        raw = sha_bytes(pixel_sha256)
        with self._lock:
            row = self._rows.get(int.from_bytes(raw[:8], "big"))
            if row is None or self._sha[row].tobytes() != raw:
                return None
            return row

    def __contains__(self, pixel_sha256: str) -> bool:
        return self.row_of(pixel_sha256) is not None

    def sha_at(self, row: int) -> str:
        return self._sha[row].tobytes().hex()

    def hashes_at(self, row: int) -> tuple[int, int]:
        """(pHash, dHash) of a row."""
        return int(self._phash[row]), int(self._dhash[row])

    def add(self, pixel_sha256: str, phash: int, dhash: int) -> bool:
        """Adds one entry; False when the image is already there."""
        added = self.add_many(
            np.frombuffer(sha_bytes(pixel_sha256), dtype=np.uint8).reshape(1, 32),
            np.array([phash], dtype=np.uint64),
            np.array([dhash], dtype=np.uint64),
        )
        return bool(added[0])

    def add_many(self, shas: np.ndarray, phash: np.ndarray, dhash: np.ndarray) -> np.ndarray:
        """Adds rows (shas: (n, 32) uint8); returns which of them were new."""
        shas = np.ascontiguousarray(shas, dtype=np.uint8).reshape(-1, 32)
        keys = shas[:, :8].copy().view(">u8").reshape(-1).tolist()
        added = np.zeros(len(keys), dtype=bool)
        with self._lock:
            batch: dict[int, int] = {}
            for i, key in enumerate(keys):
                row = self._rows.get(key)
                if row is not None and self._sha[row].tobytes() == shas[i].tobytes():
                    self._enabled[row] = True  # a dropped entry whose image is stored after all
                    continue
                first = batch.get(key)
                if first is not None and shas[first].tobytes() == shas[i].tobytes():
                    continue
                batch.setdefault(key, i)
                added[i] = True
            new = np.flatnonzero(added)
            if len(new):
                start = self._reserve(len(new))
                end = start + len(new)
                self._sha[start:end] = shas[new]
                self._phash[start:end] = np.asarray(phash, dtype=np.uint64)[new]
                self._dhash[start:end] = np.asarray(dhash, dtype=np.uint64)[new]
                self._enabled[start:end] = True
                self._n = end
                for offset, i in enumerate(new.tolist()):
                    self._rows.setdefault(keys[i], start + offset)
                self._maybe_rebuild()
        return added

    def disable(self, row: int) -> None:
        with self._lock:
            self._enabled[row] = False

    def entries(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of (shas, pHash, dHash) of the enabled rows (or of the enabled ones among the given rows)."""
        with self._lock:
            if rows is None:
                rows = np.flatnonzero(self._enabled[: self._n])
            else:
                rows = rows[self._enabled[rows]]
            return self._sha[rows].copy(), self._phash[rows].copy(), self._dhash[rows].copy()

    # ---- queries -----------------------------------------------------------------------------
    def nearest(self, phash: int, dhash: int, max_distance: int, exclude: str | None = None) -> NearMatch | None:
        """The closest enabled entry within max_distance (ties: the earliest added), else None."""
        rows, distances = self.within(phash, dhash, max_distance)
        if exclude is not None:
            excluded = self.row_of(exclude)
            if excluded is not None:
                keep = rows != excluded
                rows, distances = rows[keep], distances[keep]
        if len(rows) == 0:
            return None
        best = np.lexsort((rows, distances))[0]
        row = int(rows[best])
        return NearMatch(self.sha_at(row), int(distances[best]), row)

    def within(self, phash: int, dhash: int, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, distances) of every enabled entry within max_distance, each row once."""
        if max_distance < 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
        p, d = np.uint64(phash), np.uint64(dhash)
        with self._lock:
            n, indexed = self._n, self._indexed
            radius = max_distance // CHUNKS
            use_tables = self._order is not None and radius < len(_MASKS)
            if use_tables:
                # A row can turn up in several chunks' cells: duplicates are dropped among the few
                # survivors, much cheaper than deduplicating every candidate.
                candidates = np.concatenate([self._table_candidates(p, d, radius), np.arange(indexed, n)])
            else:
                candidates = np.arange(n)
            distances = popcount64(self._phash[candidates] ^ p) + popcount64(self._dhash[candidates] ^ d)
            keep = (distances <= max_distance) & self._enabled[candidates]
        rows, distances = candidates[keep], distances[keep]
        if use_tables and len(rows) > 1:
            rows, first = np.unique(rows, return_index=True)
            distances = distances[first]
        return rows, distances

    def _table_candidates(self, p: np.uint64, d: np.uint64, radius: int) -> np.ndarray:
        pi, di = int(p), int(d)
        keys = np.array([(pi >> s) & 0xFFFF for s in (48, 32, 16, 0)] + [(di >> s) & 0xFFFF for s in (48, 32, 16, 0)], dtype=np.int64)
        # Every probed cell of every chunk table, as an index into the flat offsets.
        probes = ((keys[:, None] ^ _MASKS[radius][None, :]) + _CHUNK_BASE).reshape(-1)
        starts = self._offsets[probes]
        lengths = self._offsets[probes + 1] - starts
        nonempty = lengths > 0
        starts, lengths = starts[nonempty], lengths[nonempty]
        if len(lengths) == 0:
            return np.zeros(0, dtype=np.int64)
        # Concatenate the ranges [start, start + length) without a Python loop.
        ends = np.cumsum(lengths)
        positions = np.arange(int(ends[-1])) + np.repeat(starts - (ends - lengths), lengths)
        return self._order[positions]

    # ---- storage -----------------------------------------------------------------------------
    def _reserve(self, count: int) -> int:
        """Room for `count` more rows; returns the first of them."""
        needed = self._n + count
        if needed > len(self._phash):
            grow = max(needed, len(self._phash) * 2)
            self._sha = np.concatenate([self._sha[: self._n], np.zeros((grow - self._n, 32), dtype=np.uint8)])
            self._phash = np.concatenate([self._phash[: self._n], np.zeros(grow - self._n, dtype=np.uint64)])
            self._dhash = np.concatenate([self._dhash[: self._n], np.zeros(grow - self._n, dtype=np.uint64)])
            self._enabled = np.concatenate([self._enabled[: self._n], np.ones(grow - self._n, dtype=bool)])
        return self._n

    def _maybe_rebuild(self) -> None:
        tail = self._n - self._indexed
        if self._n < TABLE_MIN_ROWS:
            return
        if self._order is not None and tail <= min(TAIL_MAX_ROWS, max(TAIL_MIN_ROWS, self._indexed // TAIL_FRACTION)):
            return
        n = self._n
        values = _chunk_values(self._phash[:n], self._dhash[:n])
        order = np.empty(CHUNKS * n, dtype=np.int32)
        offsets = np.zeros((CHUNKS, _CELLS + 1), dtype=np.int64)
        for j in range(CHUNKS):
            # A stable sort keeps rows of one cell in insertion order.
            # On 16-bit keys numpy's stable sort is a radix sort: O(n).
            order[j * n : (j + 1) * n] = np.argsort(values[j].astype(np.uint16), kind="stable")
            offsets[j, 1:] = np.cumsum(np.bincount(values[j], minlength=_CELLS))
            offsets[j] += j * n
        self._order, self._offsets, self._indexed = order, offsets.reshape(-1), n
