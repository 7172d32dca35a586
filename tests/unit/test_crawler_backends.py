"""Search backends: clip-retrieval request/answer format, retries, error kinds, cache and registry."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.crawler.backends import (
    BackendRegistry,
    ClipRetrievalBackend,
    SearchBackend,
    SearchCache,
    SearchFailed,
    SearchHit,
    SearchRejected,
    SearchUnavailable,
    UnknownBackend,
    parse_knn_answer,
)

ANSWER = [
    {"id": 7, "url": "http://img.example/a.png", "caption": "a red apple", "similarity": 0.61},
    {"id": 8, "caption": "embedding only, no url", "similarity": 0.5},
    {"id": 9, "url": "http://img.example/b.jpg", "caption": None, "similarity": "0.4"},
]


class KnnServer:
    """Answers POST /knn-service with a scripted sequence of (status, body)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.script: list[tuple[int, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", 0))
                outer.requests.append({"path": self.path, "body": json.loads(self.rfile.read(length))})
                code, body = outer.script.pop(0) if outer.script else (200, json.dumps(ANSWER).encode())
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def knn():
    server = KnnServer()
    yield server
    server.close()


def backend(url: str, **kwargs) -> ClipRetrievalBackend:
    kwargs.setdefault("sleep", lambda _s: None)
    return ClipRetrievalBackend("local", url, indice_name="emoji", timeout_s=2.0, **kwargs)


def test_request_and_answer_follow_clip_retrieval(knn):
    hits = backend(knn.url).search("baby duck", 10)
    assert knn.requests == [
        {
            "path": "/knn-service",
            "body": {"text": "baby duck", "num_images": 10, "indice_name": "emoji", "modality": "image", "deduplicate": True},
        }
    ]
    assert hits == [
        SearchHit("http://img.example/a.png", "a red apple", 0.61, "7"),
        SearchHit("http://img.example/b.jpg", "", 0.4, "9"),
    ]


def test_answers_are_cut_to_the_requested_count(knn):
    assert len(backend(knn.url).search("x", 1)) == 1


def test_transient_statuses_are_retried(knn):
    knn.script = [(503, b"busy"), (502, b"gateway")]
    assert len(backend(knn.url, attempts=3).search("x", 5)) == 2
    assert len(knn.requests) == 3


def test_persistent_unavailability_and_rejection(knn):
    knn.script = [(503, b"")] * 3
    with pytest.raises(SearchUnavailable):
        backend(knn.url, attempts=3).search("x", 5)
    knn.script = [(400, b'{"error": "bad"}')]
    with pytest.raises(SearchRejected):
        backend(knn.url, attempts=3).search("x", 5)
    knn.script = [(500, b"boom")] * 2
    with pytest.raises(SearchFailed):
        backend(knn.url, attempts=2).search("x", 5)


def test_unreachable_backend_is_unavailable():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = backend(f"http://127.0.0.1:{port}", attempts=2)
    with pytest.raises(SearchUnavailable):
        dead.search("x", 5)
    assert not dead.ping()


def test_malformed_answers():
    with pytest.raises(SearchFailed):
        parse_knn_answer(b"<html>", "local")
    with pytest.raises(SearchFailed):
        parse_knn_answer(b'{"error": "index not loaded"}', "local")
    with pytest.raises(SearchFailed):
        parse_knn_answer(b'{"results": []}', "local")
    assert parse_knn_answer(b'[1, "x", {"url": ""}]', "local") == []


def test_cache_is_bounded_lru_with_expiry():
    now = [0.0]
    cache = SearchCache(max_entries=2, ttl_s=10, clock=lambda: now[0])
    a, b, c = ("local", "a", 1), ("local", "b", 1), ("local", "c", 1)
    cache.put(a, (SearchHit("u1"),))
    cache.put(b, (SearchHit("u2"),))
    assert cache.get(a) is not None  # a is now the most recent
    cache.put(c, (SearchHit("u3"),))
    assert cache.get(b) is None and cache.get(a) is not None and len(cache) == 2
    now[0] = 11
    assert cache.get(a) is None


class CountingBackend(SearchBackend):
    def __init__(self) -> None:
        self.calls = 0

    def search(self, text, num_results):
        self.calls += 1
        return [SearchHit(f"http://x/{text}/{i}") for i in range(num_results)]


def test_registry_defaults_caches_and_refuses_unknown_names():
    counting = CountingBackend()
    registry = BackendRegistry({"local": counting}, default="local", cache=SearchCache(16, 0))
    first = registry.search("", "duck", 3)
    again = registry.search("local", "duck", 3)
    other_n = registry.search("local", "duck", 4)
    assert not first.cached and again.cached and not other_n.cached
    assert first.hits == again.hits and counting.calls == 2
    with pytest.raises(UnknownBackend):
        registry.search("google", "duck", 3)
    with pytest.raises(ValueError):
        BackendRegistry({"local": counting}, default="clip-retrieval", cache=SearchCache(1, 0))
