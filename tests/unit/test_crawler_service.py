"""The crawler's query handler and gRPC API with in-memory fakes of the publisher and the object store."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import threading
from collections import Counter

import grpc
import pytest
from aiohttp import web
from PIL import Image

from iex.v1 import crawler_pb2, events_pb2
from services.common import settings as settings_mod
from services.common import topics
from services.common.errors import DependencyUnavailable, PermanentError
from services.common.objectstore import content_key
from services.crawler.backends import SearchFailed
from services.crawler.service import CrawlerService, CrawlerServicer, CrawlerSettings


def png(size, seed: int) -> bytes:
    image = Image.merge("RGB", [Image.effect_noise(size, 30 + seed + i) for i in range(3)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


RED = png((64, 64), 1)
BLUE = png((48, 48), 2)


class OfflineWeb:
    """A tiny offline web on 127.0.0.1: /knn-service answers from `answers`, images under /img/."""

    def __init__(self) -> None:
        self.answers: dict[str, list[dict]] = {}
        self.knn_status = 200
        self.searches: list[dict] = []
        self.image_hits: Counter[str] = Counter()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/knn-service", self._knn)
        app.router.add_get("/img/{name}", self._image)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    async def _knn(self, request):
        body = await request.json()
        self.searches.append(body)
        if self.knn_status != 200:
            return web.Response(status=self.knn_status, text="nope")
        return web.json_response(self.answers.get(body["text"], [])[: body["num_images"]])

    async def _image(self, request):
        name = request.match_info["name"]
        self.image_hits[name] += 1
        images = {"red.png": RED, "blue.png": BLUE, "red-copy.png": RED}
        if name not in images:
            raise web.HTTPNotFound()
        return web.Response(body=images[name], content_type="image/png")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    def hit(self, name: str, rank: int) -> dict:
        return {"id": rank, "url": f"{self.base}/img/{name}", "caption": name, "similarity": 1.0 - rank / 10}

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class FakePublisher:
    def __init__(self) -> None:
        self.events: list[tuple[str, object, str]] = []

    def publish(self, topic, message, key, headers=None) -> None:
        self.events.append((topic.name if hasattr(topic, "name") else topic, message, key))

    def of(self, topic) -> list:
        return [message for name, message, _key in self.events if name == topic.name]


class FakeStore:
    """The object store's surface the crawler uses; `puts` counts staged images only."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.puts = 0
        self.down = False

    def exists(self, bucket, key) -> bool:
        if self.down:
            raise DependencyUnavailable("s3 away")
        return (bucket, key) in self.objects

    def put_bytes(self, bucket, key, data, content_type="application/octet-stream", metadata=None) -> None:
        if self.down:
            raise DependencyUnavailable("s3 away")
        if key.startswith("staging/"):
            self.puts += 1
        self.objects[(bucket, key)] = (bytes(data), content_type)

    def get_or_none(self, bucket, key):
        if self.down:
            raise DependencyUnavailable("s3 away")
        found = self.objects.get((bucket, key))
        return None if found is None else found[0]

    def get_json(self, bucket, key):
        data = self.get_or_none(bucket, key)
        return None if data is None else json.loads(data)

    def staged(self) -> dict:
        return {k: v for k, v in self.objects.items() if k[1].startswith("staging/")}


@pytest.fixture(scope="module")
def offline_web():
    w = OfflineWeb()
    yield w
    w.close()


def make_service(offline_web: OfflineWeb, **overrides) -> CrawlerService:
    values = dict(
        crawler_allow_networks=("127.0.0.0/8",),
        crawler_local_search_url=offline_web.base,
        crawler_total_timeout_s=2.0,
        crawler_min_side=16,
        crawler_search_attempts=1,
    )
    values.update(overrides)
    settings = settings_mod.load_service_settings(CrawlerSettings, "crawler", environ={}, **values)
    service = CrawlerService(settings)
    service.store = FakeStore()  # type: ignore[assignment]
    service.publisher = FakePublisher()  # type: ignore[assignment]
    return service


@pytest.fixture
def crawler(offline_web):
    service = make_service(offline_web)
    yield service
    service.on_stop()


def query(text: str, query_id: str = "q-1", num_results: int = 100, backend: str = "") -> events_pb2.QueryIssued:
    return events_pb2.QueryIssued(
        query_id=query_id,
        exploration_id="exp-1",
        iteration=2,
        concept="apple",
        descriptor="red",
        text=text,
        num_results=num_results,
        search_backend=backend,
    )


def test_three_hits_publish_fetched_images_then_one_query_crawled(crawler, offline_web):
    offline_web.answers["red apple"] = [offline_web.hit("red.png", 0), offline_web.hit("blue.png", 1), offline_web.hit("gone.png", 2)]
    crawler.handle_query(query("red apple"), None)

    events = crawler.publisher.events
    assert [name for name, _m, _k in events] == [topics.IMAGES_FETCHED.name] * 2 + [topics.QUERIES_CRAWLED.name]
    fetched = crawler.publisher.of(topics.IMAGES_FETCHED)
    [crawled] = crawler.publisher.of(topics.QUERIES_CRAWLED)
    assert crawled.images_fetched == len(fetched) == 2
    assert dict(crawled.refused) == {"http_error": 1}
    assert crawled.results_returned == 3
    assert (crawled.query_id, crawled.exploration_id, crawled.iteration) == ("q-1", "exp-1", 2)
    assert events[-1][2] == "exp-1"

    for event, expected, (_name, _m, key) in zip(fetched, (RED, BLUE), events):
        sha = hashlib.sha256(expected).hexdigest()
        assert key == event.raw_sha256 == sha
        # Small images travel in their events, and nothing is staged for them.
        assert event.data == expected and event.staging_key == ""
        assert (event.exploration_id, event.query_id, event.iteration, event.concept) == ("exp-1", "q-1", 2, "apple")
        assert event.size_bytes == len(expected) and event.content_type == "image/png"
        assert event.width > 0 and event.fetched_at.seconds > 0
    assert offline_web.searches[-1]["text"] == "red apple" and offline_web.searches[-1]["num_images"] == 100

    assert crawler.store.staged() == {}

    status = CrawlerServicer(crawler).GetCrawlerStatus(crawler_pb2.GetCrawlerStatusRequest(), None)
    assert (status.queries_crawled, status.images_fetched, dict(status.refused)) == (1, 2, {"http_error": 1})


def test_images_over_the_inline_limit_are_staged_before_their_events(offline_web):
    service = make_service(offline_web, crawler_inline_max_bytes=min(len(RED), len(BLUE)) - 1)
    try:
        offline_web.answers["staged"] = [offline_web.hit("red.png", 0), offline_web.hit("blue.png", 1)]
        service.handle_query(query("staged", "q-staged"), None)
        fetched = service.publisher.of(topics.IMAGES_FETCHED)
        assert len(fetched) == 2
        for event, expected in zip(fetched, (RED, BLUE)):
            assert event.data == b"" and event.staging_key == content_key("staging", hashlib.sha256(expected).hexdigest())
            assert service.store.objects[("iex", event.staging_key)] == (expected, "image/png")
    finally:
        service.on_stop()


def test_identical_bytes_from_two_urls_publish_two_events_and_one_object(offline_web):
    crawler = make_service(offline_web, crawler_inline_max_bytes=0)
    offline_web.answers["twins"] = [offline_web.hit("red.png", 0), offline_web.hit("red-copy.png", 1), offline_web.hit("red.png", 2)]
    crawler.handle_query(query("twins"), None)
    fetched = crawler.publisher.of(topics.IMAGES_FETCHED)
    [crawled] = crawler.publisher.of(topics.QUERIES_CRAWLED)
    # The repeated URL is fetched once; the two distinct URLs with the same bytes both count.
    assert [e.url.rsplit("/", 1)[1] for e in fetched] == ["red.png", "red-copy.png"]
    assert fetched[0].raw_sha256 == fetched[1].raw_sha256
    assert crawled.images_fetched == 2 and crawled.results_returned == 2 and not crawled.refused
    assert crawler.store.puts == 1
    crawler.on_stop()


def test_existing_staged_objects_are_not_written_again(offline_web):
    crawler = make_service(offline_web, crawler_inline_max_bytes=0)
    offline_web.answers["again"] = [offline_web.hit("blue.png", 0)]
    key = content_key("staging", hashlib.sha256(BLUE).hexdigest())
    crawler.store.objects[("iex", key)] = (BLUE, "image/png")
    crawler.handle_query(query("again"), None)
    assert crawler.store.puts == 0
    assert crawler.publisher.of(topics.QUERIES_CRAWLED)[0].images_fetched == 1
    crawler.on_stop()


def test_redelivered_query_republishes_identical_events_without_refetching(crawler, offline_web):
    offline_web.answers["redelivered"] = [offline_web.hit("red.png", 0), offline_web.hit("blue.png", 1)]
    crawler.handle_query(query("redelivered", "q-redo"), None)
    first = list(crawler.publisher.events)
    searches, images = len(offline_web.searches), sum(offline_web.image_hits.values())
    crawler.handle_query(query("redelivered", "q-redo"), None)
    # The small images' bytes were never staged: the replay (from the persisted outcome) carries
    # them again, and is byte for byte the same events.
    carried = [m for name, m, _ in first if name == topics.IMAGES_FETCHED.name]
    assert carried and all(m.data and hashlib.sha256(m.data).hexdigest() == m.raw_sha256 and not m.staging_key for m in carried)
    assert crawler.publisher.events[len(first):] == first
    assert len(offline_web.searches) == searches and sum(offline_web.image_hits.values()) == images


def test_after_a_restart_the_same_query_yields_the_same_events(offline_web):
    offline_web.answers["restart"] = [offline_web.hit("red.png", 0), offline_web.hit("gone.png", 1)]

    def crawl_once():
        service = make_service(offline_web, crawler_replay_memory=0)
        try:
            service.handle_query(query("restart", "q-restart"), None)
            return service.publisher.events
        finally:
            service.on_stop()

    def stable(events):
        out = []
        for name, message, key in events:
            message = type(message).FromString(message.SerializeToString())
            message.ClearField("fetched_at" if name == topics.IMAGES_FETCHED.name else "crawled_at")
            out.append((name, message, key))
        return out

    assert stable(crawl_once()) == stable(crawl_once())


def test_a_replica_that_takes_over_republishes_the_recorded_events(offline_web):
    """Replica A crawls and records, then dies mid-publish; replica B (shared S3) republishes the same events."""
    offline_web.answers["takeover"] = [offline_web.hit("red.png", 0), offline_web.hit("gone.png", 1)]
    shared = FakeStore()
    first = make_service(offline_web, crawler_replay_memory=0)
    first.store = shared  # type: ignore[assignment]
    try:
        first.handle_query(query("takeover", "q-takeover"), None)
    finally:
        first.on_stop()
    searches, images = len(offline_web.searches), sum(offline_web.image_hits.values())
    second = make_service(offline_web)
    second.store = shared  # type: ignore[assignment]
    replayed_before = second.replayed.labels(source="s3")._value.get()  # metric families are per process
    try:
        second.handle_query(query("takeover", "q-takeover"), None)
        # Byte-identical, timestamps and carried bytes included: nothing was searched or fetched again.
        assert second.publisher.events == first.publisher.events
        assert len(offline_web.searches) == searches and sum(offline_web.image_hits.values()) == images
        assert second.replayed.labels(source="s3")._value.get() == replayed_before + 1
    finally:
        second.on_stop()


def test_repeated_text_in_another_query_reuses_the_shared_search_answer(offline_web):
    offline_web.answers["shared answer"] = [offline_web.hit("blue.png", 0)]
    shared = FakeStore()
    services = [make_service(offline_web, crawler_search_cache_entries=0) for _ in range(2)]
    try:
        for number, service in enumerate(services):
            service.store = shared  # type: ignore[assignment]
            service.handle_query(query("shared answer", f"q-shared-{number}"), None)
        assert [s["text"] for s in offline_web.searches].count("shared answer") == 1
        assert services[1].publisher.of(topics.QUERIES_CRAWLED)[0].images_fetched == 1
    finally:
        for service in services:
            service.on_stop()


def test_s3_outage_publishes_nothing_and_asks_for_a_retry(crawler, offline_web):
    offline_web.answers["s3 down"] = [offline_web.hit("red.png", 0)]
    crawler.store.down = True
    with pytest.raises(DependencyUnavailable):
        crawler.handle_query(query("s3 down", "q-s3"), None)
    assert crawler.publisher.events == []
    crawler.store.down = False
    crawler.handle_query(query("s3 down", "q-s3"), None)
    assert crawler.publisher.of(topics.QUERIES_CRAWLED)[0].images_fetched == 1


def test_search_failures_map_to_retry_kinds(offline_web):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    unreachable = make_service(offline_web, crawler_local_search_url=f"http://127.0.0.1:{dead_port}")
    try:
        with pytest.raises(DependencyUnavailable):
            unreachable.handle_query(query("anything"), None)
        assert unreachable.publisher.events == []
    finally:
        unreachable.on_stop()

    service = make_service(offline_web)
    try:
        with pytest.raises(PermanentError) as unknown:
            service.handle_query(query("x", backend="google-images"), None)
        assert unknown.value.reason == "unknown_search_backend"
        with pytest.raises(PermanentError) as empty:
            service.handle_query(events_pb2.QueryIssued(query_id="q", exploration_id="e"), None)
        assert empty.value.reason == "empty_query"
        for code, expected in ((400, PermanentError), (503, DependencyUnavailable), (500, SearchFailed)):
            offline_web.knn_status = code
            with pytest.raises(expected):
                service.handle_query(query(f"status {code}"), None)
        assert service.publisher.events == []
    finally:
        offline_web.knn_status = 200
        service.on_stop()


def test_query_text_falls_back_to_descriptor_and_concept_and_results_are_capped(crawler, offline_web):
    offline_web.answers["red apple"] = [offline_web.hit("red.png", 0)]
    crawler.handle_query(query("", "q-fallback", num_results=50_000), None)
    assert offline_web.searches[-1]["text"] == "red apple"
    assert offline_web.searches[-1]["num_images"] == crawler.settings.crawler_max_results


class AbortCalled(Exception):
    pass


class FakeContext:
    def abort(self, code, details):
        self.code, self.details = code, details
        raise AbortCalled(details)


@pytest.mark.parametrize(
    "url, problem",
    [
        ("", "url: must not be empty"),
        ("ftp://example.org/a.png", "url: scheme must be http or https"),
        ("http://example.org/" + "a" * 2048, "url: longer than 2048 characters"),
    ],
)
def test_probe_url_validates_its_argument(crawler, url, problem):
    context = FakeContext()
    with pytest.raises(AbortCalled):
        CrawlerServicer(crawler).ProbeUrl(crawler_pb2.ProbeUrlRequest(url=url), context)
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT and context.details == problem


def test_probe_url_reports_without_publishing(crawler, offline_web):
    servicer = CrawlerServicer(crawler)
    ok = servicer.ProbeUrl(crawler_pb2.ProbeUrlRequest(url=f"{offline_web.base}/img/blue.png"), FakeContext())
    assert (ok.status, ok.content_type, ok.size_bytes, ok.width, ok.height) == ("ok", "image/png", len(BLUE), 48, 48)
    blocked = servicer.ProbeUrl(crawler_pb2.ProbeUrlRequest(url="http://169.254.169.254/latest/meta-data/"), FakeContext())
    assert blocked.status == "blocked_address"
    assert crawler.publisher.events == [] and crawler.store.puts == 0


def test_settings_refuse_bad_networks_and_urls():
    with pytest.raises(settings_mod.SettingsError, match="IEX_CRAWLER_ALLOW_NETWORKS"):
        settings_mod.load(CrawlerSettings, environ={"IEX_CRAWLER_ALLOW_NETWORKS": "127.0.0.0/8,not-a-cidr"})
    with pytest.raises(settings_mod.SettingsError, match="IEX_CRAWLER_LOCAL_SEARCH_URL"):
        settings_mod.load(CrawlerSettings, environ={"IEX_CRAWLER_LOCAL_SEARCH_URL": "ftp://x"})
    loaded = settings_mod.load(CrawlerSettings, environ={"IEX_CRAWLER_ALLOW_NETWORKS": "127.0.0.0/8, 10.0.0.0/8"})
    assert loaded.crawler_allow_networks == ("127.0.0.0/8", "10.0.0.0/8")
    assert all(help_text for _var, _default, help_text in settings_mod.describe(CrawlerSettings))


def test_metrics_are_exported_with_bounded_labels(crawler, offline_web):
    from prometheus_client import REGISTRY

    offline_web.answers["metrics"] = [offline_web.hit("red.png", 0), offline_web.hit("gone.png", 1)]
    before = REGISTRY.get_sample_value("iex_crawler_urls_total", {"status": "ok"}) or 0
    crawler.handle_query(query("metrics", "q-metrics"), None)
    assert REGISTRY.get_sample_value("iex_crawler_urls_total", {"status": "ok"}) == before + 1
    assert REGISTRY.get_sample_value("iex_crawler_urls_total", {"status": "http_error"}) >= 1
    assert REGISTRY.get_sample_value("iex_crawler_downloaded_bytes_total") > 0
    assert REGISTRY.get_sample_value("iex_crawler_fetches_in_flight") == 0
    assert REGISTRY.get_sample_value("iex_crawler_queries_crawled_total", {"backend": "local"}) >= 1
