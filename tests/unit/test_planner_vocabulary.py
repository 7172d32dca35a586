"""Vocabularies and their embedding cache: computed once, then read from the local disk or S3 (in-memory fake)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from services.common.errors import DependencyUnavailable
from services.common.settings import load
from services.planner import vocabulary as v


class FakeStore:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.down = False

    def get_or_none(self, bucket, key):
        if self.down:
            raise DependencyUnavailable("s3 away")
        return self.objects.get(key)

    def put_bytes(self, bucket, key, data, content_type="application/octet-stream", metadata=None):
        if self.down:
            raise DependencyUnavailable("s3 away")
        self.objects[key] = bytes(data)

    def put_json(self, bucket, key, value):
        import json

        self.put_bytes(bucket, key, json.dumps(value).encode())


class CountingEmbedder:
    """Deterministic unit vectors per text; counts how many texts it embedded."""

    def __init__(self) -> None:
        self.calls = 0
        self.texts = 0
        self.lock = threading.Lock()

    def __call__(self, texts):
        with self.lock:
            self.calls += 1
            self.texts += len(texts)
        out = np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=v.EMBEDDING_DIMENSION) for t in texts]).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_custom_vocabulary_keys_are_unique_and_digest_follows_texts():
    a = v.custom_vocabulary(["red circle", "blue square", "red circle", " "])
    assert a.keys == ["red circle", "blue square"] and a.names == a.keys == a.texts
    assert a.digest == v.custom_vocabulary(["red circle", "blue square"]).digest
    assert a.digest != v.custom_vocabulary(["blue square", "red circle"]).digest


def test_wordnet_keys_are_readable_and_unique():
    assert v.wordnet_key("dog", 2084071) == "dog.n02084071"


def test_embeddings_are_computed_once_then_served_from_disk_and_s3(tmp_path):
    store, embed = FakeStore(), CountingEmbedder()
    vocab = v.custom_vocabulary([f"concept {i}" for i in range(300)])
    ready = []
    cache = v.EmbeddingCache(store, "iex", cache_dir=tmp_path / "a", embed=embed, on_ready=ready.append)
    first = cache.get(vocab, timeout_s=30)
    assert first.shape == (300, 384) and first.dtype == np.float32
    assert embed.texts == 300 and cache.jobs[vocab.digest].source == "computed" and ready == [vocab.digest]
    # Rows follow the vocabulary order even though the build sorts texts by length.
    np.testing.assert_allclose(first[17], embed(["concept 17"])[0], atol=1e-6)
    assert f"vocabularies/{vocab.digest}/embeddings.npy" in store.objects and f"vocabularies/{vocab.digest}/meta.json" in store.objects

    # A new process with the same local cache: read from disk, nothing embedded.
    again = v.EmbeddingCache(store, "iex", cache_dir=tmp_path / "a", embed=embed)
    np.testing.assert_array_equal(again.get(vocab, timeout_s=30), first)
    assert again.jobs[vocab.digest].source == "disk" and embed.texts == 300 + 1

    # Another machine (empty disk): read from S3 and mirrored locally.
    other = v.EmbeddingCache(store, "iex", cache_dir=tmp_path / "b", embed=embed)
    np.testing.assert_array_equal(other.get(vocab, timeout_s=30), first)
    assert other.jobs[vocab.digest].source == "s3" and (tmp_path / "b" / vocab.digest / "embeddings.npy").is_file()


def test_a_cache_without_an_object_store_keeps_to_memory_and_disk(tmp_path):
    embed = CountingEmbedder()
    vocab = v.custom_vocabulary([f"concept {i}" for i in range(20)])
    first = v.EmbeddingCache(None, "", cache_dir=tmp_path, embed=embed).get(vocab, timeout_s=30)
    again = v.EmbeddingCache(None, "", cache_dir=tmp_path, embed=embed)
    np.testing.assert_array_equal(again.get(vocab, timeout_s=30), first)
    assert embed.texts == 20 and again.jobs[vocab.digest].source == "disk"


def test_request_does_not_block_and_reports_progress(tmp_path):
    gate = threading.Event()

    def slow_embed(texts):
        gate.wait(10)
        return CountingEmbedder()(texts)

    cache = v.EmbeddingCache(FakeStore(), "iex", cache_dir=tmp_path, embed=slow_embed)
    vocab = v.custom_vocabulary(["a", "b", "c"])
    began = time.monotonic()
    job = cache.request(vocab)
    assert time.monotonic() - began < 1.0
    deadline = time.monotonic() + 5
    while job.state != "embedding" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.state == "embedding" and "embedding the vocabulary" in job.describe()
    assert cache.request(vocab) is job  # one build per digest
    gate.set()
    assert cache.get(vocab, timeout_s=10).shape == (3, 384)


def test_a_computed_build_reports_its_progress_to_the_total(tmp_path, monkeypatch):
    monkeypatch.setattr(v, "EMBED_CHUNK", 100)
    calls: list[tuple[int, int]] = []
    cache = v.EmbeddingCache(FakeStore(), "iex", cache_dir=tmp_path, embed=CountingEmbedder(), progress=lambda done, total: calls.append((done, total)))
    cache.get(v.custom_vocabulary([f"c{i}" for i in range(250)]), timeout_s=10)
    assert calls == [(100, 250), (200, 250), (250, 250)]


def test_corrupt_cache_is_recomputed_and_s3_outage_only_costs_the_upload(tmp_path):
    store, embed = FakeStore(), CountingEmbedder()
    vocab = v.custom_vocabulary(["x", "y"])
    path = tmp_path / vocab.digest / "embeddings.npy"
    path.parent.mkdir(parents=True)
    np.save(path, np.zeros((5, 384), np.float32))  # wrong shape: not this vocabulary
    store.down = True
    cache = v.EmbeddingCache(store, "iex", cache_dir=tmp_path, embed=embed)
    assert cache.get(vocab, timeout_s=10).shape == (2, 384)
    assert cache.jobs[vocab.digest].source == "computed" and embed.texts == 2
    assert np.load(path).shape == (2, 384)


def test_failed_builds_are_reported(tmp_path):
    def broken(texts):
        raise RuntimeError("model missing")

    cache = v.EmbeddingCache(FakeStore(), "iex", cache_dir=tmp_path, embed=broken)
    with pytest.raises(RuntimeError, match="model missing"):
        cache.get(v.custom_vocabulary(["q"]), timeout_s=10)
    assert "failed" in cache.jobs[v.custom_vocabulary(["q"]).digest].describe()


def test_wordnet_concepts_are_embedded_as_their_name_or_the_papers_definition_text(tmp_path, monkeypatch):
    # A two-synset WordNet: apple (fruit) under its hypernym "edible fruit".
    lines = ["  1 a tiny WordNet for tests",
             "07705931 13 n 01 edible_fruit 0 000 | edible reproductive body of a seed plant  ",
             "07739125 13 n 01 apple 0 001 @ 07705931 n 0000 | fruit with red or yellow or green skin  "]
    (tmp_path / "data.noun").write_text("\n".join(lines) + "\n")
    (tmp_path / "index.noun").write_text("  1 index\napple n 1 1 @ 1 0 07739125  \nedible_fruit n 1 1 @ 1 0 07705931  \n")
    by_name = v.wordnet_vocabulary(tmp_path, concept_text=v.NAME)
    by_definition = v.wordnet_vocabulary(tmp_path, concept_text=v.DEFINITION)
    apple = by_name.index["apple.n07739125"]
    assert by_name.keys == by_definition.keys and by_name.names == by_definition.names
    assert by_name.texts[apple] == "apple"
    assert by_definition.texts[apple] == "apple (edible fruit): fruit with red or yellow or green skin."
    assert by_name.digest != by_definition.digest  # two caches, never one read as the other
    with pytest.raises(ValueError, match="concept_text"):
        v.wordnet_vocabulary(tmp_path, concept_text="gloss")
    # What the cache builders (`vocabulary build`, the main job) read: the planner's own setting.
    def configured() -> str:
        return load(v.VocabularySettings).planner_concept_text

    monkeypatch.setenv("IEX_PLANNER_CONCEPT_TEXT", "gloss")
    with pytest.raises(ValueError, match="IEX_PLANNER_CONCEPT_TEXT"):
        configured()
    monkeypatch.setenv("IEX_PLANNER_CONCEPT_TEXT", "definition")
    assert configured() == v.DEFINITION == v.PAPER_CONCEPT_TEXT
    monkeypatch.delenv("IEX_PLANNER_CONCEPT_TEXT")
    assert configured() == v.PROJECT_CONCEPT_TEXT == v.NAME
