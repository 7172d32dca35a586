"""A generic JSON search API as a search backend, described by configuration instead of code.

    JsonApiSpec(
        url="https://search.example/api/images?q={query}&n={num_results}",   # GET
        results_path="data.items",            # where the list of results is ('' = the answer itself)
        url_field="image.src",                # inside one result
        caption_field="title", score_field="score", id_field="id",
    )

POST works the same with `body` a JSON template: any string "{query}" or "{num_results}" inside it
is replaced (num_results alone becomes a number). Placeholders in the URL are percent-encoded.
Paths are dot-separated keys, with integers indexing lists ("media.0.url"). `headers` are sent
with every request (an API key, for instance) and never logged.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from services.crawler.backends import HttpJsonClient, SearchBackend, SearchFailed, SearchHit, tcp_ping

_MISSING = object()


def lookup(value: Any, path: str) -> Any:
    """The value at a dotted path, or _MISSING."""
    if not path:
        return value
    for part in path.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _fill(template: Any, text: str, num_results: int) -> Any:
    if isinstance(template, str):
        if template == "{num_results}":
            return num_results
        return template.replace("{query}", text).replace("{num_results}", str(num_results))
    if isinstance(template, list):
        return [_fill(v, text, num_results) for v in template]
    if isinstance(template, dict):
        return {k: _fill(v, text, num_results) for k, v in template.items()}
    return template


def parse_header_lines(text: str) -> dict[str, str]:
    """'Name: value' pairs separated by newlines or ';;' -> a dict; raises ValueError naming the bad one."""
    headers = {}
    for line in text.replace(";;", "\n").splitlines():
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"header {line.strip()[:40]!r} is not 'Name: value'")
        headers[name.strip()] = value.strip()
    return headers


@dataclass(frozen=True)
class JsonApiSpec:
    url: str
    method: str = "GET"
    body: Any = None
    results_path: str = ""
    url_field: str = "url"
    caption_field: str = "caption"
    score_field: str = ""
    id_field: str = "id"
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in ("GET", "POST"):
            raise ValueError(f"method must be GET or POST, got {self.method!r}")
        if "{query}" not in self.url and "{query}" not in json.dumps(self.body):
            raise ValueError("the URL or the body must contain {query}")
        if not self.url_field:
            raise ValueError("url_field must not be empty")


class JsonApiBackend(SearchBackend):
    def __init__(
        self,
        name: str,
        spec: JsonApiSpec,
        timeout_s: float = 10.0,
        attempts: int = 3,
        backoff_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.name = name
        self.spec = spec
        self.client = HttpJsonClient(name, timeout_s, attempts, backoff_s, sleep=sleep)

    def _request(self, text: str, num_results: int) -> urllib.request.Request:
        spec = self.spec
        url = spec.url.replace("{query}", urllib.parse.quote_plus(text)).replace("{num_results}", str(num_results))
        headers = {"Accept": "application/json", **spec.headers}
        data = None
        if spec.method == "POST":
            data = json.dumps(_fill(spec.body if spec.body is not None else {"query": "{query}"}, text, num_results)).encode()
            headers.setdefault("Content-Type", "application/json")
        return urllib.request.Request(url, data=data, method=spec.method, headers=headers)

    def search(self, text: str, num_results: int) -> list[SearchHit]:
        raw = self.client.send(lambda: self._request(text, num_results))
        try:
            answer = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SearchFailed(f"{self.name}: answer is not JSON ({exc})") from None
        results = lookup(answer, self.spec.results_path)
        if not isinstance(results, list):
            raise SearchFailed(f"{self.name}: no list at {self.spec.results_path or 'the top level'}")
        hits: list[SearchHit] = []
        for rank, entry in enumerate(results):
            url = lookup(entry, self.spec.url_field)
            if not isinstance(url, str) or not url:
                continue
            caption = lookup(entry, self.spec.caption_field) if self.spec.caption_field else _MISSING
            identifier = lookup(entry, self.spec.id_field) if self.spec.id_field else _MISSING
            hits.append(
                SearchHit(
                    url=url,
                    caption=str(caption)[:500] if isinstance(caption, (str, int, float)) else "",
                    similarity=self._score(entry, rank, len(results)),
                    id="" if identifier is _MISSING or identifier is None else str(identifier),
                )
            )
            if len(hits) == num_results:
                break
        return hits

    def _score(self, entry: Any, rank: int, total: int) -> float:
        if self.spec.score_field:
            value = lookup(entry, self.spec.score_field)
            try:
                return float(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                pass
        # Without a score the API's order is all we know.
        return 1.0 - rank / max(1, total)

    def ping(self) -> bool:
        parts = urllib.parse.urlsplit(self.spec.url)
        return tcp_ping(f"{parts.scheme}://{parts.netloc}")
