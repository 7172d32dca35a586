"""Openverse and generic JSON search backends against local fake servers replaying their answer shapes."""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.common import settings as settings_mod
from services.crawler.backends import SearchFailed, SearchRejected, SearchUnavailable
from services.crawler.json_api import _MISSING, JsonApiBackend, JsonApiSpec, lookup, parse_header_lines
from services.crawler.openverse import OpenverseBackend
from services.crawler.service import CrawlerSettings, build_registry


def openverse_result(i: int) -> dict:
    """One entry shaped like api.openverse.org/v1/images/ results (fields we do not read included)."""
    return {
        "id": f"4bc43a04-ef46-4544-a0c1-63c63f56{i:04d}",
        "title": f"Baby duck {i}",
        "indexed_on": "2022-12-13T08:40:08Z",
        "foreign_landing_url": f"https://www.flickr.com/photos/x/{i}",
        "url": f"https://live.staticflickr.com/65535/{i}_b.jpg",
        "creator": "someone",
        "creator_url": "https://www.flickr.com/photos/x",
        "license": "by",
        "license_version": "2.0",
        "license_url": "https://creativecommons.org/licenses/by/2.0/",
        "provider": "flickr",
        "source": "flickr",
        "category": "photograph",
        "filesize": None,
        "filetype": "jpg",
        "tags": [{"name": "duck", "accuracy": None}, {"name": "bird"}],
        "attribution": "...",
        "fields_matched": ["title"],
        "mature": False,
        "height": 683,
        "width": 1024,
        "thumbnail": f"https://api.openverse.org/v1/images/x{i}/thumb/",
        "detail_url": f"https://api.openverse.org/v1/images/x{i}/",
        "related_url": f"https://api.openverse.org/v1/images/x{i}/related/",
        "unstable__sensitivity": [],
    }


class FakeApi:
    """Records requests; `routes` maps a path to a function (handler) -> (status, headers, body)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.routes: dict[str, object] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                parts = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                record = {
                    "method": self.command,
                    "path": parts.path,
                    "query": dict(urllib.parse.parse_qsl(parts.query)),
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body,
                }
                outer.requests.append(record)
                route = outer.routes.get(parts.path)
                code, headers, payload = route(record) if route else (404, {}, b'{"detail": "not found"}')
                self.send_response(code)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _serve  # noqa: N815 - http.server's naming

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api():
    server = FakeApi()
    yield server
    server.close()


def openverse_pages(total: int):
    """A /v1/images/ route paging `total` results the way Openverse does."""

    def route(request):
        page, size = int(request["query"]["page"]), int(request["query"]["page_size"])
        start = (page - 1) * size
        results = [openverse_result(i) for i in range(start, min(total, start + size))]
        answer = {"result_count": total, "page_count": -(-total // size), "page_size": size, "page": page, "results": results, "warnings": []}
        return 200, {}, json.dumps(answer).encode()

    return route


def openverse(api, **kwargs) -> OpenverseBackend:
    kwargs.setdefault("sleep", lambda _s: None)
    return OpenverseBackend("openverse", api.url, timeout_s=2.0, **kwargs)


def test_openverse_pages_with_a_constant_page_size(api):
    api.routes["/v1/images/"] = openverse_pages(95)
    hits = openverse(api, license_type="commercial").search("baby duck", 50)
    assert len(hits) == 50
    pages = [(r["query"]["page"], r["query"]["page_size"]) for r in api.requests]
    assert pages == [("1", "20"), ("2", "20"), ("3", "20")]
    assert all(r["query"]["q"] == "baby duck" and r["query"]["license_type"] == "commercial" for r in api.requests)
    assert "authorization" not in api.requests[0]["headers"]
    first = hits[0]
    assert first.url == "https://live.staticflickr.com/65535/0_b.jpg" and first.caption == "Baby duck 0 (duck, bird)"
    assert first.id.startswith("4bc43a04") and hits[0].similarity > hits[-1].similarity


def test_openverse_stops_at_the_last_page(api):
    api.routes["/v1/images/"] = openverse_pages(25)
    hits = openverse(api).search("duck", 100)
    assert len(hits) == 25 and [r["query"]["page"] for r in api.requests] == ["1", "2"]


def test_openverse_thumbnails_and_entries_without_url(api):
    def route(request):
        results = [openverse_result(1), {**openverse_result(2), "url": None, "thumbnail": None}, "junk"]
        return 200, {}, json.dumps({"result_count": 3, "page_count": 1, "page": 1, "page_size": 20, "results": results}).encode()

    api.routes["/v1/images/"] = route
    hits = openverse(api, use_thumbnails=True).search("duck", 20)
    assert [h.url for h in hits] == ["https://api.openverse.org/v1/images/x1/thumb/"]


def test_openverse_authenticates_reuses_the_token_and_renews_it_on_401(api):
    tokens = iter(["token-1", "token-2"])
    api.routes["/v1/auth_tokens/token/"] = lambda r: (
        200,
        {},
        json.dumps({"access_token": next(tokens), "scope": "read write groups", "expires_in": 36000, "token_type": "Bearer"}).encode(),
    )
    pages = openverse_pages(40)
    revoked = {"done": False}

    def images(request):
        if request["headers"].get("authorization") == "Bearer token-1" and request["query"]["page"] == "2" and not revoked["done"]:
            revoked["done"] = True
            return 401, {}, b'{"detail": "Authentication credentials were not provided."}'
        return pages(request)

    api.routes["/v1/images/"] = images
    hits = openverse(api, client_id="cid", client_secret="secret", page_size=20).search("duck", 40)
    assert len(hits) == 40
    token_requests = [r for r in api.requests if r["path"] == "/v1/auth_tokens/token/"]
    assert len(token_requests) == 2
    form = dict(urllib.parse.parse_qsl(token_requests[0]["body"].decode()))
    assert form == {"grant_type": "client_credentials", "client_id": "cid", "client_secret": "secret"}
    auths = [r["headers"].get("authorization") for r in api.requests if r["path"] == "/v1/images/"]
    assert auths == ["Bearer token-1", "Bearer token-1", "Bearer token-2"]


def test_openverse_throttling_and_errors(api):
    calls = {"n": 0}
    pages = openverse_pages(10)

    def throttled(request):
        calls["n"] += 1
        if calls["n"] == 1:
            return 429, {"Retry-After": "1"}, b'{"detail": "Request was throttled."}'
        return pages(request)

    api.routes["/v1/images/"] = throttled
    slept: list[float] = []
    assert len(openverse(api, sleep=slept.append).search("duck", 10)) == 10
    assert slept == [1.0]
    # Throttled for an hour: the query waits for a later attempt instead of sleeping here.
    api.routes["/v1/images/"] = lambda r: (429, {"Retry-After": "3600"}, b"{}")
    with pytest.raises(SearchUnavailable):
        openverse(api).search("duck", 10)
    api.routes["/v1/images/"] = lambda r: (400, {}, b'{"detail": {"page_size": ["too large"]}}')
    with pytest.raises(SearchRejected):
        openverse(api).search("duck", 10)
    api.routes["/v1/images/"] = lambda r: (200, {}, b'{"detail": "no results key"}')
    with pytest.raises(SearchFailed):
        openverse(api).search("duck", 10)


def test_openverse_needs_both_credentials():
    with pytest.raises(ValueError):
        OpenverseBackend(client_id="only-id")


# ---- generic JSON API ----------------------------------------------------------------------------


def test_json_api_get_with_paths(api):
    answer = {"data": {"items": [{"image": {"src": f"https://img.example/{i}.jpg"}, "title": f"duck {i}", "score": 1 - i / 10, "key": i} for i in range(5)]}}
    answer["data"]["items"].insert(1, {"image": {}, "title": "no url"})
    api.routes["/api/images"] = lambda r: (200, {}, json.dumps(answer).encode())
    spec = JsonApiSpec(
        url=api.url + "/api/images?q={query}&n={num_results}",
        results_path="data.items",
        url_field="image.src",
        caption_field="title",
        score_field="score",
        id_field="key",
        headers=parse_header_lines("X-Api-Key: s3cret"),
    )
    hits = JsonApiBackend("json", spec, sleep=lambda _s: None).search("baby duck & co", 3)
    assert [h.url for h in hits] == ["https://img.example/0.jpg", "https://img.example/1.jpg", "https://img.example/2.jpg"]
    assert hits[1].caption == "duck 1" and hits[1].similarity == pytest.approx(0.9) and hits[1].id == "1"
    [request] = api.requests
    assert request["query"] == {"q": "baby duck & co", "n": "3"} and request["headers"]["x-api-key"] == "s3cret"


def test_json_api_post_with_a_body_template_and_rank_scores(api):
    api.routes["/search"] = lambda r: (200, {}, json.dumps([{"url": "https://a/1.png"}, {"url": "https://a/2.png"}]).encode())
    spec = JsonApiSpec(url=api.url + "/search", method="POST", body={"query": {"text": "{query}"}, "limit": "{num_results}", "tags": ["{query} photo"]})
    hits = JsonApiBackend("json", spec, sleep=lambda _s: None).search("duck", 10)
    assert json.loads(api.requests[0]["body"]) == {"query": {"text": "duck"}, "limit": 10, "tags": ["duck photo"]}
    assert [h.similarity for h in hits] == [1.0, 0.5]


def test_json_api_errors(api):
    api.routes["/s"] = lambda r: (200, {}, b'{"results": "not a list"}')
    backend = JsonApiBackend("json", JsonApiSpec(url=api.url + "/s?q={query}", results_path="results"), sleep=lambda _s: None)
    with pytest.raises(SearchFailed):
        backend.search("x", 5)
    api.routes["/s"] = lambda r: (503, {}, b"")
    with pytest.raises(SearchUnavailable):
        backend.search("x", 5)
    assert len(api.requests) == 1 + 3  # transient: the default three attempts
    with pytest.raises(ValueError, match="query"):
        JsonApiSpec(url="https://x/search")
    with pytest.raises(ValueError):
        parse_header_lines("no colon here")
    assert lookup({"a": [{"b": 1}]}, "a.0.b") == 1 and lookup({"a": []}, "a.3") is _MISSING


def test_backends_are_configured_from_settings(api):
    env = {
        "IEX_CRAWLER_OPENVERSE_URL": api.url,
        "IEX_CRAWLER_JSON_URL": api.url + "/s?q={query}",
        "IEX_CRAWLER_JSON_HEADERS": "Authorization: Bearer x;; X-Other: y",
        "IEX_CRAWLER_DEFAULT_BACKEND": "openverse",
    }
    settings = settings_mod.load_service_settings(CrawlerSettings, "crawler", environ=env)
    registry = build_registry(settings)
    assert registry.names == ["json", "local", "openverse"] and registry.default == "openverse"
    assert registry.get("json").spec.headers == {"Authorization": "Bearer x", "X-Other": "y"}
    bad = [
        ({"IEX_CRAWLER_DEFAULT_BACKEND": "openverse"}, "IEX_CRAWLER_OPENVERSE_URL"),
        ({"IEX_CRAWLER_JSON_URL": "https://x/search"}, "IEX_CRAWLER_JSON_URL"),
        ({"IEX_CRAWLER_JSON_URL": "https://x/s", "IEX_CRAWLER_JSON_METHOD": "POST", "IEX_CRAWLER_JSON_BODY": "{nope"}, "IEX_CRAWLER_JSON_BODY: not JSON"),
        ({"IEX_CRAWLER_OPENVERSE_URL": api.url, "IEX_CRAWLER_OPENVERSE_CLIENT_ID": "id"}, "IEX_CRAWLER_OPENVERSE_CLIENT_ID"),
        ({"IEX_CRAWLER_MAX_BYTES": "1000000", "IEX_CRAWLER_MAX_BYTES_IN_FLIGHT": "2000"}, "IEX_CRAWLER_MAX_BYTES_IN_FLIGHT"),
    ]
    for environ, variable in bad:
        with pytest.raises(settings_mod.SettingsError, match=variable):
            settings_mod.load_service_settings(CrawlerSettings, "crawler", environ=environ)
