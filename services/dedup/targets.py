"""Decontamination: hashes of a target's evaluation images, and whether a web image matches one.

The paper's evaluation is only honest if no evaluation image of the target (or a near copy of one)
is trained on. TargetGuard hashes every image under `<target_uri>/eval/` once, caches the result in
S3 (`dedup/target-hashes/<sha256(target_uri)>.json`, shared by replicas and restarts, recomputed
when the listing or the hash version changes) and in memory (re-listed every `refresh_s`).

A web image contaminates the target when its pixel sha equals an evaluation image's, or when its
distance to one (pHash + dHash Hamming distance, as for near-duplicates) is at most `max_distance`.
Flat pictures (no low-frequency content: hashing.PerceptualHashes.informative) are compared by
identity only, on either side: their hash bits are noise.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from minio.error import S3Error

from services.common.errors import PermanentError
from services.common.objectstore import parse_s3_uri
from services.dedup.hashing import HASH_VERSION, ImageHashes, ImageRejected, decode_image, hamming_many, hash_hex, image_hashes, parse_hash_hex

log = logging.getLogger(__name__)

CACHE_PREFIX = "dedup/target-hashes"

# Files that sit beside target images (captions, manifests) and are never images.
_NOT_IMAGES = (".txt", ".json", ".csv", ".md", ".xml", ".yaml", ".yml", ".html")


@dataclass(frozen=True)
class TargetMatch:
    # s3:// URI of the evaluation image matched.
    target_id: str
    # pHash + dHash Hamming distance (0 for identical pixels).
    distance: int
    # Identical pixels, not only close hashes.
    exact: bool = False


@dataclass
class TargetHashes:
    target_uri: str
    fingerprint: str
    ids: list[str] = field(default_factory=list)
    pixel_sha256: list[str] = field(default_factory=list)
    dhash: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    phash: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    informative: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    skipped: int = 0

    def __post_init__(self) -> None:
        self._exact = {sha: target_id for sha, target_id in zip(self.pixel_sha256, self.ids, strict=True)}

    def __len__(self) -> int:
        return len(self.ids)

    def match(self, hashes: ImageHashes, max_distance: int) -> TargetMatch | None:
        exact_id = self._exact.get(hashes.pixel_sha256)
        if exact_id is not None:
            return TargetMatch(exact_id, 0, exact=True)
        if max_distance < 0 or not self.ids or not hashes.informative:
            return None
        distance = hamming_many(hashes.dhash, self.dhash) + hamming_many(hashes.phash, self.phash)
        distance = np.where(self.informative, distance, 129)
        best = int(np.argmin(distance))
        if int(distance[best]) <= max_distance:
            return TargetMatch(self.ids[best], int(distance[best]))
        return None

    def to_json(self) -> dict:
        return {
            "hash_version": HASH_VERSION,
            "target_uri": self.target_uri,
            "fingerprint": self.fingerprint,
            "skipped": self.skipped,
            "images": [
                {"id": i, "pixel_sha256": s, "dhash": hash_hex(int(d)), "phash": hash_hex(int(p)), "informative": bool(f)}
                for i, s, d, p, f in zip(self.ids, self.pixel_sha256, self.dhash, self.phash, self.informative, strict=True)
            ],
        }

    @classmethod
    def from_json(cls, value: dict) -> "TargetHashes":
        images = value.get("images", [])
        return cls(
            target_uri=value["target_uri"],
            fingerprint=value["fingerprint"],
            ids=[image["id"] for image in images],
            pixel_sha256=[image["pixel_sha256"] for image in images],
            dhash=np.array([parse_hash_hex(image["dhash"]) for image in images], dtype=np.uint64),
            phash=np.array([parse_hash_hex(image["phash"]) for image in images], dtype=np.uint64),
            informative=np.array([bool(image.get("informative", True)) for image in images], dtype=bool),
            skipped=int(value.get("skipped", 0)),
        )


EMPTY = TargetHashes(target_uri="", fingerprint="")


def cache_key(target_uri: str) -> str:
    return f"{CACHE_PREFIX}/{hashlib.sha256(target_uri.encode()).hexdigest()}.json"


def eval_prefix(target_uri: str) -> tuple[str, str]:
    bucket, prefix = parse_s3_uri(target_uri)
    return bucket, f"{prefix}/eval/" if prefix else "eval/"


class TargetGuard:
    """Evaluation-image hashes per target, and per exploration through the exploration directory."""

    def __init__(
        self,
        store,
        bucket: str,
        target_uri_of: Callable[[str], str],
        max_pixels: int,
        refresh_s: float = 600.0,
        workers: int = 4,
        on_load: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.bucket = bucket
        self.target_uri_of = target_uri_of
        self.max_pixels = max_pixels
        self.refresh_s = refresh_s
        self.workers = workers
        # Called with "memory", "cache" or "computed" each time hashes are (re)loaded, for metrics.
        self.on_load = on_load or (lambda _source: None)
        self._loaded: dict[str, tuple[TargetHashes, float]] = {}
        self._lock = threading.Lock()

    def for_exploration(self, exploration_id: str) -> TargetHashes:
        return self.for_target(self.target_uri_of(exploration_id))

    def for_target(self, target_uri: str) -> TargetHashes:
        if not target_uri:
            return EMPTY
        now = time.monotonic()
        with self._lock:
            loaded = self._loaded.get(target_uri)
        if loaded is not None and now - loaded[1] < self.refresh_s:
            return loaded[0]
        keys = self._eval_keys(target_uri)
        fingerprint = hashlib.sha256("\n".join(keys).encode()).hexdigest()
        if loaded is not None and loaded[0].fingerprint == fingerprint:
            hashes, source = loaded[0], "memory"
        else:
            hashes, source = self._cached_or_computed(target_uri, keys, fingerprint)
        with self._lock:
            self._loaded[target_uri] = (hashes, now)
        self.on_load(source)
        return hashes

    def _eval_keys(self, target_uri: str) -> list[str]:
        try:
            bucket, prefix = eval_prefix(target_uri)
        except ValueError as exc:
            raise PermanentError("invalid_target_uri", str(exc)[:120]) from exc
        try:
            keys = self.store.list_keys(bucket, prefix)
            return sorted(key for key in keys if not key.lower().endswith(_NOT_IMAGES))
        except S3Error as exc:
            # No such bucket, access denied: the target itself is unusable, retrying cannot help.
            raise PermanentError("target_unreadable", f"{target_uri}: {exc.code}"[:200]) from exc

    def _cached_or_computed(self, target_uri: str, keys: list[str], fingerprint: str) -> tuple[TargetHashes, str]:
        cached = self.store.get_json(self.bucket, cache_key(target_uri))
        if cached and cached.get("hash_version") == HASH_VERSION and cached.get("fingerprint") == fingerprint:
            return TargetHashes.from_json(cached), "cache"
        hashes = self._compute(target_uri, keys, fingerprint)
        self.store.put_json(self.bucket, cache_key(target_uri), hashes.to_json())
        log.info("target evaluation hashes computed", extra={"target_uri": target_uri, "images": len(hashes), "skipped": hashes.skipped})
        return hashes, "computed"

    def _compute(self, target_uri: str, keys: list[str], fingerprint: str) -> TargetHashes:
        bucket, _ = parse_s3_uri(target_uri)

        def hash_one(key: str) -> ImageHashes | None:
            data = self.store.get_or_none(bucket, key)
            if data is None:
                return None
            try:
                return image_hashes(data, decode_image(data, self.max_pixels), self.max_pixels)
            except ImageRejected:
                return None

        # Threads overlap S3 round trips; Pillow releases the GIL while decoding.
        with ThreadPoolExecutor(max_workers=max(1, self.workers), thread_name_prefix="target-hash") as pool:
            results = list(pool.map(hash_one, keys))
        kept = [(key, h) for key, h in zip(keys, results, strict=True) if h is not None]
        return TargetHashes(
            target_uri=target_uri,
            fingerprint=fingerprint,
            ids=[f"s3://{bucket}/{key}" for key, _ in kept],
            pixel_sha256=[h.pixel_sha256 for _, h in kept],
            dhash=np.array([h.dhash for _, h in kept], dtype=np.uint64),
            phash=np.array([h.phash for _, h in kept], dtype=np.uint64),
            informative=np.array([h.informative for _, h in kept], dtype=bool),
            skipped=len(keys) - len(kept),
        )
