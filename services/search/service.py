"""The search service: gRPC `iex.v1.SearchService` plus the HTTP server of web.py, over one corpus.

It consumes no topics. On start it loads the corpus (failing fast on a bad one), loads MiniLM once,
reloads the persisted index (local cache, then S3) or embeds the distinct captions and persists
them, and starts HTTP; gRPC comes up after.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import grpc

from iex.v1 import search_pb2, search_pb2_grpc
from services.common.endpoints import LOOPBACK, SERVICE_PORTS
from services.common.kafka import Handler
from services.common.service import Check, Service
from services.common.settings import ServiceSettings, SettingsError, env_name, setting
from services.search.corpus import CORPUS_FILE, CorpusError, load_corpus
from services.search.engine import InvalidQuery, SearchEngine, SearchMetrics, UnknownIndex
from services.search.index import AUTO_HNSW_THRESHOLD, INDEX_TYPES, IndexOptions, build_caption_index, shared_minilm
from services.search.query_encoder import OnnxQueryEncoder
from services.search.index_store import DEFAULT_S3_PREFIX, ChainedIndexStore, IndexStore, LocalIndexStore, S3IndexStore
from services.search.web import SearchHttpServer


log = logging.getLogger(__name__)

INDEX_CACHE_SUBDIR = ".iex-index"


@dataclass(frozen=True, kw_only=True)
class SearchSettings(ServiceSettings):
    search_corpus_dir: str = setting(help=f"directory holding {CORPUS_FILE} and the images it names")
    search_http_port: int = setting(SERVICE_PORTS["search"].http, help="HTTP port for /images, /knn-service and /indices-list", minimum=0, maximum=65535)
    search_public_base_url: str = setting("", help="base of image URLs in results, as clients reach this service; empty: http://127.0.0.1:<http port>")
    search_default_index: str = setting("offline-web", help="name of the corpus index; requests with an empty indice_name use it")
    search_index_cache_dir: str = setting("", help=f"where caption embeddings are cached between starts on this machine; empty: <corpus dir>/{INDEX_CACHE_SUBDIR}; 'off' disables")
    search_index_s3: bool = setting(True, help="persist the index (embeddings and any HNSW graph) in S3 and reload it from there on start, so new replicas and restarts skip embedding")
    search_index_s3_prefix: str = setting(DEFAULT_S3_PREFIX, help="key prefix of persisted indices in IEX_S3_BUCKET (<prefix>/<index>/<digest>/...)")
    search_index_type: str = setting("auto", help=f"flat: exact search; hnsw: faiss HNSW graph (approximate, for millions of captions); auto: hnsw above {AUTO_HNSW_THRESHOLD} distinct captions", choices=INDEX_TYPES)
    search_hnsw_m: int = setting(32, help="HNSW graph degree (more: better recall, more memory)", minimum=4, maximum=256)
    search_hnsw_ef_construction: int = setting(80, help="HNSW build-time search depth", minimum=8, maximum=2048)
    search_hnsw_ef_search: int = setting(128, help="HNSW query-time search depth (raised to num_images when larger)", minimum=8, maximum=4096)
    search_query_runtime: str = setting("onnxruntime", help="what embeds queries: onnxruntime (the MiniLM graph exported at start, same vectors, ~2x less CPU per query) or torch", choices=("onnxruntime", "torch"))
    search_torch_threads: int = setting(1, help="threads embedding one query, on either runtime (1 keeps single-query latency low on busy CPUs)", minimum=1, maximum=64)

    def __post_init__(self) -> None:
        corpus_dir = Path(self.search_corpus_dir)
        if not corpus_dir.is_dir():
            raise SettingsError(f"{env_name('search_corpus_dir')}: {self.search_corpus_dir!r} is not a directory")
        if not (corpus_dir / CORPUS_FILE).is_file():
            raise SettingsError(f"{env_name('search_corpus_dir')}: {self.search_corpus_dir!r} has no {CORPUS_FILE}")
        if not self.search_default_index.strip():
            raise SettingsError(f"{env_name('search_default_index')}: must not be empty")

    @property
    def index_cache_dir(self) -> Path | None:
        if self.search_index_cache_dir == "off":
            return None
        return Path(self.search_index_cache_dir) if self.search_index_cache_dir else Path(self.search_corpus_dir) / INDEX_CACHE_SUBDIR


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    def __init__(self, engine: SearchEngine) -> None:
        self.engine = engine

    def Search(self, request: search_pb2.SearchRequest, context: grpc.ServicerContext) -> search_pb2.SearchResponse:
        try:
            hits = self.engine.search(request.text, request.num_images, request.indice_name, deduplicate=True, interface="grpc")
        except InvalidQuery as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except UnknownIndex as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        return search_pb2.SearchResponse(
            results=[search_pb2.SearchResult(id=h.id, url=h.url, caption=h.caption, similarity=h.similarity) for h in hits]
        )

    def DescribeIndex(self, request: search_pb2.DescribeIndexRequest, context: grpc.ServicerContext) -> search_pb2.DescribeIndexResponse:
        try:
            index = self.engine.resolve(request.indice_name)
        except UnknownIndex as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        return search_pb2.DescribeIndexResponse(
            indice_name=index.name, images=len(index), embedder=index.embedder_name, indices=self.engine.index_names()
        )


class SearchService(Service):
    name = "search"
    settings_class = SearchSettings
    # Read by the shared bootstrap once it can skip Kafka for services that neither consume nor publish.
    uses_kafka = False

    def __init__(self, settings: SearchSettings) -> None:
        super().__init__(settings)
        self.settings: SearchSettings = settings
        # Loaded here, before any waiting on infrastructure: a broken corpus is a configuration error.
        try:
            self.corpus = load_corpus(settings.search_corpus_dir)
        except CorpusError as exc:
            raise SettingsError(f"{env_name('search_corpus_dir')}: {exc}") from exc
        self.search_metrics = SearchMetrics(self.metrics)
        self.engine: SearchEngine | None = None
        self.http: SearchHttpServer | None = None

    def handlers(self) -> Mapping[str, Handler]:
        return {}

    def dependencies(self) -> dict[str, Check]:
        return {"s3": self.store.ping}

    def on_start(self) -> None:
        super().on_start()
        if self.engine is None:
            self.engine = self.build_engine()
        if self.http is None:
            self.http = SearchHttpServer(self.engine, self.settings.grpc_host, self.settings.search_http_port)
            # Known only now when the port is 0 (tests); in a cluster the setting names the Service's address.
            self.engine.public_base_url = (self.settings.search_public_base_url or f"http://{LOOPBACK}:{self.http.port}").rstrip("/")
            self.http.start()

    def index_store(self) -> IndexStore | None:
        """Local cache first (fast), then S3 (shared by replicas, survives the machine)."""
        stores: list[IndexStore] = []
        cache_dir = self.settings.index_cache_dir
        if cache_dir:
            stores.append(LocalIndexStore(cache_dir))
        if self.settings.search_index_s3:
            stores.append(S3IndexStore(self.store, self.settings.s3_bucket, self.settings.search_index_s3_prefix))
        if not stores:
            return None
        return stores[0] if len(stores) == 1 else ChainedIndexStore(stores)

    def build_engine(self) -> SearchEngine:
        import torch

        embedder = shared_minilm()
        s = self.settings
        options = IndexOptions(s.search_index_type, s.search_hnsw_m, s.search_hnsw_ef_construction, s.search_hnsw_ef_search)
        # Embedding the corpus is one big batch job: all cores. Queries then run on few threads each.
        index = build_caption_index(s.search_default_index, self.corpus, embedder, self.index_store(), options=options)
        torch.set_num_threads(self.settings.search_torch_threads)
        query_embedder = embedder
        if s.search_query_runtime == "onnxruntime":
            query_embedder = OnnxQueryEncoder(embedder, threads=s.search_torch_threads)
            log.info("query embedding ready", extra={"runtime": query_embedder.runtime, "seconds": round(query_embedder.load_seconds, 2)})
        return SearchEngine({index.name: index}, index.name, query_embedder, self.settings.search_public_base_url, self.search_metrics)

    def register(self, server: grpc.Server) -> list[str]:
        assert self.engine is not None, "on_start builds the engine before the server is created"
        search_pb2_grpc.add_SearchServiceServicer_to_server(SearchServicer(self.engine), server)
        return [search_pb2.DESCRIPTOR.services_by_name["SearchService"].full_name]

    def on_stop(self) -> None:
        if self.http is not None:
            self.http.stop()
            self.http = None
