"""Where a caption index survives restarts: a local directory, S3, or both in front of each other.

An index version is identified by its digest (captions + embedder, see index.captions_digest) and
stored as files under `<key>/<digest>/`:

  embeddings.npy      the caption vectors, float32, one row per distinct caption
  <name>              optional prebuilt structures (a serialized faiss HNSW graph, for instance)
  meta.json           written last: {"digest", "count", "dimension", "files"}; a version without it
                      is incomplete and ignored, so a crash mid-write never loads half an index

S3 keeps every version (`search/indices/<index>/<digest>/…` in the service's bucket), so replicas of
two corpus versions during a rolling update do not overwrite each other; the local store keeps only
the latest version of each key. Stores are caches: a failure to read is a miss and a failure to
write is logged, never fatal, because the index can always be rebuilt from the corpus.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)

EMBEDDINGS_FILE = "embeddings.npy"
META_FILE = "meta.json"
DEFAULT_S3_PREFIX = "search/indices"


class IndexStore(Protocol):
    """Vectors and named blobs of one index version. `key` names the index; `digest` its version."""

    def load(self, key: str, digest: str) -> np.ndarray | None: ...

    def save(self, key: str, digest: str, vectors: np.ndarray, blobs: dict[str, bytes] | None = None) -> None: ...

    def load_blob(self, key: str, digest: str, name: str) -> bytes | None: ...


def vectors_to_bytes(vectors: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def vectors_from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class _FileLayoutStore:
    """The shared logic; subclasses read and write one file by relative path."""

    label = "store"

    def _get(self, path: str) -> bytes | None:
        raise NotImplementedError

    def _put(self, path: str, data: bytes, content_type: str) -> None:
        raise NotImplementedError

    def _committed(self, key: str, digest: str) -> None:
        """Called after a version's meta.json is written."""

    @staticmethod
    def _path(key: str, digest: str, name: str) -> str:
        return f"{key}/{digest}/{name}"

    def _meta(self, key: str, digest: str) -> dict | None:
        raw = self._get(self._path(key, digest, META_FILE))
        if raw is None:
            return None
        meta = json.loads(raw)
        return meta if isinstance(meta, dict) and meta.get("digest") == digest else None

    def load(self, key: str, digest: str) -> np.ndarray | None:
        try:
            meta = self._meta(key, digest)
            if meta is None:
                return None
            raw = self._get(self._path(key, digest, EMBEDDINGS_FILE))
            if raw is None:
                return None
            vectors = vectors_from_bytes(raw)
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be read is a miss
            log.warning("index store unreadable", extra={"store": self.label, "index": key, "error": str(exc)[:200]})
            return None
        if vectors.ndim != 2 or vectors.shape[0] != meta.get("count") or vectors.shape[1] != meta.get("dimension"):
            return None
        return vectors.astype(np.float32, copy=False)

    def load_blob(self, key: str, digest: str, name: str) -> bytes | None:
        try:
            meta = self._meta(key, digest)
            if meta is None or name not in meta.get("files", []):
                return None
            return self._get(self._path(key, digest, name))
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be read is a miss
            log.warning("index store unreadable", extra={"store": self.label, "index": key, "error": str(exc)[:200]})
            return None

    def save(self, key: str, digest: str, vectors: np.ndarray, blobs: dict[str, bytes] | None = None) -> None:
        blobs = dict(blobs or {})
        try:
            self._put(self._path(key, digest, EMBEDDINGS_FILE), vectors_to_bytes(vectors), "application/octet-stream")
            for name, data in blobs.items():
                self._put(self._path(key, digest, name), data, "application/octet-stream")
            meta = {"digest": digest, "count": int(vectors.shape[0]), "dimension": int(vectors.shape[1]), "files": [EMBEDDINGS_FILE, *blobs]}
            self._put(self._path(key, digest, META_FILE), json.dumps(meta).encode(), "application/json")
            self._committed(key, digest)
        except Exception as exc:  # noqa: BLE001 - a read-only volume or an S3 outage only costs the next start
            log.warning("index not persisted", extra={"store": self.label, "index": key, "error": str(exc)[:200]})


class LocalIndexStore(_FileLayoutStore):
    """<directory>/<key>/<digest>/…, each file replaced atomically; older versions of a key are pruned."""

    label = "local"

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _get(self, path: str) -> bytes | None:
        try:
            return (self.directory / path).read_bytes()
        except FileNotFoundError:
            return None

    def _put(self, path: str, data: bytes, content_type: str) -> None:
        target = self.directory / path
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _committed(self, key: str, digest: str) -> None:
        for version in (self.directory / key).iterdir():
            if version.is_dir() and version.name != digest:
                shutil.rmtree(version, ignore_errors=True)


class S3IndexStore(_FileLayoutStore):
    """s3://<bucket>/<prefix>/<key>/<digest>/… through the services' ObjectStore."""

    label = "s3"

    def __init__(self, store, bucket: str, prefix: str = DEFAULT_S3_PREFIX) -> None:
        self.store = store
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def _key(self, path: str) -> str:
        return f"{self.prefix}/{path}" if self.prefix else path

    def _get(self, path: str) -> bytes | None:
        return self.store.get_or_none(self.bucket, self._key(path))

    def _put(self, path: str, data: bytes, content_type: str) -> None:
        self.store.put_bytes(self.bucket, self._key(path), data, content_type=content_type)


class ChainedIndexStore:
    """Stores tried in order (fast and local first); a hit further down is copied into the ones before it."""

    def __init__(self, stores: Sequence[IndexStore]) -> None:
        self.stores = list(stores)

    def load(self, key: str, digest: str) -> np.ndarray | None:
        for position, store in enumerate(self.stores):
            vectors = store.load(key, digest)
            if vectors is not None:
                if position:
                    blobs = self._blobs_of(store, key, digest)
                    for earlier in self.stores[:position]:
                        earlier.save(key, digest, vectors, blobs)
                return vectors
        return None

    @staticmethod
    def _blobs_of(store: IndexStore, key: str, digest: str) -> dict[str, bytes]:
        meta_owner = getattr(store, "_meta", None)
        names: list[str] = []
        if meta_owner is not None:
            try:
                meta = meta_owner(key, digest) or {}
                names = [n for n in meta.get("files", []) if n != EMBEDDINGS_FILE]
            except Exception:  # noqa: BLE001 - blobs are optional
                names = []
        blobs = {}
        for name in names:
            data = store.load_blob(key, digest, name)
            if data is not None:
                blobs[name] = data
        return blobs

    def load_blob(self, key: str, digest: str, name: str) -> bytes | None:
        for store in self.stores:
            data = store.load_blob(key, digest, name)
            if data is not None:
                return data
        return None

    def save(self, key: str, digest: str, vectors: np.ndarray, blobs: dict[str, bytes] | None = None) -> None:
        for store in self.stores:
            store.save(key, digest, vectors, blobs)
