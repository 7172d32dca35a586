"""Rebuilds the shared near-duplicate index from the stored objects.

    python -m services.dedup.reindex [--workers 8]

For a new hash version (the index prefix is per version), a lost index, or objects stored before the
index existed. Every object under images/ is listed; its hashes come from its metadata when they are
of the current hash version, else from its bytes. Entries are written as segments, then the index is
marked initialised. Safe while replicas run and safe to repeat: entries are idempotent. A dedup
replica that starts on an index never initialised runs the same rebuild in the background.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from services.common import logs
from services.common.objectstore import ObjectStore
from services.dedup.hashing import DEFAULT_MAX_PIXELS, HASH_VERSION, ImageRejected, parse_hash_hex, perceptual_hashes
from services.dedup.sharedindex import SharedNearIndex
from services.dedup.store import IMAGES_PREFIX, SHA256_PATTERN

log = logging.getLogger(__name__)

BATCH = 50_000


def object_entry(store, bucket: str, key: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, int, int] | None:
    """(pixel sha, pHash, dHash) of one stored object; None for flat pictures and what is not an image object."""
    sha = key.rsplit("/", 1)[-1]
    if not SHA256_PATTERN.match(sha):
        return None
    metadata = store.stat_metadata(bucket, key)
    if metadata is None:
        return None
    if metadata.get("hash-version") == HASH_VERSION and metadata.get("phash") and metadata.get("dhash"):
        if metadata.get("perceptual") == "flat":
            return None
        try:
            return sha, parse_hash_hex(metadata["phash"]), parse_hash_hex(metadata["dhash"])
        except ValueError:
            pass  # damaged metadata: hash the bytes instead
    data = store.get_or_none(bucket, key)
    if data is None:
        return None
    try:
        hashes = perceptual_hashes(data, max_pixels=max_pixels)
    except ImageRejected:
        return None
    return (sha, hashes.phash, hashes.dhash) if hashes.informative else None


def rebuild(shared: SharedNearIndex, workers: int = 8, progress: Callable[[int, int], None] | None = None) -> int:
    """Adds every stored object to the shared index; returns how many entries were new here."""
    store, bucket = shared.store, shared.bucket
    keys = list(store.list_keys(bucket, IMAGES_PREFIX + "/"))
    added = 0
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="reindex") as pool:
        for start in range(0, len(keys), BATCH):
            entries = [e for e in pool.map(lambda k: object_entry(store, bucket, k), keys[start : start + BATCH]) if e is not None]
            added += shared.add_entries([e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries], reason="rebuild")
            if progress is not None:
                progress(min(start + BATCH, len(keys)), len(keys))
    shared.mark_initialised("rebuild")
    return added


def main(argv: list[str] | None = None) -> int:
    from services.common.settings import SettingsError, load_service_settings
    from services.dedup.settings import DedupSettings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=8, help="threads reading object metadata (and bytes when needed)")
    args = parser.parse_args(argv)
    try:
        settings = load_service_settings(DedupSettings, "dedup")
    except SettingsError as exc:
        print(f"reindex: {exc}", file=sys.stderr)
        return 2
    logs.configure("dedup-reindex", settings.log_level)
    store = ObjectStore.from_settings(settings)
    shared = SharedNearIndex(store, settings.s3_bucket, f"reindex-{socket.gethostname()}", settings.near_duplicate_max_distance)
    shared.load()
    started = time.monotonic()
    added = rebuild(shared, args.workers, progress=lambda done, total: log.info("reindexing", extra={"done": done, "total": total}))
    print(f"reindexed: {added} new entries, {len(shared)} in the index, {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
