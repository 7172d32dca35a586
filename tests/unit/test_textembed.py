"""Bulk text embedding: length-sorted batches on onnxruntime give the reference vectors in input order."""

from __future__ import annotations

import numpy as np
import pytest

from services.common import textembed
from services.common.textembed import MiniLMEmbedder, ProgressLine, shared_minilm

# Lengths from 1 to ~300 tokens (truncated at 256), in no particular order, with a repeat and an empty text.
TEXTS = [
    "dog (canine): a member of the genus Canis that has been domesticated by man since prehistoric times.",
    "a",
    "word " * 300,
    "red circle",
    "naïve café in Zürich, 1999 — photo",
    "",
    "red circle",
    "apple (edible fruit): fruit with red or yellow or green skin and sweet to tart crisp whitish flesh.",
    "Blue SQUARE drawing!",
    "baby duck",
]


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return shared_minilm()


def reference(embedder: MiniLMEmbedder, texts: list[str], batch_size: int = 3) -> np.ndarray:
    """The embedder as it was before bulk embedding: input-order batches padded by the tokenizer, torch."""
    import torch

    out = []
    for start in range(0, len(texts), batch_size):
        encodings = embedder.tokenizer.encode_batch(texts[start : start + batch_size])
        ids, mask, types = (torch.tensor([getattr(e, n) for e in encodings], dtype=torch.long) for n in ("ids", "attention_mask", "type_ids"))
        with torch.inference_mode():
            out.append(textembed._pool(embedder.encoder(ids, mask, types), mask).numpy())
    return np.vstack(out)


def test_sorted_batches_give_the_reference_vectors_in_input_order(embedder):
    expected = reference(embedder, TEXTS)
    small_batches = MiniLMEmbedder(batch_size=4)  # several batches, each a different length
    for got in (embedder.embed(TEXTS), embedder.embed_torch(TEXTS), small_batches.embed(TEXTS)):
        assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
        assert np.abs(got - expected).max() < 1e-5
    # Each row is its own text's vector: alone, or anywhere in a shuffled list.
    alone = np.vstack([embedder.embed([t]) for t in TEXTS])
    assert np.abs(embedder.embed(TEXTS) - alone).max() < 1e-5
    order = np.random.default_rng(0).permutation(len(TEXTS))
    shuffled = small_batches.embed([TEXTS[i] for i in order])
    assert np.abs(shuffled - expected[order]).max() < 1e-5
    assert np.allclose(np.linalg.norm(expected, axis=1), 1.0, atol=1e-5)


def test_bulk_embedding_runs_on_onnxruntime_with_torch_as_reference(embedder):
    assert embedder.prepare().startswith("onnxruntime") and embedder.runtime == "onnxruntime"
    assert np.abs(embedder.embed(TEXTS) - embedder.embed_torch(TEXTS)).max() < 1e-5
    assert embedder.embed([]).shape == (0, 384)


def test_progress_reaches_the_total_and_prints_a_line_per_tenth(embedder):
    texts = [f"concept number {i} " + "x " * (i % 17) for i in range(50)]
    calls: list[tuple[int, int]] = []
    MiniLMEmbedder(batch_size=4, runtime="torch").embed(texts, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (50, 50) and [d for d, _ in calls] == sorted(d for d, _ in calls) and len(calls) == 13
    lines: list[str] = []
    line = ProgressLine(lines.append, "embedding")
    for done, total in calls:
        line(done, total)
    assert 5 <= len(lines) <= 10 and lines[-1].startswith("embedding: 100% (50/50")


def test_runtime_setting_is_validated_and_torch_can_be_forced(monkeypatch):
    assert textembed.runtime_setting({}) == "auto"
    assert textembed.runtime_setting({"IEX_TEXT_EMBED_RUNTIME": "Torch"}) == "torch"
    with pytest.raises(ValueError, match="IEX_TEXT_EMBED_RUNTIME"):
        textembed.runtime_setting({"IEX_TEXT_EMBED_RUNTIME": "tensorflow"})
    monkeypatch.setenv("IEX_TEXT_EMBED_RUNTIME", "torch")
    forced = MiniLMEmbedder()
    assert forced.prepare() == "torch" and forced.runtime == "torch"


def test_a_bad_graph_falls_back_to_torch_or_fails_when_onnxruntime_is_required(embedder, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(textembed, "export_onnx", lambda _e: b"not an onnx graph")
    auto = MiniLMEmbedder(runtime="auto")
    assert auto.prepare() == "torch"
    assert np.abs(auto.embed(TEXTS[:3]) - embedder.embed_torch(TEXTS[:3])).max() < 1e-6
    required = MiniLMEmbedder(runtime="onnxruntime")
    for _ in range(2):  # every call, not only the first, refuses to fall back
        with pytest.raises(RuntimeError, match="IEX_TEXT_EMBED_RUNTIME=onnxruntime"):
            required.embed(["baby duck"])
