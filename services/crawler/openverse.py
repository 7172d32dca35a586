"""Openverse's image search API (https://api.openverse.org) as a search backend.

    GET {base}/v1/images/?q=<text>&page=<n>&page_size=<k>[&license_type=…][&license=…]
    -> {"result_count", "page_count", "page_size", "page", "results": [{"id", "title", "url",
        "thumbnail", "tags": [{"name"}], "license", "creator", "width", "height", ...}]}

Anonymous clients may ask for at most 20 results a page, so 100 results take five pages (the page
size stays the same on every page, or the offsets would not line up). With registered
credentials the backend first trades them for a bearer token (POST {base}/v1/auth_tokens/token/,
client-credentials grant), keeps it until shortly before it expires, and asks again once if the
API answers 401. Throttling (429 + Retry-After) is retried by HttpJsonClient when short, and
otherwise makes the query wait for a later attempt.

Openverse gives no relevance score: a hit's similarity is 1 - rank / n, which keeps the order
without pretending to be a cosine.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import urllib.request
from typing import Callable

from services.crawler.backends import HttpJsonClient, SearchBackend, SearchFailed, SearchHit, SearchRejected, tcp_ping

DEFAULT_OPENVERSE_URL = "https://api.openverse.org"
ANONYMOUS_PAGE_SIZE = 20
# Renew the token this long before the API says it expires.
_TOKEN_MARGIN_S = 60.0


class OpenverseBackend(SearchBackend):
    def __init__(
        self,
        name: str = "openverse",
        base_url: str = DEFAULT_OPENVERSE_URL,
        client_id: str = "",
        client_secret: str = "",
        page_size: int = ANONYMOUS_PAGE_SIZE,
        license_type: str = "",
        licenses: str = "",
        use_thumbnails: bool = False,
        timeout_s: float = 10.0,
        attempts: int = 3,
        backoff_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        if bool(client_id) != bool(client_secret):
            raise ValueError("Openverse credentials need both a client id and a client secret")
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id
        self.client_secret = client_secret
        self.page_size = page_size
        self.license_type = license_type
        self.licenses = licenses
        self.use_thumbnails = use_thumbnails
        self.client = HttpJsonClient(name, timeout_s, attempts, backoff_s, sleep=sleep)
        self._clock = clock
        self._token: tuple[str, float] | None = None  # (access token, monotonic expiry)
        self._token_lock = threading.Lock()

    # ---- authentication ----------------------------------------------------------------------
    def _bearer(self, renew: bool = False) -> str | None:
        if not self.client_id:
            return None
        with self._token_lock:
            if not renew and self._token is not None and self._clock() < self._token[1]:
                return self._token[0]
            form = urllib.parse.urlencode(
                {"grant_type": "client_credentials", "client_id": self.client_id, "client_secret": self.client_secret}
            ).encode()
            raw = self.client.send(
                lambda: urllib.request.Request(
                    f"{self.base_url}/v1/auth_tokens/token/",
                    data=form,
                    method="POST",
                    headers={"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
                )
            )
            try:
                answer = json.loads(raw)
                token = str(answer["access_token"])
                lifetime = float(answer.get("expires_in") or 3600)
            except (ValueError, KeyError, TypeError) as exc:
                raise SearchFailed(f"{self.name}: token answer unreadable ({exc})") from None
            self._token = (token, self._clock() + max(0.0, lifetime - _TOKEN_MARGIN_S))
            return token

    # ---- search --------------------------------------------------------------------------------
    def _page_request(self, text: str, page: int, page_size: int, token: str | None) -> urllib.request.Request:
        params = {"q": text, "page": str(page), "page_size": str(page_size)}
        if self.license_type:
            params["license_type"] = self.license_type
        if self.licenses:
            params["license"] = self.licenses
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return urllib.request.Request(f"{self.base_url}/v1/images/?{urllib.parse.urlencode(params)}", headers=headers)

    def _page(self, text: str, page: int, page_size: int) -> dict:
        token = self._bearer()
        try:
            raw = self.client.send(lambda: self._page_request(text, page, page_size, token))
        except SearchRejected as exc:
            if exc.http_status != 401 or token is None:
                raise
            # Tokens can be revoked before they expire: one fresh token, one more try.
            token = self._bearer(renew=True)
            raw = self.client.send(lambda: self._page_request(text, page, page_size, token))
        try:
            answer = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SearchFailed(f"{self.name}: answer is not JSON ({exc})") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("results"), list):
            raise SearchFailed(f"{self.name}: answer has no results list")
        return answer

    def search(self, text: str, num_results: int) -> list[SearchHit]:
        page_size = min(self.page_size, num_results)
        hits: list[SearchHit] = []
        seen: set[str] = set()
        page = 1
        while len(hits) < num_results:
            answer = self._page(text, page, page_size)
            results = answer["results"]
            for entry in results:
                hit = self._hit(entry)
                if hit is not None and hit.url not in seen:
                    seen.add(hit.url)
                    hits.append(hit)
            try:
                page_count = int(answer.get("page_count") or 0)
            except (TypeError, ValueError):
                page_count = 0
            if len(results) < page_size or page >= page_count:
                break
            page += 1
        hits = hits[:num_results]
        return [SearchHit(h.url, h.caption, 1.0 - rank / max(1, len(hits)), h.id) for rank, h in enumerate(hits)]

    def _hit(self, entry: object) -> SearchHit | None:
        if not isinstance(entry, dict):
            return None
        url = entry.get("thumbnail") if self.use_thumbnails else entry.get("url")
        if not isinstance(url, str) or not url:
            url = entry.get("url")
        if not isinstance(url, str) or not url:
            return None
        caption = entry.get("title") if isinstance(entry.get("title"), str) else ""
        tags = [t.get("name") for t in entry.get("tags") or [] if isinstance(t, dict) and isinstance(t.get("name"), str)]
        if tags:
            # Titles are often file names; tags say what is in the picture.
            caption = f"{caption} ({', '.join(tags[:10])})" if caption else ", ".join(tags[:10])
        return SearchHit(url=url, caption=caption[:500], id=str(entry.get("id", "")))

    def ping(self) -> bool:
        return tcp_ping(self.base_url)
