"""Corpus ingestion (folder, parquet of url,caption, WebDataset shards), remote records, and index persistence."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.search.corpus import CorpusError, load_corpus
from services.search.index import ExactCosineIndex, HnswCosineIndex, IndexOptions, build_caption_index
from services.search.index_store import ChainedIndexStore, LocalIndexStore, S3IndexStore
from services.search.ingest import caption_from_name, expand_braces, ingest_folder, ingest_parquet, ingest_webdataset, main, make_id


def image_bytes(fmt: str = "PNG", colour=(200, 30, 30), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


# ---- folder --------------------------------------------------------------------------------------


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    root = tmp_path / "photos"
    (root / "birds").mkdir(parents=True)
    (root / "fruit").mkdir()
    (root / "birds" / "baby_duck-02.jpg").write_bytes(image_bytes("JPEG"))
    (root / "birds" / "IMG_0001.png").write_bytes(image_bytes(colour=(0, 0, 200)))  # no words: folder name
    (root / "fruit" / "a.png").write_bytes(image_bytes(colour=(0, 200, 0)))
    (root / "fruit" / "a.txt").write_text("  a green\n apple on a table ")
    (root / "fruit" / "pear.webp").write_bytes(image_bytes("WEBP"))
    (root / "fruit" / "pear.json").write_text(json.dumps({"caption": "a ripe pear"}))
    (root / "fruit" / "page.jpg").write_text("<html>not an image</html>")  # named .jpg, is HTML
    (root / "fruit" / "vector.svg").write_text("<svg/>")
    (root / ".hidden.png").write_bytes(image_bytes())
    return root


def test_folder_in_place_keeps_images_where_they_are(photo_folder):
    report = ingest_folder(photo_folder)
    assert report.written == 4
    assert report.skipped == {"content_is_not_the_named_format": 1, "not_an_image_extension": 1}
    corpus = load_corpus(photo_folder)
    captions = {r.file: r.caption for r in corpus.records}
    assert captions == {
        "birds/baby_duck-02.jpg": "baby duck",
        "birds/IMG_0001.png": "birds",
        "fruit/a.png": "a green apple on a table",
        "fruit/pear.webp": "a ripe pear",
    }
    assert all(len(r.sha256) == 64 for r in corpus.records)
    # Ingesting again gives the same ids (stable across runs).
    ingest_folder(photo_folder)
    assert [r.id for r in load_corpus(photo_folder).records] == [r.id for r in corpus.records]


def test_folder_to_another_directory_links_or_copies(photo_folder, tmp_path):
    out = tmp_path / "corpus"
    report = ingest_folder(photo_folder, out)
    corpus = load_corpus(out)
    assert report.written == len(corpus) == 4
    assert all(r.file.startswith("images/") and (out / r.file).is_file() for r in corpus.records)


def test_caption_from_name_and_ids():
    assert caption_from_name("Red_Apple-02_final") == "red apple"
    assert caption_from_name("DSC_0042") == ""
    assert make_id("baby duck", "birds/baby duck.jpg") != make_id("baby duck", "other/baby duck.jpg")
    assert make_id("..", "x")[0].isalnum()


# ---- parquet --------------------------------------------------------------------------------------


def test_parquet_of_urls_gives_remote_records(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "url": ["https://img.example/duck.jpg", "ftp://img.example/x.jpg", "https://img.example/duck.jpg", "https://img.example/owl.png", None],
            "caption": ["a baby duck", "ftp is not fetched", "a duplicate", "  ", "no url"],
            "similarity": [0.3, 0.2, 0.1, 0.0, 0.0],
        }
    )
    pq.write_table(table, tmp_path / "part-0.parquet")
    report = ingest_parquet([tmp_path / "part-0.parquet"], tmp_path / "corpus", batch_rows=2)
    assert report.written == 1 and report.skipped == {"bad_url": 2, "duplicate_url": 1, "no_caption": 1}
    [record] = load_corpus(tmp_path / "corpus").records
    assert record.is_remote and record.url == "https://img.example/duck.jpg" and record.file == ""
    with pytest.raises(ValueError, match="no column 'text'"):
        ingest_parquet([tmp_path / "part-0.parquet"], tmp_path / "other", caption_col="text")


def test_remote_record_validation(tmp_path):
    lines = [
        {"id": "a", "url": "https://x.example/a.png", "caption": "fine"},
        {"id": "b", "url": "javascript:alert(1)", "caption": "bad scheme"},
        {"id": "c", "file": "c.png", "url": "https://x.example/c.png", "caption": "both"},
        {"id": "d", "caption": "neither"},
    ]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(CorpusError) as error:
        load_corpus(tmp_path)
    text = str(error.value)
    assert "corpus.jsonl:2: url: must be an http(s) URL" in text
    assert "corpus.jsonl:3: file: exactly one of file and url" in text and "corpus.jsonl:4: file: exactly one" in text
    assert "corpus.jsonl:1" not in text


# ---- WebDataset -----------------------------------------------------------------------------------


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as shard:
        for number, sample in enumerate(samples):
            for extension, data in sample.items():
                info = tarfile.TarInfo(f"{number:06d}.{extension}")
                info.size = len(data)
                shard.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path):
    write_shard(tmp_path / "shard-000.tar", [{"jpg": image_bytes("JPEG"), "txt": b"a red square"}, {"png": image_bytes(), "json": b'{"caption": "a small red square"}'}])
    write_shard(
        tmp_path / "shard-001.tar",
        [{"txt": b"caption without image"}, {"jpg": b"<html>", "txt": b"html named jpg"}, {"webp": image_bytes("WEBP"), "txt": b""}],
    )
    report = ingest_webdataset([str(tmp_path / "shard-{000..001}.tar")], tmp_path / "corpus")
    assert report.written == 2
    assert report.skipped == {"no_image": 1, "content_is_not_the_named_format": 1, "no_caption": 1}
    corpus = load_corpus(tmp_path / "corpus")
    assert sorted(r.caption for r in corpus.records) == ["a red square", "a small red square"]
    assert expand_braces("s-{08..10}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar"]
    with pytest.raises(ValueError, match="shards not found"):
        ingest_webdataset([str(tmp_path / "missing-{0..1}.tar")], tmp_path / "x")


def test_cli_reports_counts(photo_folder, capsys):
    assert main(["folder", str(photo_folder)]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 4
    assert main(["webdataset", "/nonexistent/{0..1}.tar", "/tmp/out-never"]) == 2


# ---- index persistence ----------------------------------------------------------------------------


class DictObjectStore:
    """ObjectStore's get_or_none / put_bytes over a dict, counting calls."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.gets = 0

    def get_or_none(self, bucket, key):
        self.gets += 1
        return self.objects.get(f"{bucket}/{key}")

    def put_bytes(self, bucket, key, data, content_type="application/octet-stream", metadata=None):
        self.objects[f"{bucket}/{key}"] = bytes(data)


class FakeEmbedder:
    name, dimension = "fake", 8

    def __init__(self) -> None:
        self.calls = 0

    def embed(self, texts):
        self.calls += 1
        rng = np.random.default_rng(len(texts))
        vectors = rng.normal(size=(len(texts), self.dimension)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture
def folder_corpus(photo_folder):
    ingest_folder(photo_folder)
    return load_corpus(photo_folder)


def test_s3_store_persists_versions_and_reloads_without_embedding(folder_corpus):
    objects = DictObjectStore()
    embedder = FakeEmbedder()
    first = build_caption_index("photos", folder_corpus, embedder, S3IndexStore(objects, "iex"))
    assert embedder.calls == 1
    keys = sorted(objects.objects)
    assert keys == [f"iex/search/indices/photos/{first.digest}/{name}" for name in ("embeddings.npy", "meta.json")]
    again = build_caption_index("photos", folder_corpus, embedder, S3IndexStore(objects, "iex"))
    assert embedder.calls == 1 and np.array_equal(first.vectors.vectors, again.vectors.vectors)
    # Without its meta.json (written last) a version does not exist.
    del objects.objects[f"iex/search/indices/photos/{first.digest}/meta.json"]
    build_caption_index("photos", folder_corpus, embedder, S3IndexStore(objects, "iex"))
    assert embedder.calls == 2


def test_chained_store_backfills_the_local_cache(folder_corpus, tmp_path):
    objects = DictObjectStore()
    embedder = FakeEmbedder()
    build_caption_index("photos", folder_corpus, embedder, S3IndexStore(objects, "iex"))
    chained = ChainedIndexStore([LocalIndexStore(tmp_path / "cache"), S3IndexStore(objects, "iex")])
    build_caption_index("photos", folder_corpus, embedder, chained)
    assert embedder.calls == 1 and len(list((tmp_path / "cache" / "photos").glob("*/embeddings.npy"))) == 1
    gets = objects.gets
    build_caption_index("photos", folder_corpus, embedder, chained)
    assert objects.gets == gets and embedder.calls == 1  # served locally now


def test_broken_stores_only_cost_an_embedding(folder_corpus, tmp_path):
    class Broken:
        def get_or_none(self, bucket, key):
            raise OSError("s3 away")

        def put_bytes(self, *args, **kwargs):
            raise OSError("s3 away")

    embedder = FakeEmbedder()
    index = build_caption_index("photos", folder_corpus, embedder, S3IndexStore(Broken(), "iex"))
    assert embedder.calls == 1 and len(index) == len(folder_corpus)


def test_hnsw_graph_is_persisted_and_agrees_with_exact_search(folder_corpus):
    objects = DictObjectStore()
    embedder = FakeEmbedder()
    options = IndexOptions(index_type="hnsw", hnsw_m=8, hnsw_ef_construction=16, hnsw_ef_search=16)
    built = build_caption_index("photos", folder_corpus, embedder, S3IndexStore(objects, "iex"), options=options)
    assert isinstance(built.vectors, HnswCosineIndex)
    assert any(key.endswith("hnsw-m8-efc16.faiss") for key in objects.objects)
    reloaded = build_caption_index("photos", folder_corpus, embedder, S3IndexStore(objects, "iex"), options=options)
    exact = ExactCosineIndex(built.vectors.vectors)
    query = embedder.embed(["q"])[0]
    for searcher in (built.vectors, reloaded.vectors):
        assert searcher.search(query, 3)[1].tolist() == exact.search(query, 3)[1].tolist()
    assert IndexOptions("auto").kind_for(10) == "flat" and IndexOptions("auto").kind_for(10**6) == "hnsw"


def test_hnsw_at_scale_has_high_recall():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    exact, graph = ExactCosineIndex(vectors), HnswCosineIndex(vectors, m=16, ef_construction=64, ef_search=64)
    recalls = []
    for query in vectors[:50] + 0.05 * rng.normal(size=(50, 32)).astype(np.float32):
        truth = set(exact.search(query, 20)[1].tolist())
        recalls.append(len(truth & set(graph.search(query, 20)[1].tolist())) / 20)
    assert np.mean(recalls) > 0.9


def test_remote_records_are_answered_with_their_own_url_and_never_served(photo_folder, tmp_path):
    import http.client

    from services.common.metrics import Metrics
    from services.search.corpus import CorpusRecord, write_corpus
    from services.search.engine import SearchEngine, SearchMetrics
    from services.search.web import SearchHttpServer

    records = [
        CorpusRecord(id="local-1", file="birds/baby_duck-02.jpg", caption="a baby duck"),
        CorpusRecord(id="remote-1", file="", url="https://img.example/owl.jpg", caption="an owl at night"),
    ]
    write_corpus(photo_folder, records)
    embedder = FakeEmbedder()
    index = build_caption_index("mixed", load_corpus(photo_folder), embedder)
    engine = SearchEngine({"mixed": index}, "mixed", embedder, "http://search.test", SearchMetrics(Metrics("search")))
    hits = {h.id: h.url for h in engine.search("anything", 10)}
    assert hits == {"local-1": "http://search.test/images/local-1", "remote-1": "https://img.example/owl.jpg"}
    server = SearchHttpServer(engine, "127.0.0.1", 0)
    server.start()
    try:
        for image_id, expected in (("local-1", 200), ("remote-1", 404)):
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            connection.request("GET", f"/images/{image_id}")
            assert connection.getresponse().status == expected
            connection.close()
    finally:
        server.stop()
