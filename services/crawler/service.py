"""The crawler service: QueryIssued -> search -> concurrent safe downloads -> S3 staging -> ImageFetched + QueryCrawled."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import urlsplit

import grpc

from iex.v1 import crawler_pb2, crawler_pb2_grpc, events_pb2
from services.common import topics
from services.common import endpoints
from services.common.errors import DependencyUnavailable, PermanentError
from services.common.kafka import EventContext, Handler, now_timestamp
from services.common.objectstore import content_key
from services.common.service import Check, Service
from services.common.settings import ServiceSettings, SettingsError, setting
from services.crawler import status
from services.crawler.addresses import parse_networks
from services.crawler.backends import (
    BackendRegistry,
    ClipRetrievalBackend,
    SearchBackend,
    SearchCache,
    SearchError,
    SearchFailed,
    SearchHit,
    SearchRejected,
    SearchUnavailable,
    UnknownBackend,
)
from services.crawler.fetch import DEFAULT_USER_AGENT, MAX_URL_LENGTH, BackgroundDownloader, FetchPolicy, FetchResult, url_problem
from services.crawler.images import ImagePolicy
from services.crawler.json_api import JsonApiBackend, JsonApiSpec, parse_header_lines
from services.crawler.openverse import ANONYMOUS_PAGE_SIZE, DEFAULT_OPENVERSE_URL, OpenverseBackend
from services.crawler.persist import S3AnswerStore, S3OutcomeStore
from services.crawler.robots import DEFAULT_NOAI_DIRECTIVES

log = logging.getLogger(__name__)

LOCAL_BACKEND = "local"
CLIP_RETRIEVAL_BACKEND = "clip-retrieval"
OPENVERSE_BACKEND = "openverse"
JSON_BACKEND = "json"
BACKEND_NAMES = (LOCAL_BACKEND, CLIP_RETRIEVAL_BACKEND, OPENVERSE_BACKEND, JSON_BACKEND)
STAGING_PREFIX = "staging"

SIZE_BUCKETS = (1e3, 4e3, 16e3, 64e3, 256e3, 1e6, 4e6, 16e6)
QUERY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class CrawlerSettings(ServiceSettings):
    # ---- downloads --------------------------------------------------------------------------
    crawler_concurrency: int = setting(64, help="images in flight at once (download and decode, all hosts together)", minimum=1, maximum=4096)
    crawler_per_host: int = setting(16, help="downloads in flight at once to one host", minimum=1, maximum=1024)
    crawler_connect_timeout_s: float = setting(5.0, help="seconds to establish one TCP/TLS connection", minimum=0.1)
    crawler_total_timeout_s: float = setting(15.0, help="seconds for the network part of one attempt at a URL (robots.txt, all redirect hops and the body)", minimum=0.1)
    crawler_query_deadline_s: float = setting(
        120.0,
        help="seconds for all downloads of one query; URLs unfinished by then count as timeout (keeps a poll batch under the consumer's max poll interval)",
        minimum=1.0,
        maximum=140.0,
    )
    crawler_max_bytes: int = setting(8 * 1024 * 1024, help="largest response body read; longer bodies are abandoned (too_large)", minimum=1024)
    crawler_inline_max_bytes: int = setting(
        256 * 1024,
        help="images up to this size travel inside their ImageFetched event instead of a staging object in S3 (Kafka holds them until dedup decides; the persisted crawl outcome for redeliveries); larger ones are staged. 0: stage every image. Capped at half of IEX_KAFKA_MAX_MESSAGE_BYTES",
        minimum=0,
    )
    crawler_max_bytes_in_flight: int = setting(
        256 * 1024 * 1024,
        help="response bytes held in memory at once by all downloads (bodies read or being decoded); a body without Content-Length is charged crawler_max_bytes. Must be >= crawler_max_bytes",
        minimum=1024,
    )
    crawler_retries: int = setting(2, help="further attempts at a URL after a transient failure (connection reset, 408, 429, 5xx); never after 404, not_image, too_large, blocked_address or a timeout", minimum=0, maximum=10)
    crawler_retry_backoff_s: float = setting(0.5, help="seconds before the first retry of a URL, doubled for each next one (with jitter)", minimum=0.0)
    crawler_retry_backoff_max_s: float = setting(8.0, help="longest wait before a retry; a server asking (Retry-After) for longer is not retried", minimum=0.0)
    crawler_max_pixels: int = setting(40_000_000, help="largest width*height announced by an image header (decompression-bomb guard)", minimum=1)
    crawler_min_side: int = setting(32, help="smallest accepted width or height in pixels (too_small)", minimum=1)
    crawler_max_aspect: float = setting(4.0, help="largest accepted long side / short side (bad_aspect)", minimum=1.0)
    crawler_max_side: int = setting(256, help="longest side of the staged image; larger images are downscaled and re-encoded (PNG stays PNG, JPEG stays JPEG)", minimum=16, maximum=4096)
    crawler_jpeg_quality: int = setting(90, help="JPEG quality of re-encoded (downscaled) JPEGs", minimum=30, maximum=100)
    crawler_max_redirects: int = setting(5, help="redirect hops followed, each re-checked (redirect_loop beyond)", minimum=0, maximum=20)
    crawler_allow_networks: tuple[str, ...] = setting(
        (),
        help="CIDRs the crawler may fetch from although they are not public (loopback, private, link-local); empty refuses them all. The local stack sets 127.0.0.0/8",
    )
    crawler_user_agent: str = setting(DEFAULT_USER_AGENT, help="User-Agent sent with every download; its product token (before '/') is the name robots.txt and X-Robots-Tag rules are matched against")
    crawler_respect_robots: bool = setting(True, help="honour robots.txt (RFC 9309) of every origin fetched from (status robots); turn off only for your own servers")
    crawler_robots_ttl_s: float = setting(3600.0, help="seconds a robots.txt answer is reused for its origin", minimum=0.0)
    crawler_noai_directives: tuple[str, ...] = setting(
        DEFAULT_NOAI_DIRECTIVES,
        help="X-Robots-Tag directives that refuse an image (status noai), comma separated; add noindex,noimageindex to match img2dataset's defaults; empty ignores the header",
    )
    crawler_decode_workers: int = setting(2, help="threads (or processes) decoding and resizing images: decoding is the CPU cost of crawling", minimum=1, maximum=64)
    crawler_decode_processes: bool = setting(False, help="decode in worker processes instead of threads (Pillow releases the GIL while decoding, so threads are usually enough)")
    crawler_s3_workers: int = setting(8, help="threads writing staged images to S3 in parallel", minimum=1, maximum=64)
    crawler_persist_outcomes: bool = setting(
        True,
        help="write each query's events to S3 (crawler/outcomes/) before publishing them, so a query redelivered to any replica republishes the same events instead of crawling again",
    )
    # ---- search backends ----------------------------------------------------------------------
    crawler_local_search_url: str = setting(f"http://{endpoints.LOOPBACK}:{endpoints.SERVICE_PORTS['search'].http}", help="base URL of the offline-web search service (backend 'local'; POST <url>/knn-service)")
    crawler_local_search_indice: str = setting("", help="indice_name sent to the local search service; empty means its default index")
    crawler_clip_retrieval_url: str = setting("", help="base URL of a clip-retrieval back end (backend 'clip-retrieval'); empty disables it")
    crawler_clip_retrieval_indice: str = setting("laion5B-L-14", help="indice_name sent to the clip-retrieval back end")
    crawler_openverse_url: str = setting("", help=f"base URL of Openverse's API (backend 'openverse'), e.g. {DEFAULT_OPENVERSE_URL}; empty disables it")
    crawler_openverse_client_id: str = setting("", help="Openverse client id (registered applications get larger pages and rate limits); empty: anonymous")
    crawler_openverse_client_secret: str = setting("", help="Openverse client secret, with the client id", secret=True)
    crawler_openverse_page_size: int = setting(ANONYMOUS_PAGE_SIZE, help="results per Openverse page (anonymous clients: at most 20)", minimum=1, maximum=500)
    crawler_openverse_license_type: str = setting("", help="Openverse license_type filter, e.g. 'commercial,modification'; empty: all")
    crawler_openverse_licenses: str = setting("", help="Openverse license filter, e.g. 'cc0,by,by-sa'; empty: all")
    crawler_openverse_thumbnails: bool = setting(False, help="download Openverse's thumbnails instead of the original files")
    crawler_json_url: str = setting("", help="URL template of a generic JSON search API (backend 'json'), with {query} and {num_results}; empty disables it")
    crawler_json_method: str = setting("GET", help="HTTP method of the JSON API", choices=("GET", "POST"))
    crawler_json_body: str = setting("", help='JSON body template for POST, e.g. {"q": "{query}", "limit": "{num_results}"}')
    crawler_json_results_path: str = setting("", help="dotted path to the list of results in the answer ('' = the answer is the list)")
    crawler_json_url_field: str = setting("url", help="dotted path to the image URL inside one result")
    crawler_json_caption_field: str = setting("caption", help="dotted path to the caption inside one result; empty: none")
    crawler_json_score_field: str = setting("", help="dotted path to a relevance score inside one result; empty: the rank decides")
    crawler_json_id_field: str = setting("id", help="dotted path to an identifier inside one result; empty: none")
    crawler_json_headers: str = setting("", help="extra request headers of the JSON API, 'Name: value' separated by ';;' (an API key, for instance)", secret=True)
    crawler_default_backend: str = setting(LOCAL_BACKEND, help="backend used when a query names none", choices=BACKEND_NAMES)
    crawler_search_timeout_s: float = setting(10.0, help="seconds for one search request", minimum=0.1)
    crawler_search_attempts: int = setting(3, help="attempts of one search on transient failures before the query is retried later", minimum=1, maximum=20)
    crawler_default_results: int = setting(100, help="results requested when a query asks for none (the paper uses 100)", minimum=1, maximum=10_000)
    crawler_max_results: int = setting(1000, help="most results requested for one query", minimum=1, maximum=10_000)
    crawler_search_cache_entries: int = setting(4096, help="search answers kept in memory for repeated (backend, text, n) queries; 0 disables the cache", minimum=0)
    crawler_search_cache_ttl_s: float = setting(6 * 3600.0, help="seconds a cached search answer stays valid; 0 keeps it until evicted", minimum=0)
    crawler_search_cache_shared: bool = setting(True, help="also keep search answers in S3 (crawler/search-answers/), shared by every replica and across restarts")
    crawler_replay_memory: int = setting(1024, help="recent crawl outcomes kept in memory to republish identical events when a query is redelivered", minimum=0)

    def __post_init__(self) -> None:
        try:
            parse_networks(self.crawler_allow_networks)
        except ValueError as exc:
            raise SettingsError(f"IEX_CRAWLER_ALLOW_NETWORKS: {exc}") from None
        for name in ("crawler_local_search_url", "crawler_clip_retrieval_url", "crawler_openverse_url", "crawler_json_url"):
            url = getattr(self, name)
            if url and urlsplit(url).scheme not in ("http", "https"):
                raise SettingsError(f"IEX_{name.upper()}: must be an http(s) URL, got {url!r}")
        if self.crawler_max_bytes_in_flight < self.crawler_max_bytes:
            raise SettingsError(f"IEX_CRAWLER_MAX_BYTES_IN_FLIGHT: must be >= IEX_CRAWLER_MAX_BYTES ({self.crawler_max_bytes}), got {self.crawler_max_bytes_in_flight}")
        if bool(self.crawler_openverse_client_id) != bool(self.crawler_openverse_client_secret):
            raise SettingsError("IEX_CRAWLER_OPENVERSE_CLIENT_ID: needs IEX_CRAWLER_OPENVERSE_CLIENT_SECRET too (and the other way round)")
        if self.crawler_json_url:
            if self.crawler_json_body:
                try:
                    json.loads(self.crawler_json_body)
                except ValueError as exc:
                    raise SettingsError(f"IEX_CRAWLER_JSON_BODY: not JSON ({exc})") from None
            try:
                self.json_api_spec()
            except ValueError as exc:
                raise SettingsError(f"IEX_CRAWLER_JSON_URL: {exc}") from None
        enabled = {
            CLIP_RETRIEVAL_BACKEND: self.crawler_clip_retrieval_url,
            OPENVERSE_BACKEND: self.crawler_openverse_url,
            JSON_BACKEND: self.crawler_json_url,
        }
        if self.crawler_default_backend in enabled and not enabled[self.crawler_default_backend]:
            variable = {CLIP_RETRIEVAL_BACKEND: "IEX_CRAWLER_CLIP_RETRIEVAL_URL", OPENVERSE_BACKEND: "IEX_CRAWLER_OPENVERSE_URL", JSON_BACKEND: "IEX_CRAWLER_JSON_URL"}
            raise SettingsError(f"IEX_CRAWLER_DEFAULT_BACKEND: {self.crawler_default_backend} needs {variable[self.crawler_default_backend]}")

    def json_api_spec(self) -> JsonApiSpec:
        return JsonApiSpec(
            url=self.crawler_json_url,
            method=self.crawler_json_method,
            body=json.loads(self.crawler_json_body) if self.crawler_json_body else None,
            results_path=self.crawler_json_results_path,
            url_field=self.crawler_json_url_field,
            caption_field=self.crawler_json_caption_field,
            score_field=self.crawler_json_score_field,
            id_field=self.crawler_json_id_field,
            headers=parse_header_lines(self.crawler_json_headers),
        )

    def fetch_policy(self) -> FetchPolicy:
        return FetchPolicy(
            concurrency=self.crawler_concurrency,
            per_host=self.crawler_per_host,
            connect_timeout_s=self.crawler_connect_timeout_s,
            total_timeout_s=self.crawler_total_timeout_s,
            max_bytes=self.crawler_max_bytes,
            max_bytes_in_flight=self.crawler_max_bytes_in_flight,
            max_redirects=self.crawler_max_redirects,
            retries=self.crawler_retries,
            retry_backoff_s=self.crawler_retry_backoff_s,
            retry_backoff_max_s=self.crawler_retry_backoff_max_s,
            allow_networks=self.crawler_allow_networks,
            user_agent=self.crawler_user_agent,
            respect_robots=self.crawler_respect_robots,
            robots_ttl_s=self.crawler_robots_ttl_s,
            noai_directives=self.crawler_noai_directives,
            decode_workers=self.crawler_decode_workers,
            decode_processes=self.crawler_decode_processes,
            image=ImagePolicy(
                max_pixels=self.crawler_max_pixels,
                min_side=self.crawler_min_side,
                max_aspect=self.crawler_max_aspect,
                max_side=self.crawler_max_side,
                jpeg_quality=self.crawler_jpeg_quality,
            ),
        )


def build_registry(s: CrawlerSettings, shared: S3AnswerStore | None = None) -> BackendRegistry:
    timing = dict(timeout_s=s.crawler_search_timeout_s, attempts=s.crawler_search_attempts)
    backends: dict[str, SearchBackend] = {
        LOCAL_BACKEND: ClipRetrievalBackend(LOCAL_BACKEND, s.crawler_local_search_url, s.crawler_local_search_indice, **timing)
    }
    if s.crawler_clip_retrieval_url:
        backends[CLIP_RETRIEVAL_BACKEND] = ClipRetrievalBackend(CLIP_RETRIEVAL_BACKEND, s.crawler_clip_retrieval_url, s.crawler_clip_retrieval_indice, **timing)
    if s.crawler_openverse_url:
        backends[OPENVERSE_BACKEND] = OpenverseBackend(
            OPENVERSE_BACKEND,
            s.crawler_openverse_url,
            client_id=s.crawler_openverse_client_id,
            client_secret=s.crawler_openverse_client_secret,
            page_size=s.crawler_openverse_page_size,
            license_type=s.crawler_openverse_license_type,
            licenses=s.crawler_openverse_licenses,
            use_thumbnails=s.crawler_openverse_thumbnails,
            **timing,
        )
    if s.crawler_json_url:
        backends[JSON_BACKEND] = JsonApiBackend(JSON_BACKEND, s.json_api_spec(), **timing)
    cache = SearchCache(s.crawler_search_cache_entries, s.crawler_search_cache_ttl_s)
    return BackendRegistry(backends, s.crawler_default_backend, cache, shared)


@dataclass(frozen=True)
class CrawlOutcome:
    """What one query produced, enough to publish its events again without searching or downloading."""

    fetched: tuple[events_pb2.ImageFetched, ...]
    crawled: events_pb2.QueryCrawled

    @property
    def carries_bytes(self) -> bool:
        """Some images travel only inside their events (never staged): the persisted record holds them."""
        return any(event.data for event in self.fetched)


class ReplayMemory:
    """Recent crawl outcomes by query: a redelivered query republishes exactly the same events.

    The in-memory front of S3OutcomeStore (persist.py), which makes the same true across replicas
    and restarts; with outcomes not persisted, a redelivery after a restart crawls again.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], CrawlOutcome] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> CrawlOutcome | None:
        with self._lock:
            outcome = self._entries.get(key)
            if outcome is not None:
                self._entries.move_to_end(key)
            return outcome

    def put(self, key: tuple[str, str], outcome: CrawlOutcome) -> None:
        if self.max_entries <= 0:
            return
        with self._lock:
            self._entries[key] = outcome
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


class CrawlerService(Service):
    name = "crawler"
    settings_class = CrawlerSettings
    # A query may take crawler_query_deadline_s (140 s at most) plus search retries and S3 writes;
    # two per poll keep a batch well inside the poll interval, so the group never evicts a busy crawler.
    max_poll_records = 2
    max_poll_interval_ms = 600_000

    def __init__(self, settings: CrawlerSettings) -> None:
        super().__init__(settings)
        self.settings: CrawlerSettings = settings
        self.registry = build_registry(settings)
        self.downloader = BackgroundDownloader(settings.fetch_policy())
        self.replay = ReplayMemory(settings.crawler_replay_memory)
        self._answers: S3AnswerStore | None = None
        self._outcomes: S3OutcomeStore | None = None
        self._s3_pool = ThreadPoolExecutor(max_workers=settings.crawler_s3_workers, thread_name_prefix="crawler-s3")
        self._totals_lock = threading.Lock()
        self._queries_crawled = 0
        self._images_fetched = 0
        self._refused: Counter[str] = Counter()

        m = self.metrics
        self.urls_total = m.counter("urls_total", "URLs fetched, by outcome (ok or a bounded refusal reason)", ["status"])
        self.downloaded_bytes = m.counter("downloaded_bytes_total", "Bytes read from the network, whatever the outcome")
        self.staged_bytes = m.histogram("staged_image_size_bytes", "Size of staged images", buckets=SIZE_BUCKETS)
        self.fetch_seconds = m.histogram("fetch_duration_seconds", "Time to fetch, check and resize one URL", ["outcome"])
        self.queries_crawled = m.counter("queries_crawled_total", "Queries crawled, by search backend", ["backend"])
        self.query_seconds = m.histogram("query_duration_seconds", "Time to crawl one query (search, downloads, staging)", buckets=QUERY_BUCKETS)
        self.search_requests = m.counter("search_requests_total", "Search requests, by backend and outcome", ["backend", "outcome"])
        self.search_seconds = m.histogram("search_duration_seconds", "Time of one search request that reached the backend", ["backend"])
        self.staged_objects = m.counter("staged_objects_total", "Staging writes, by outcome (written, existing)", ["outcome"])
        self.replayed = m.counter("queries_replayed_total", "Redelivered queries answered from a recorded outcome instead of crawling again", ["source"])
        self.in_flight_gauge = m.gauge("fetches_in_flight", "Downloads in flight")
        self.in_flight_gauge.set_function(lambda: self.downloader.in_flight)
        self.bytes_in_flight_gauge = m.gauge("fetch_bytes_in_flight", "Response bytes reserved by downloads in flight (capped by IEX_CRAWLER_MAX_BYTES_IN_FLIGHT)")
        self.bytes_in_flight_gauge.set_function(lambda: self.downloader.bytes_in_flight)
        self.retries_counter = m.counter("fetch_retries_total", "Further attempts at URLs after transient failures")
        self.robots_counter = m.counter("robots_fetches_total", "robots.txt requests sent (one per origin and expiry)")
        self._reported = {"retries": 0, "robots": 0}
        # Every status shows up (at 0) from the start, so rate() and alerts see a series before the first refusal.
        for name in status.ALL:
            self.urls_total.labels(status=name)

    # ---- hooks ---------------------------------------------------------------------------------
    def register(self, server: grpc.Server) -> list[str]:
        crawler_pb2_grpc.add_CrawlerServiceServicer_to_server(CrawlerServicer(self), server)
        return [crawler_pb2.DESCRIPTOR.services_by_name["CrawlerService"].full_name]

    def handlers(self) -> Mapping[str, Handler]:
        return {topics.QUERIES.name: self.handle_query}

    def dependencies(self) -> dict[str, Check]:
        checks = super().dependencies()
        default = self.registry.get("")
        checks[f"search_{default.name.replace('-', '_')}"] = default.ping
        return checks

    def on_start(self) -> None:
        super().on_start()
        self.downloader.start()

    def on_stop(self) -> None:
        self.downloader.close()
        self._s3_pool.shutdown(wait=True)

    # ---- the handler ---------------------------------------------------------------------------
    def _answer_store(self) -> S3AnswerStore | None:
        if not self.settings.crawler_search_cache_shared:
            return None
        # Rebuilt if the object store is swapped (tests do), never per call otherwise.
        if self._answers is None or self._answers.store is not self.store:
            self._answers = S3AnswerStore(self.store, self.settings.s3_bucket)
        return self._answers

    def _outcome_store(self) -> S3OutcomeStore | None:
        if not self.settings.crawler_persist_outcomes:
            return None
        if self._outcomes is None or self._outcomes.store is not self.store:
            self._outcomes = S3OutcomeStore(self.store, self.settings.s3_bucket)
        return self._outcomes

    def handle_query(self, query: events_pb2.QueryIssued, ctx: EventContext | None = None) -> None:
        assert self.publisher is not None, "publisher not started"
        memory_key = (query.exploration_id, query.query_id)
        outcome = self.replay.get(memory_key)
        if outcome is not None:
            self.replayed.labels(source="memory").inc()
            self._publish(outcome)
            return
        outcomes = self._outcome_store()
        if outcomes is not None and query.exploration_id and query.query_id:
            recorded = outcomes.get(query.exploration_id, query.query_id)
            if recorded is not None:
                # Crawled before (by this replica before a restart, or by one that died mid-publish).
                outcome = CrawlOutcome(*recorded)
                self.replay.put(memory_key, outcome)
                self.replayed.labels(source="s3").inc()
                self._publish(outcome)
                return
        with self.query_seconds.time():
            outcome = self._crawl(query)
        if outcomes is not None:
            # Durable before the first event goes out: whoever publishes this query again publishes these.
            outcomes.put(outcome.fetched, outcome.crawled)
        if not outcome.carries_bytes:
            # Carried bytes stay out of memory (a thousand queries of them would be gigabytes); a
            # redelivery republishes them from the persisted record instead.
            self.replay.put(memory_key, outcome)
        self._publish(outcome)
        with self._totals_lock:
            self._queries_crawled += 1
            self._images_fetched += outcome.crawled.images_fetched
            self._refused.update(dict(outcome.crawled.refused))
        log.info(
            "query crawled",
            extra={
                "exploration_id": query.exploration_id,
                "query_id": query.query_id,
                "results": outcome.crawled.results_returned,
                "fetched": outcome.crawled.images_fetched,
                "refused": str(dict(outcome.crawled.refused)),
            },
        )

    def _crawl(self, query: events_pb2.QueryIssued) -> CrawlOutcome:
        if not query.query_id or not query.exploration_id:
            raise PermanentError("missing_ids", "query_id and exploration_id are required")
        text = query.text.strip() or f"{query.descriptor} {query.concept}".strip()
        if not text:
            raise PermanentError("empty_query", f"query {query.query_id} has no text")
        backend = self._backend_name(query.search_backend)
        hits = self._search(backend, text, self._num_results(query.num_results))

        # One download per distinct URL: a backend may list the same URL twice, and downstream keys
        # decisions by URL anyway.
        urls = list(dict.fromkeys(hit.url for hit in hits))
        results = self.downloader.fetch_all(urls, deadline_s=self.settings.crawler_query_deadline_s)
        self._record(results)
        ok = [r for r in results if r.ok]
        # Small images travel inside their events only: Kafka's copy is the durable one until dedup
        # has decided them (and the persisted outcome's, for a redelivered query). Larger ones are
        # staged, durable before any event mentions them (and before the offset commits).
        limit = min(self.settings.crawler_inline_max_bytes, self.settings.kafka_max_message_bytes // 2)
        carried = {r.sha256 for r in ok if r.data is not None and len(r.data) <= limit}
        self._stage([r for r in ok if r.sha256 not in carried])

        fetched = tuple(self._image_fetched(query, r, r.sha256 in carried) for r in ok)
        refused = Counter(r.status for r in results if not r.ok)
        crawled = events_pb2.QueryCrawled(
            query_id=query.query_id,
            exploration_id=query.exploration_id,
            iteration=query.iteration,
            results_returned=len(urls),
            images_fetched=len(fetched),
            refused=dict(refused),
            crawled_at=now_timestamp(),
        )
        self.queries_crawled.labels(backend=backend).inc()
        return CrawlOutcome(fetched, crawled)

    def _backend_name(self, requested: str) -> str:
        try:
            return self.registry.resolve_name(requested)
        except UnknownBackend as exc:
            raise PermanentError("unknown_search_backend", str(exc)) from None

    def _num_results(self, requested: int) -> int:
        if requested <= 0:
            return self.settings.crawler_default_results
        return min(requested, self.settings.crawler_max_results)

    def _search(self, backend: str, text: str, num_results: int) -> tuple[SearchHit, ...]:
        started = time.perf_counter()
        self.registry.shared = self._answer_store()
        try:
            answer = self.registry.search(backend, text, num_results)
        except SearchUnavailable as exc:
            self.search_requests.labels(backend=backend, outcome=exc.kind).inc()
            raise DependencyUnavailable(str(exc)) from exc
        except SearchRejected as exc:
            self.search_requests.labels(backend=backend, outcome=exc.kind).inc()
            raise PermanentError("search_rejected", str(exc)) from exc
        except (SearchFailed, SearchError) as exc:
            # Bounded retries by the consumer loop, then dead-lettered: it may be a poison query.
            self.search_requests.labels(backend=backend, outcome=exc.kind).inc()
            raise
        if not answer.cached:
            self.search_seconds.labels(backend=backend).observe(time.perf_counter() - started)
        self.search_requests.labels(backend=backend, outcome="cache_hit" if answer.cached else "ok").inc()
        return answer.hits

    def _record(self, results: list[FetchResult]) -> None:
        # The downloader keeps plain totals (it knows nothing of metrics); report what grew since last time.
        for name, counter, total in (
            ("retries", self.retries_counter, self.downloader.retries_total),
            ("robots", self.robots_counter, self.downloader.robots_fetches),
        ):
            grown = total - self._reported[name]
            if grown > 0:
                counter.inc(grown)
                self._reported[name] = total
        for r in results:
            self.urls_total.labels(status=r.status).inc()
            self.fetch_seconds.labels(outcome="ok" if r.ok else "refused").observe(r.elapsed_s)
            if r.downloaded_bytes:
                self.downloaded_bytes.inc(r.downloaded_bytes)
            # Refusals are counted, never logged one by one (a query can refuse a thousand URLs);
            # ProbeUrl tells why one URL fails.
            if r.ok:
                self.staged_bytes.observe(r.size_bytes)

    def _stage(self, results: list[FetchResult]) -> None:
        bucket = self.settings.s3_bucket
        unique = {r.sha256: r for r in results}  # identical bytes from two URLs are written once

        def put(r: FetchResult) -> str:
            key = content_key(STAGING_PREFIX, r.sha256)
            if self.store.exists(bucket, key):
                return "existing"
            assert r.data is not None
            self.store.put_bytes(bucket, key, r.data, content_type=r.content_type)
            return "written"

        for written in self._s3_pool.map(put, unique.values()):
            self.staged_objects.labels(outcome=written).inc()

    def _image_fetched(self, query: events_pb2.QueryIssued, r: FetchResult, carried: bool) -> events_pb2.ImageFetched:
        return events_pb2.ImageFetched(
            exploration_id=query.exploration_id,
            iteration=query.iteration,
            query_id=query.query_id,
            concept=query.concept,
            url=r.url,
            staging_key="" if carried else content_key(STAGING_PREFIX, r.sha256),
            data=r.data if carried else b"",
            raw_sha256=r.sha256,
            content_type=r.content_type,
            width=r.width,
            height=r.height,
            size_bytes=r.size_bytes,
            fetched_at=now_timestamp(),
        )

    def _publish(self, outcome: CrawlOutcome) -> None:
        assert self.publisher is not None
        for event in outcome.fetched:
            self.publisher.publish(topics.IMAGES_FETCHED, event, key=event.raw_sha256)
        # Last, so that a consumer seeing it has (per partition order of the producer) the count to expect.
        self.publisher.publish(topics.QUERIES_CRAWLED, outcome.crawled, key=outcome.crawled.exploration_id)

    # ---- status for gRPC ------------------------------------------------------------------------
    def status_snapshot(self) -> crawler_pb2.GetCrawlerStatusResponse:
        with self._totals_lock:
            return crawler_pb2.GetCrawlerStatusResponse(
                queries_crawled=self._queries_crawled,
                images_fetched=self._images_fetched,
                refused=dict(self._refused),
                in_flight=self.downloader.in_flight,
            )


class CrawlerServicer(crawler_pb2_grpc.CrawlerServiceServicer):
    def __init__(self, service: CrawlerService) -> None:
        self.service = service

    def ProbeUrl(self, request: crawler_pb2.ProbeUrlRequest, context: grpc.ServicerContext) -> crawler_pb2.ProbeUrlResponse:
        problem = url_problem(request.url, MAX_URL_LENGTH)
        if problem is not None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"url: {problem}")
        result = self.service.downloader.fetch(request.url)
        return crawler_pb2.ProbeUrlResponse(
            status=result.status,
            content_type=result.content_type,
            size_bytes=result.size_bytes,
            width=result.width,
            height=result.height,
        )

    def GetCrawlerStatus(self, request: crawler_pb2.GetCrawlerStatusRequest, context: grpc.ServicerContext) -> crawler_pb2.GetCrawlerStatusResponse:
        return self.service.status_snapshot()
