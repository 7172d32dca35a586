"""Queries against the indices: validation shared by gRPC and HTTP, result URLs, metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import quote

from services.common.metrics import Metrics
from services.search.corpus import CorpusRecord
from services.search.index import CaptionIndex, TextEmbedder

MAX_TEXT_CHARS = 1000
MAX_NUM_IMAGES = 1000


class InvalidQuery(ValueError):
    """A request field is wrong; str() is '<field>: <problem>' as the APIs report it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class UnknownIndex(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"indice_name: no index named {name!r} (known: {', '.join(known)})")
        self.name = name


@dataclass(frozen=True)
class SearchHit:
    id: str
    url: str
    caption: str
    similarity: float

    def to_json(self) -> dict:
        return {"id": self.id, "url": self.url, "caption": self.caption, "similarity": self.similarity}


class SearchMetrics:
    """The search service's own metric families; labels are bounded (interface, outcome, route, code)."""

    def __init__(self, metrics: Metrics) -> None:
        self.queries = metrics.counter("queries_total", "Search queries answered", ["interface", "outcome"])
        self.query_latency = metrics.histogram("query_duration_seconds", "Search query latency (embedding + nearest neighbours)", ["interface"])
        self.images_served = metrics.counter("images_served_total", "Image files served over HTTP")
        self.http_responses = metrics.counter("http_responses_total", "HTTP responses", ["route", "code"])
        self.index_images = metrics.gauge("index_images", "Images in a loaded index", ["index"])


def validate_query(text: object, num_images: object) -> tuple[str, int]:
    if not isinstance(text, str):
        raise InvalidQuery("text", "required string")
    text = text.strip()
    if not text:
        raise InvalidQuery("text", "must not be empty")
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidQuery("text", f"longer than {MAX_TEXT_CHARS} characters")
    # bool is an int in Python; JSON true must not mean one image.
    if not isinstance(num_images, int) or isinstance(num_images, bool):
        raise InvalidQuery("num_images", "must be an integer")
    if not 1 <= num_images <= MAX_NUM_IMAGES:
        raise InvalidQuery("num_images", f"must be between 1 and {MAX_NUM_IMAGES}, got {num_images}")
    return text, num_images


class SearchEngine:
    """The loaded indices and the shared embedder. Image ids are looked up across indices in order."""

    def __init__(
        self,
        indices: Mapping[str, CaptionIndex],
        default_index: str,
        embedder: TextEmbedder,
        public_base_url: str,
        metrics: SearchMetrics,
    ) -> None:
        if default_index not in indices:
            raise ValueError(f"default index {default_index!r} is not loaded")
        self.indices = dict(indices)
        self.default_index = default_index
        self.embedder = embedder
        self.public_base_url = public_base_url.rstrip("/")
        self.metrics = metrics
        for name, index in self.indices.items():
            metrics.index_images.labels(index=name).set(len(index))

    def index_names(self) -> list[str]:
        return list(self.indices)

    def resolve(self, indice_name: str) -> CaptionIndex:
        index = self.indices.get(indice_name or self.default_index)
        if index is None:
            raise UnknownIndex(indice_name, self.index_names())
        return index

    def image_url(self, image_id: str) -> str:
        return f"{self.public_base_url}/images/{quote(image_id, safe='')}"

    def search(self, text: object, num_images: object, indice_name: str = "", deduplicate: bool = False, interface: str = "grpc") -> list[SearchHit]:
        """Raises InvalidQuery or UnknownIndex; records the query in the metrics either way."""
        started = time.perf_counter()
        outcome = "error"
        try:
            text, num_images = validate_query(text, num_images)
            index = self.resolve(indice_name)
            query = self.embedder.embed([text])[0]
            matches = index.search(query, num_images, deduplicate=deduplicate)
            hits = [
                SearchHit(m.record.id, m.record.url or self.image_url(m.record.id), m.record.caption, round(m.similarity, 6)) for m in matches
            ]
            outcome = "ok"
            return hits
        except InvalidQuery:
            outcome = "invalid_argument"
            raise
        except UnknownIndex:
            outcome = "not_found"
            raise
        finally:
            self.metrics.queries.labels(interface=interface, outcome=outcome).inc()
            self.metrics.query_latency.labels(interface=interface).observe(time.perf_counter() - started)

    def image(self, image_id: str) -> tuple[CorpusRecord, Path] | None:
        """The record and file of a locally served image id; ids never become paths, so nothing outside
        a corpus is reachable. Remote records (a url instead of a file) are not served here."""
        for index in self.indices.values():
            record = index.corpus.get(image_id)
            if record is not None:
                path = index.corpus.path_of(record)
                return None if path is None else (record, path)
        return None
