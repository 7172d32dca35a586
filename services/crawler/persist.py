"""What the crawler keeps in S3 so that replicas agree and restarts change nothing.

- Search answers (`crawler/search-answers/<backend>/<sha256>.json`): a repeated query, on any
  replica, reuses the hits of the first; a cache, so failures only cost a fresh search.
- Crawl outcomes (`crawler/outcomes/<exploration>/<query>.pb`): the exact events a query produced,
  written before the first of them is published. A query redelivered after a crash (on this
  replica or another) republishes those same events instead of crawling again, so downstream sees
  duplicates of identical events, which it already ignores, and never two different answers to
  one query.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from typing import Callable
from urllib.parse import quote

from iex.v1 import events_pb2
from services.common.errors import DependencyUnavailable
from services.common.objectstore import ObjectStore
from services.crawler.backends import SearchHit

log = logging.getLogger(__name__)

ANSWERS_PREFIX = "crawler/search-answers"
OUTCOMES_PREFIX = "crawler/outcomes"
_OUTCOME_MAGIC = b"IEXCRAWL1\n"
_FETCHED, _CRAWLED = b"F", b"C"


def _safe(part: str) -> str:
    return quote(part, safe="") or "_"


class S3AnswerStore:
    """Search answers shared through S3 (best effort: never raises)."""

    def __init__(self, store: ObjectStore, bucket: str, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.bucket = bucket
        self._clock = clock

    def key(self, key: tuple[str, str, int]) -> str:
        backend, text, num_results = key
        digest = hashlib.sha256(f"{text}\0{num_results}".encode()).hexdigest()
        return f"{ANSWERS_PREFIX}/{_safe(backend)}/{digest[:2]}/{digest}.json"

    def get(self, key: tuple[str, str, int], max_age_s: float) -> tuple[SearchHit, ...] | None:
        try:
            record = self.store.get_json(self.bucket, self.key(key))
        except Exception as exc:  # noqa: BLE001 - a cache read failure is a miss
            log.warning("search answer cache unreadable", extra={"error": str(exc)[:200]})
            return None
        if not isinstance(record, dict) or [record.get("backend"), record.get("text"), record.get("num_results")] != list(key):
            return None
        if max_age_s > 0 and self._clock() - float(record.get("stored_at", 0)) > max_age_s:
            return None
        try:
            return tuple(SearchHit(str(h["url"]), str(h.get("caption", "")), float(h.get("similarity", 0.0)), str(h.get("id", ""))) for h in record["hits"])
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, key: tuple[str, str, int], hits: tuple[SearchHit, ...]) -> None:
        backend, text, num_results = key
        record = {
            "backend": backend,
            "text": text,
            "num_results": num_results,
            "stored_at": self._clock(),
            "hits": [{"url": h.url, "caption": h.caption, "similarity": h.similarity, "id": h.id} for h in hits],
        }
        try:
            self.store.put_bytes(self.bucket, self.key(key), json.dumps(record).encode(), content_type="application/json")
        except Exception as exc:  # noqa: BLE001 - the answer is still used; only sharing it failed
            log.warning("search answer not shared", extra={"error": str(exc)[:200]})


def encode_outcome(fetched: tuple[events_pb2.ImageFetched, ...], crawled: events_pb2.QueryCrawled) -> bytes:
    parts = [_OUTCOME_MAGIC]
    for kind, message in [*((_FETCHED, f) for f in fetched), (_CRAWLED, crawled)]:
        data = message.SerializeToString()
        parts.append(kind + struct.pack(">I", len(data)) + data)
    return b"".join(parts)


def decode_outcome(data: bytes) -> tuple[tuple[events_pb2.ImageFetched, ...], events_pb2.QueryCrawled]:
    """Raises ValueError on anything but a complete record."""
    if not data.startswith(_OUTCOME_MAGIC):
        raise ValueError("not a crawl outcome record")
    offset = len(_OUTCOME_MAGIC)
    fetched: list[events_pb2.ImageFetched] = []
    crawled: events_pb2.QueryCrawled | None = None
    while offset < len(data):
        if crawled is not None or offset + 5 > len(data):
            raise ValueError("crawl outcome record is malformed")
        kind = data[offset : offset + 1]
        (length,) = struct.unpack(">I", data[offset + 1 : offset + 5])
        body = data[offset + 5 : offset + 5 + length]
        if len(body) != length:
            raise ValueError("crawl outcome record is truncated")
        offset += 5 + length
        if kind == _FETCHED:
            fetched.append(events_pb2.ImageFetched.FromString(body))
        elif kind == _CRAWLED:
            crawled = events_pb2.QueryCrawled.FromString(body)
        else:
            raise ValueError(f"unknown entry {kind!r} in crawl outcome record")
    if crawled is None:
        raise ValueError("crawl outcome record has no QueryCrawled")
    return tuple(fetched), crawled


class S3OutcomeStore:
    """Crawl outcomes by (exploration, query). Failures raise DependencyUnavailable: the query waits."""

    def __init__(self, store: ObjectStore, bucket: str) -> None:
        self.store = store
        self.bucket = bucket

    @staticmethod
    def key(exploration_id: str, query_id: str) -> str:
        return f"{OUTCOMES_PREFIX}/{_safe(exploration_id)}/{_safe(query_id)}.pb"

    def get(self, exploration_id: str, query_id: str) -> tuple[tuple[events_pb2.ImageFetched, ...], events_pb2.QueryCrawled] | None:
        data = self.store.get_or_none(self.bucket, self.key(exploration_id, query_id))
        if data is None:
            return None
        try:
            return decode_outcome(data)
        except ValueError as exc:
            # A damaged record is worth less than a fresh crawl; it is overwritten by the next one.
            log.warning("crawl outcome record unreadable, crawling again", extra={"query_id": query_id, "error": str(exc)})
            return None

    def put(self, fetched: tuple[events_pb2.ImageFetched, ...], crawled: events_pb2.QueryCrawled) -> None:
        data = encode_outcome(fetched, crawled)
        try:
            self.store.put_bytes(self.bucket, self.key(crawled.exploration_id, crawled.query_id), data, content_type="application/x-protobuf")
        except DependencyUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - S3 refusing a write is an outage for this handler
            raise DependencyUnavailable(f"s3 put crawl outcome failed: {exc}") from exc
