"""Search backends: text in, ranked image URLs out, behind one interface.

`QueryIssued.search_backend` names a backend; the registry maps names to instances and caches the
answers of repeated (backend, text, n) queries, which the paper relies on (concepts are sampled again
and again) and which makes a redelivered query see the same hits. Backends: clip-retrieval's
/knn-service (here; our offline web speaks it), Openverse (openverse.py), any JSON API (json_api.py).

Failures are sorted by what retrying can do:
- SearchUnavailable: the backend did not answer or answered 408/429/502/503/504 after our own retries;
  the handler turns it into DependencyUnavailable (the query waits, it is never dropped);
- SearchRejected: the backend refused the request (4xx): retrying the same query cannot help;
- SearchFailed: 5xx or an unreadable answer: may be transient or a poison query; retried a bounded
  number of times by the consumer loop, then dead-lettered.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol
from urllib.parse import urlsplit

TRANSIENT_HTTP_STATUSES = frozenset({408, 429, 502, 503, 504})


@dataclass(frozen=True)
class SearchHit:
    url: str
    caption: str = ""
    similarity: float = 0.0
    id: str = ""


class SearchError(Exception):
    """Base of search failures; `kind` is a bounded metric label."""

    kind = "error"

    def __init__(self, message: str, http_status: int = 0, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.retry_after_s = retry_after_s


class SearchUnavailable(SearchError):
    kind = "unavailable"


class SearchRejected(SearchError):
    kind = "rejected"


class SearchFailed(SearchError):
    kind = "failed"


class UnknownBackend(SearchError):
    kind = "unknown_backend"


class SearchBackend(ABC):
    """One search engine. Implementations must be thread-safe."""

    name: str = "backend"

    @abstractmethod
    def search(self, text: str, num_results: int) -> list[SearchHit]:
        """The best `num_results` images for `text`, best first."""

    def ping(self) -> bool:
        """True when the backend looks reachable (used for readiness, never for correctness)."""
        return True


# Never use an environment proxy for search: the local backend is on loopback or in-cluster.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


class HttpJsonClient:
    """HTTP requests to one search API, retried with exponential backoff on transient failures only.

    Transient: no answer (connection refused, reset, timeout) and 408/429/5xx. A 4xx other than
    408/429 is the request's fault and is never repeated. Retry-After is honoured up to
    `max_backoff_s`; a server asking for longer ends the retries (the query waits for a later poll).
    """

    def __init__(
        self,
        name: str,
        timeout_s: float = 10.0,
        attempts: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep

    def once(self, request: urllib.request.Request) -> bytes:
        url = request.full_url.split("?", 1)[0]
        try:
            with _OPENER.open(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            detail = f"{self.name}: HTTP {exc.code} from {url}"
            retry_after = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
            if exc.code in TRANSIENT_HTTP_STATUSES:
                raise SearchUnavailable(detail, exc.code, retry_after) from None
            if 400 <= exc.code < 500:
                raise SearchRejected(detail, exc.code) from None
            raise SearchFailed(detail, exc.code, retry_after) from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise SearchUnavailable(f"{self.name}: {url} unreachable: {exc}") from None

    def send(self, build: Callable[[], urllib.request.Request]) -> bytes:
        """Sends the request `build()` makes (rebuilt per attempt, so headers such as tokens can change)."""
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                return self.once(build())
            except (SearchUnavailable, SearchFailed) as exc:
                if attempt == self.attempts:
                    raise
                wait = delay
                if exc.retry_after_s is not None:
                    if exc.retry_after_s > self.max_backoff_s:
                        raise
                    wait = max(wait, exc.retry_after_s)
                self._sleep(min(wait, self.max_backoff_s))
                delay *= 2
        raise AssertionError("unreachable")


def tcp_ping(base_url: str) -> bool:
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


class ClipRetrievalBackend(SearchBackend):
    """A clip-retrieval compatible `/knn-service` (our offline-web search service speaks it too).

    Request: {"text", "num_images", "indice_name", "modality": "image", "deduplicate": true}
    Answer: a JSON list of {"id", "url", "caption", "similarity"}.
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        indice_name: str = "",
        timeout_s: float = 10.0,
        attempts: int = 3,
        backoff_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.endpoint = self.base_url + "/knn-service"
        self.indice_name = indice_name
        self.client = HttpJsonClient(name, timeout_s, attempts, backoff_s, sleep=sleep)

    def _request_body(self, text: str, num_results: int) -> bytes:
        return json.dumps(
            {
                "text": text,
                "num_images": num_results,
                "indice_name": self.indice_name,
                "modality": "image",
                "deduplicate": True,
            }
        ).encode()

    def search(self, text: str, num_results: int) -> list[SearchHit]:
        body = self._request_body(text, num_results)
        raw = self.client.send(
            lambda: urllib.request.Request(
                self.endpoint, data=body, method="POST", headers={"Content-Type": "application/json", "Accept": "application/json"}
            )
        )
        return parse_knn_answer(raw, self.name)[:num_results]

    def ping(self) -> bool:
        return tcp_ping(self.base_url)


def parse_knn_answer(raw: bytes, backend: str) -> list[SearchHit]:
    """clip-retrieval's answer -> hits; entries without a usable URL are skipped (embedding-only indices)."""
    try:
        answer = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SearchFailed(f"{backend}: answer is not JSON ({exc})") from None
    if isinstance(answer, dict) and "error" in answer:
        raise SearchFailed(f"{backend}: {str(answer['error'])[:200]}")
    if not isinstance(answer, list):
        raise SearchFailed(f"{backend}: answer is a {type(answer).__name__}, expected a list")
    hits = []
    for entry in answer:
        if not isinstance(entry, dict):
            continue
        url = entry.get("url")
        if not isinstance(url, str) or not url:
            continue
        try:
            similarity = float(entry.get("similarity") or 0.0)
        except (TypeError, ValueError):
            similarity = 0.0
        hits.append(SearchHit(url=url, caption=str(entry.get("caption") or ""), similarity=similarity, id=str(entry.get("id", ""))))
    return hits


class SearchCache:
    """Bounded LRU of search answers with an expiry, shared by all threads."""

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str, int], tuple[float, tuple[SearchHit, ...]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, int]) -> tuple[SearchHit, ...] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            stored_at, hits = entry
            if self.ttl_s > 0 and self._clock() - stored_at > self.ttl_s:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return hits

    def put(self, key: tuple[str, str, int], hits: tuple[SearchHit, ...]) -> None:
        if self.max_entries <= 0:
            return
        with self._lock:
            self._entries[key] = (self._clock(), hits)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


@dataclass(frozen=True)
class SearchAnswer:
    hits: tuple[SearchHit, ...]
    cached: bool


class AnswerStore(Protocol):
    """A cache of search answers shared by every replica and surviving restarts (S3 in the service).

    Best effort: implementations return None on a miss or on any failure, and never raise from put."""

    def get(self, key: tuple[str, str, int], max_age_s: float) -> tuple[SearchHit, ...] | None: ...

    def put(self, key: tuple[str, str, int], hits: tuple[SearchHit, ...]) -> None: ...


class BackendRegistry:
    """Backend name -> instance, with one cache in front of all of them.

    The in-memory cache answers repeats on this replica; the optional shared store answers repeats
    seen by another replica (or before a restart), so a query redelivered to another crawler sees
    the same hits as the first attempt did.
    """

    def __init__(self, backends: Mapping[str, SearchBackend], default: str, cache: SearchCache, shared: AnswerStore | None = None) -> None:
        self._backends = dict(backends)
        if default not in self._backends:
            raise ValueError(f"default search backend {default!r} is not one of {sorted(self._backends)}")
        self.default = default
        self.cache = cache
        self.shared = shared

    @property
    def names(self) -> list[str]:
        return sorted(self._backends)

    def register(self, name: str, backend: SearchBackend) -> None:
        self._backends[name] = backend

    def resolve_name(self, name: str) -> str:
        """The backend a query names; an empty name means the default."""
        chosen = name or self.default
        if chosen not in self._backends:
            raise UnknownBackend(f"unknown search backend {chosen!r}; configured: {', '.join(self.names)}")
        return chosen

    def get(self, name: str) -> SearchBackend:
        return self._backends[self.resolve_name(name)]

    def search(self, name: str, text: str, num_results: int) -> SearchAnswer:
        chosen = self.resolve_name(name)
        key = (chosen, text, num_results)
        hits = self.cache.get(key)
        if hits is not None:
            return SearchAnswer(hits, cached=True)
        if self.shared is not None:
            hits = self.shared.get(key, self.cache.ttl_s)
            if hits is not None:
                self.cache.put(key, hits)
                return SearchAnswer(hits, cached=True)
        hits = tuple(self._backends[chosen].search(text, num_results))
        self.cache.put(key, hits)
        if self.shared is not None:
            self.shared.put(key, hits)
        return SearchAnswer(hits, cached=False)
