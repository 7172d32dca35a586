"""Query embedding on ONNX Runtime: the same MiniLM vectors at less than half the CPU per query.

A search query is one short text. In torch eager mode its cost is mostly per-operator overhead
(six BERT layers, ~100 small operators): ~9 ms of CPU on this project's machines, against ~4 ms for
the same graph exported to ONNX and run by onnxruntime (measured, one thread; docs/search.md). On a
busy machine CPU time is what a query waits for, so the search service answers queries through
onnxruntime and keeps torch for embedding whole corpora (large batches on every core, where torch
is efficient).

The graph is exported at start from the very weights the torch embedder loaded (so there is no
second model to keep in step), checked against torch on sample texts (max difference 1e-4, in
practice ~2e-7) and cached on disk by a digest of the weights, the exporter and the opset
(`$XDG_CACHE_HOME/iex/minilm-onnx/`, else in memory only). Anything failing falls back to torch.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

OPSET = 17
MAX_DIFFERENCE = 1e-4
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Queries come one at a time; batches beyond this size go to torch (all cores, large matrices).
SMALL_BATCH = 4
_CHECK_TEXTS = ("a baby duck on a pond", "red circle", "an old wooden chair in a museum, close-up photo, vintage and broken")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "iex" / "minilm-onnx"


def _weights_digest(model_dir: Path) -> str:
    import torch

    h = hashlib.sha256(f"opset{OPSET}\0torch{torch.__version__}\0".encode())
    with open(model_dir / "model.safetensors", "rb") as weights:
        for block in iter(lambda: weights.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:24]


def export_onnx(embedder) -> bytes:
    """The embedder's BERT + mean pooling + normalisation as an ONNX graph (dynamic batch and length)."""
    import torch

    class Pipeline(torch.nn.Module):
        def forward(self, ids, mask, types):
            tokens = embedder.encoder(ids, mask, types)
            weights = mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    encodings = embedder.tokenizer.encode_batch(list(_CHECK_TEXTS[:2]))
    sample = tuple(torch.tensor([getattr(e, name) for e in encodings], dtype=torch.long) for name in ("ids", "attention_mask", "type_ids"))
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter: the dynamo one needs onnxscript, which is not a dependency.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Pipeline(),
            sample,
            buffer,
            input_names=list(INPUTS),
            output_names=["embedding"],
            dynamic_axes={**{name: {0: "batch", 1: "tokens"} for name in INPUTS}, "embedding": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    return buffer.getvalue()


class OnnxQueryEncoder:
    """Embeds small batches with onnxruntime; anything larger, or any failure, goes to the torch embedder.

    Exposes the TextEmbedder protocol (name, dimension, embed), so the engine uses it in place of
    the torch embedder; the vectors are the same to float rounding, so an index embedded by torch
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
        import onnxruntime as ort

        model: bytes | None = None
        path = None
        if use_disk_cache:
            path = cache_dir() / f"{_weights_digest(Path(self.embedder.model_dir))}.onnx"
            try:
                model = path.read_bytes()
            except OSError:
                model = None
        fresh = model is None
        if fresh:
            model = export_onnx(self.embedder)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        # Same vectors or nothing: a graph that drifted from the weights must never answer queries.
        expected = self.embedder.embed(list(_CHECK_TEXTS))
        got = np.vstack([self._run(session, [text]) for text in _CHECK_TEXTS])
        difference = float(np.max(np.abs(got - expected)))
        if not difference <= MAX_DIFFERENCE:
            raise RuntimeError(f"ONNX query embeddings differ from torch by {difference:.3g}")
        if fresh and path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".minilm-", dir=path.parent)
                with os.fdopen(fd, "wb") as out:
                    out.write(model)
                os.replace(tmp, path)
            except OSError as exc:
                log.info("ONNX query graph kept in memory only", extra={"error": str(exc)[:200]})
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
