"""Image embeddings kept in S3 per model version, in batched shards, with a lookup by key.

The scorer computes every embedding once; dedup (semantic near-duplicates), the planner's
diagnostics and a restarted scorer read them back from here instead of asking Triton again.

Layout (bucket IEX_S3_BUCKET)::

    embeddings/<model>/v<version>/images/<shard id>.npz   images scored from events; key: the stored
                                                           image's pixel sha256
    embeddings/<model>/v<version>/banks/<digest>.npz      a target bank; keys: the target's object
                                                           keys; digest of (target, size, keys)

A shard is an uncompressed .npz (embeddings do not compress) with two arrays: ``keys`` (bytes
[N]) and ``embeddings`` (float32 [N, D], L2-normalised). Shards are immutable and their id is a
hash of their keys, so a redelivered batch rewrites the same object instead of adding one. A key
may still sit in several shards (the same picture scored again in another batch): every copy holds
the same vector, since an embedding is a pure function of (model, version, pixels).

Reading: `EmbeddingStore.lookup` keeps, per model version, an index key -> shard built from the
shards listed so far; only shards it has not seen are read when a lookup misses, and shard
contents are cached in a bounded LRU. `iter_images` streams every shard for bulk consumers.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

PREFIX = "embeddings"
# Same alphabet as Triton model names (services.common.modelrepo): safe inside an object key.
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SHARD_SUFFIX = ".npz"


class ShardError(ValueError):
    """An object under embeddings/ is not a readable shard."""


def _check_model(model_name: str, version: int) -> None:
    if not _MODEL_NAME_RE.match(model_name) or ".." in model_name:
        raise ValueError(f"invalid model name {model_name!r}")
    if isinstance(version, bool) or int(version) < 1:
        raise ValueError(f"version must be >= 1, got {version!r}")


def version_prefix(model_name: str, version: int) -> str:
    _check_model(model_name, version)
    return f"{PREFIX}/{model_name}/v{int(version)}/"


def images_prefix(model_name: str, version: int) -> str:
    return version_prefix(model_name, version) + "images/"


def bank_key(model_name: str, version: int, digest: str) -> str:
    return version_prefix(model_name, version) + f"banks/{digest}{_SHARD_SUFFIX}"


def bank_digest(target_uri: str, image_size: int, keys: Sequence[str]) -> str:
    """Identity of a bank's input: the same target objects at the same size give the same digest."""
    h = hashlib.sha256()
    h.update(f"{target_uri}\n{int(image_size)}\n".encode())
    for key in keys:
        h.update(key.encode())
        h.update(b"\n")
    return h.hexdigest()[:32]


def encode_shard(keys: Sequence[str], embeddings: np.ndarray) -> bytes:
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(keys):
        raise ValueError(f"{len(keys)} keys for embeddings of shape {vectors.shape}")
    buffer = io.BytesIO()
    encoded = np.array([key.encode() for key in keys], dtype=np.bytes_) if keys else np.zeros(0, dtype="S1")
    np.savez(buffer, keys=encoded, embeddings=vectors)
    return buffer.getvalue()


def decode_shard(data: bytes) -> tuple[list[str], np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            raw_keys = archive["keys"]
            vectors = archive["embeddings"]
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise ShardError(f"not an embedding shard: {exc}") from exc
    if vectors.dtype != np.float32 or vectors.ndim != 2 or raw_keys.ndim != 1 or raw_keys.shape[0] != vectors.shape[0]:
        raise ShardError(f"shard holds keys {raw_keys.shape} and embeddings {vectors.dtype} {vectors.shape}")
    keys = [bytes(key).decode() for key in raw_keys]
    vectors.setflags(write=False)
    return keys, vectors


@dataclass
class _VersionIndex:
    """Which shard holds each key, for the shards of one model version listed so far."""

    shards_seen: set[str] = field(default_factory=set)
    where: dict[str, tuple[str, int]] = field(default_factory=dict)
    refreshed_at: float | None = None  # never listed yet
    lock: threading.Lock = field(default_factory=threading.Lock)


class EmbeddingStore:
    def __init__(
        self,
        store,
        bucket: str,
        *,
        cached_shards: int = 64,
        min_refresh_interval_s: float = 1.0,
        clock=time.monotonic,
    ) -> None:
        self.store = store
        self.bucket = bucket
        self.cached_shards = max(1, cached_shards)
        # Listing costs one request per 1,000 shards: a burst of misses lists once, not per call.
        self.min_refresh_interval_s = min_refresh_interval_s
        self.clock = clock
        self._indexes: dict[tuple[str, int], _VersionIndex] = {}
        self._shards: OrderedDict[str, tuple[list[str], np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    # ---- images ------------------------------------------------------------------------------
    def put_images(self, model_name: str, version: int, keys: Sequence[str], embeddings: np.ndarray) -> str | None:
        """Writes one shard of image embeddings (duplicate keys kept once); returns its object key."""
        vectors = np.asarray(embeddings, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(keys):
            raise ValueError(f"{len(keys)} keys for embeddings of shape {vectors.shape}")
        first: dict[str, int] = {}
        for row, key in enumerate(keys):
            if not key:
                raise ValueError("empty embedding key")
            first.setdefault(key, row)
        if not first:
            return None
        ordered = sorted(first)
        shard_id = hashlib.sha256("\n".join(ordered).encode()).hexdigest()[:32]
        object_key = images_prefix(model_name, version) + shard_id + _SHARD_SUFFIX
        rows = np.ascontiguousarray(vectors[[first[k] for k in ordered]])
        self.store.put_bytes(self.bucket, object_key, encode_shard(ordered, rows))
        # What this process wrote it can answer at once, without listing.
        rows.setflags(write=False)
        index = self._index(model_name, version)
        with index.lock:
            for row, key in enumerate(ordered):
                index.where.setdefault(key, (object_key, row))
            index.shards_seen.add(object_key)
        self._remember(object_key, (ordered, rows))
        return object_key

    def lookup(self, model_name: str, version: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Embeddings of the `keys` that were stored for (model, version); absent keys are left out."""
        index = self._index(model_name, version)
        wanted = list(dict.fromkeys(keys))
        with index.lock:
            if any(key not in index.where for key in wanted):
                self._refresh(model_name, version, index)
            located = {key: index.where[key] for key in wanted if key in index.where}
        found: dict[str, np.ndarray] = {}
        by_shard: dict[str, list[tuple[str, int]]] = {}
        for key, (shard, row) in located.items():
            by_shard.setdefault(shard, []).append((key, row))
        for shard, rows in by_shard.items():
            try:
                _, vectors = self._shard(shard)
            except ShardError:
                continue  # deleted or replaced behind our back: its keys read as absent
            for key, row in rows:
                found[key] = vectors[row]
        return found

    def iter_images(self, model_name: str, version: int) -> Iterator[tuple[list[str], np.ndarray]]:
        """Every image shard of (model, version): (keys, embeddings [N, D]) per shard."""
        for object_key in sorted(self.store.list_keys(self.bucket, images_prefix(model_name, version))):
            if object_key.endswith(_SHARD_SUFFIX):
                yield self._shard(object_key)

    # ---- target banks ------------------------------------------------------------------------
    def put_bank(self, model_name: str, version: int, digest: str, keys: Sequence[str], embeddings: np.ndarray) -> str:
        object_key = bank_key(model_name, version, digest)
        self.store.put_bytes(self.bucket, object_key, encode_shard(list(keys), embeddings))
        return object_key

    def get_bank(self, model_name: str, version: int, digest: str) -> tuple[list[str], np.ndarray] | None:
        """The stored bank for `digest`, or None (never stored, or unreadable: rebuilt then)."""
        data = self.store.get_or_none(self.bucket, bank_key(model_name, version, digest))
        if data is None:
            return None
        try:
            return decode_shard(data)
        except ShardError:
            return None

    # ---- internals ---------------------------------------------------------------------------
    def _index(self, model_name: str, version: int) -> _VersionIndex:
        _check_model(model_name, version)
        with self._lock:
            return self._indexes.setdefault((model_name, int(version)), _VersionIndex())

    def _refresh(self, model_name: str, version: int, index: _VersionIndex) -> None:
        now = self.clock()
        if index.refreshed_at is not None and now - index.refreshed_at < self.min_refresh_interval_s:
            return
        listed = [k for k in self.store.list_keys(self.bucket, images_prefix(model_name, version)) if k.endswith(_SHARD_SUFFIX)]
        for object_key in sorted(set(listed) - index.shards_seen):
            try:
                keys, _ = self._shard(object_key)
            except ShardError:
                continue  # a foreign object: never index it, never fail a lookup on it
            for row, key in enumerate(keys):
                index.where.setdefault(key, (object_key, row))
            index.shards_seen.add(object_key)
        index.refreshed_at = self.clock()

    def _shard(self, object_key: str) -> tuple[list[str], np.ndarray]:
        with self._lock:
            cached = self._shards.get(object_key)
            if cached is not None:
                self._shards.move_to_end(object_key)
                return cached
        data = self.store.get_or_none(self.bucket, object_key)
        if data is None:
            raise ShardError(f"shard {object_key} disappeared")
        shard = decode_shard(data)
        self._remember(object_key, shard)
        return shard

    def _remember(self, object_key: str, shard: tuple[list[str], np.ndarray]) -> None:
        with self._lock:
            self._shards[object_key] = shard
            self._shards.move_to_end(object_key)
            while len(self._shards) > self.cached_shards:
                self._shards.popitem(last=False)


__all__ = [
    "EmbeddingStore",
    "ShardError",
    "bank_digest",
    "bank_key",
    "decode_shard",
    "encode_shard",
    "images_prefix",
    "version_prefix",
]
