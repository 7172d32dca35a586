"""Query embedding on ONNX Runtime: the same MiniLM vectors at less than half the CPU per query.

A search query is one short text. In torch eager mode its cost is mostly per-operator overhead
(six BERT layers, ~100 small operators): ~9 ms of CPU on this project's machines, against ~4 ms for
the same graph exported to ONNX and run by onnxruntime (measured, one thread; docs/search.md). On a
busy machine CPU time is what a query waits for, so the search service answers queries through
onnxruntime on one thread; whole corpora go through the embedder's bulk path (length-sorted batches,
every core).

The graph is exported at start from the very weights the torch embedder loaded (so there is no
second model to keep in step), checked against torch on sample texts (max difference 1e-4, in
practice ~2e-7) and cached on disk by a digest of the weights, the exporter and the opset
(`$XDG_CACHE_HOME/iex/minilm-onnx/`, else in memory only): the same graph, exported by the same code
(services/common/textembed.py), as the one bulk embedding runs on every core. Anything failing
falls back to the embedder.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Sequence

import numpy as np

from services.common.textembed import (
    ONNX_CHECK_TEXTS as _CHECK_TEXTS,
    ONNX_INPUTS as INPUTS,  # noqa: F401 - part of this module's API
    ONNX_MAX_DIFFERENCE as MAX_DIFFERENCE,
    ONNX_OPSET as OPSET,  # noqa: F401 - part of this module's API
    cached_onnx_model,
    onnx_cache_dir as cache_dir,  # noqa: F401 - part of this module's API
    onnx_session,
)

log = logging.getLogger(__name__)

# Queries come one at a time; larger batches go to the embedder's own bulk path (every core).
SMALL_BATCH = 4


class OnnxQueryEncoder:
    """Embeds small batches with onnxruntime on `threads` threads; anything larger, or any failure,
    goes to the embedder (MiniLMEmbedder: length-sorted batches on every core).

    Exposes the TextEmbedder protocol (name, dimension, embed), so the engine uses it in place of
    the embedder; the vectors are the same to float rounding, so an index embedded by either runtime
    is searched with ORT-embedded queries.
    """

    def __init__(self, embedder, threads: int = 1, use_disk_cache: bool = True) -> None:
        self.embedder = embedder
        self.name = embedder.name
        self.dimension = embedder.dimension
        self.threads = threads
        self._session = None
        self._lock = threading.Lock()
        self.runtime = "torch"
        started = time.perf_counter()
        try:
            self._session = self._load(use_disk_cache)
            self.runtime = "onnxruntime"
        except Exception as exc:  # noqa: BLE001 - the torch path always works; say why this one did not
            log.warning("query embedding stays on torch", extra={"error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        self.load_seconds = time.perf_counter() - started

    def _load(self, use_disk_cache: bool):
        model = cached_onnx_model(self.embedder, use_disk_cache)
        session = onnx_session(model, self.threads)
        # Same vectors or nothing: a graph that drifted from the weights must never answer queries.
        expected = self.embedder.embed_torch(list(_CHECK_TEXTS))
        got = np.vstack([self._run(session, [text]) for text in _CHECK_TEXTS])
        difference = float(np.max(np.abs(got - expected)))
        if not difference <= MAX_DIFFERENCE:
            raise RuntimeError(f"ONNX query embeddings differ from torch by {difference:.3g}")
        return session

    def _run(self, session, texts: Sequence[str]) -> np.ndarray:
        encodings = self.embedder.tokenizer.encode_batch(list(texts))
        feed = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        return session.run(None, feed)[0].astype(np.float32, copy=False)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._session is None or len(texts) > SMALL_BATCH or not texts:
            return self.embedder.embed(texts)
        return self._run(self._session, texts)
