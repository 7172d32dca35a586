"""The dedup decision for one fetched image, and the objects it writes. No Kafka here: the service publishes.

Object layout (bucket IEX_S3_BUCKET):

    decisions/<exploration>/<raw sha256>/<query>-<url hash>.json    decision record (audit, idempotence)
    images/ab/cd/<pixel sha256>                                     accepted image, first finder in metadata
    provenance/<pixel sha256>/<exploration>-<query>-<url hash>.json every later (query, URL) credited with it

A decision is found by image (GetDecision) by listing `decisions/<exploration>/<raw sha256>/`. The
first finder of an object is named by the object's own metadata; provenance records credit the
duplicates found after it. Per accepted image that is one object and one record written (plus the
index intent, services.dedup.sharedindex), nothing read back but the object's HEAD.

`<url hash>` is the first 16 hex digits of sha256(url): one image found by one query under two URLs
gets two decisions (the second an exact duplicate of the first).

The decision, in order: INVALID (policy, decoding) -> CONTAMINATES_TARGET (the exploration's target
evaluation split, services.dedup.targets) -> EXACT_DUPLICATE (an object with the same pixel sha) ->
NEAR_DUPLICATE (a stored image within `near_duplicate_max_distance` in the shared index,
services.dedup.sharedindex) -> UNIQUE (stored). A duplicate credits its query and URL to the object it
duplicates (a provenance record under that object) instead of storing anything.

Crash safety. The decision record is written last, after everything it describes, and the service
publishes only after `decide_and_store` returns; the consumer commits only after publishing. So:
- a redelivered image whose record exists is answered from the record, unchanged (no new decision,
  no new object, same events re-published). The record is read only when the decision is not a new
  object: an image whose pixels are stored nowhere, near nowhere, was never decided before (every
  earlier decision of it left an object, an index entry or a record naming a rejection that a redo
  reaches again first), so the common case costs no read;
- a crash anywhere before the record is written just redoes the decision. The one step that would
  decide differently on a redo is the exact-duplicate check (the image would find its own object),
  so each object's metadata names its first finder (exploration, query, raw sha256, URL hash) and a
  redo by that finder is the same UNIQUE decision again;
- an accepted image's index entry is made durable (a write-ahead intent) before its object, so no
  crash leaves a stored image out of the near-duplicate index. An intent whose object was never
  written is completed by whoever meets it (`complete_intent`): same bytes, same first-finder
  metadata, so the first finder's redo is still UNIQUE and nothing refers to a missing object.

Known limit: two different files with identical pixels decided at the same moment on two replicas
(fetched images are keyed by raw sha256, so they can land on different partitions) may both be
called UNIQUE; they write the same key with the same pixels, so storage stays correct and only the
counts see two new images. A conditional put (If-None-Match) closes this where the store supports it.
The same window for near-duplicates is described in services.dedup.sharedindex.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from iex.v1 import common_pb2, events_pb2
from services.common.errors import DependencyUnavailable, PermanentError
from services.common.objectstore import content_key, parse_s3_uri
from services.dedup.encoding import encode_for_storage
from services.dedup.explorations import valid_id
from services.dedup.hashing import (
    DEFAULT_MAX_PIXELS,
    HASH_VERSION,
    ImageHashes,
    ImageRejected,
    decode_image,
    hash_hex,
    image_hashes,
    pixel_sha256_of,
    raw_sha256,
)
from services.dedup.nearindex import NearMatch
from services.dedup.segments import Intent
from services.dedup.sharedindex import SharedNearIndex
from services.dedup.targets import TargetHashes

log = logging.getLogger(__name__)

DECISIONS_PREFIX = "decisions"
IMAGES_PREFIX = "images"
PROVENANCE_PREFIX = "provenance"
RECORD_VERSION = 1

SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")

# A near-duplicate lookup that meets this many entries whose object is lost gives up (and retries).
MAX_LOST_INTENTS_PER_DECISION = 16

UNIQUE = common_pb2.DECISION_KIND_UNIQUE
EXACT_DUPLICATE = common_pb2.DECISION_KIND_EXACT_DUPLICATE
NEAR_DUPLICATE = common_pb2.DECISION_KIND_NEAR_DUPLICATE
CONTAMINATES_TARGET = common_pb2.DECISION_KIND_CONTAMINATES_TARGET
INVALID = common_pb2.DECISION_KIND_INVALID


def kind_label(kind: int) -> str:
    """Bounded metric label / stats key: "unique", "exact_duplicate", ..."""
    return common_pb2.DecisionKind.Name(kind).removeprefix("DECISION_KIND_").lower()


def url_hash(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def decision_key(exploration_id: str, query_id: str, raw_sha: str, url: str) -> str:
    return f"{decisions_of_image(exploration_id, raw_sha)}{query_id}-{url_hash(url)}.json"


def decisions_of_image(exploration_id: str, raw_sha: str) -> str:
    """The prefix of every decision of one image (raw bytes) in one exploration, by any query or URL."""
    return f"{DECISIONS_PREFIX}/{exploration_id}/{raw_sha}/"


def image_key(pixel_sha: str) -> str:
    return content_key(IMAGES_PREFIX, pixel_sha)


def provenance_key(pixel_sha: str, exploration_id: str, query_id: str, url: str) -> str:
    return f"{PROVENANCE_PREFIX}/{pixel_sha}/{exploration_id}-{query_id}-{url_hash(url)}.json"


_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in "%")


def header_value(text: str, limit: int, keep_escapes: bool = False) -> str:
    """Printable ASCII for S3 metadata (sent as HTTP headers): other characters percent-encoded, then cut.

    keep_escapes: the text is already percent-encoded (a URL); its escapes are kept as they are.
    """
    encoded = quote(text, safe=_HEADER_SAFE + ("%" if keep_escapes else ""))[:limit]
    # Never leave half of a %XX escape at the cut.
    cut = encoded.rfind("%", max(0, len(encoded) - 2))
    return encoded[:cut] if cut != -1 else encoded


def sanitise_url(url: str, limit: int = 512) -> str:
    """scheme://host/path only: credentials, query strings (signed tokens) and fragments are dropped."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{host}:{parts.port}" if parts.port else host
        clean = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        clean = url.split("?", 1)[0].split("#", 1)[0]
    return header_value(clean, limit, keep_escapes=True)


def now_timestamp() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


@dataclass(frozen=True)
class DedupPolicy:
    max_image_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    min_image_side: int = 16
    # pHash + dHash distance to one evaluation image at or below which an image contaminates the
    # target; -1: identical pixels only.
    contamination_max_distance: int = 22
    # A new object up to this size also travels in its ImageDecision (image_data), so the scorer
    # need not read it back from S3; 0: never.
    inline_max_bytes: int = 256 * 1024


@dataclass(frozen=True)
class DedupOutcome:
    decision: events_pb2.ImageDecision
    # Only for UNIQUE decisions.
    stored: events_pb2.ImageStored | None
    # True when the decision was read back from its record (a redelivery), not made by this call.
    replayed: bool = False
    # Bytes written as a new image object by this call.
    bytes_written: int = 0


class Guard(Protocol):
    def for_exploration(self, exploration_id: str) -> TargetHashes: ...


@dataclass
class _Claim:
    """New pixels one decision of this process is writing: the object's metadata, and when it is done."""

    pixel_sha256: str
    metadata: dict[str, str]
    done: threading.Event = field(default_factory=threading.Event)
    written: bool = False


class _Claims:
    """The claims of this process: open while being written, then remembered for a while.

    A decision that read "no object" before a concurrent one wrote it finds the written claim here
    instead (an exact duplicate, not a second UNIQUE); the object is there by then, so forgetting old
    claims is safe once no read can be that old.
    """

    REMEMBERED = 4096
    WAIT_S = 120.0

    def __init__(self) -> None:
        self._claims: OrderedDict[str, _Claim] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, pixel_sha256: str) -> _Claim | None:
        with self._lock:
            return self._claims.get(pixel_sha256)

    def open(self, pixel_sha256: str, metadata: dict[str, str]) -> _Claim:
        claim = _Claim(pixel_sha256, metadata)
        with self._lock:
            self._claims[pixel_sha256] = claim
            self._claims.move_to_end(pixel_sha256)
            while len(self._claims) > self.REMEMBERED:
                oldest, first = next(iter(self._claims.items()))
                if not first.done.is_set():
                    break
                del self._claims[oldest]
        return claim

    def close(self, claim: _Claim, written: bool) -> None:
        claim.written = written
        if not written:
            with self._lock:
                if self._claims.get(claim.pixel_sha256) is claim:
                    del self._claims[claim.pixel_sha256]
        claim.done.set()

    def wait(self, claim: _Claim) -> dict[str, str]:
        """The written object's metadata; a claim whose writes failed makes this decision retry later."""
        if not claim.done.wait(self.WAIT_S) or not claim.written:
            raise DependencyUnavailable(f"image {claim.pixel_sha256[:16]} was being stored by another decision that did not finish; retrying later")
        return claim.metadata


class Deduplicator:
    def __init__(self, store, bucket: str, guard: Guard, policy: DedupPolicy = DedupPolicy(), near: SharedNearIndex | None = None) -> None:
        self.store = store
        self.bucket = bucket
        self.guard = guard
        self.policy = policy
        # None: exact duplicates only.
        self.near = near
        self._claim = threading.RLock()
        self._claims = _Claims()

    # ---- the whole decision ------------------------------------------------------------------
    def decide_and_store(self, fetched: events_pb2.ImageFetched) -> DedupOutcome:
        validate_fetched(fetched)
        key = decision_key(fetched.exploration_id, fetched.query_id, fetched.raw_sha256, fetched.url)
        outcome, hashes, stored_format = self._decide(fetched)
        if not outcome.bytes_written:
            # Not a new object: this may be a redelivery, answered from its record if there is one.
            record = self.store.get_json(self.bucket, key)
            if record is not None:
                return outcome_from_record(record)
        if outcome.decision.kind in (EXACT_DUPLICATE, NEAR_DUPLICATE):
            self._write_provenance(fetched, outcome.decision)
        # The record last: it is the commit point of the decision.
        self.store.put_json(self.bucket, key, record_of(key, outcome, hashes, stored_format))
        return outcome

    def _decide(self, fetched: events_pb2.ImageFetched) -> tuple[DedupOutcome, ImageHashes | None, str]:
        data = self._staged_bytes(fetched)
        if len(data) > self.policy.max_image_bytes:
            return self._invalid(fetched, "too_large"), None, ""
        if raw_sha256(data) != fetched.raw_sha256:
            return self._invalid(fetched, "raw_sha256_mismatch"), None, ""
        try:
            decoded = decode_image(data, self.policy.max_image_pixels, self.policy.min_image_side)
            hashes = image_hashes(data, decoded, self.policy.max_image_pixels)
        except ImageRejected as exc:
            return self._invalid(fetched, exc.reason), None, ""

        match = self.guard.for_exploration(fetched.exploration_id).match(hashes, self.policy.contamination_max_distance)
        if match is not None:
            decision = self._decision(fetched, CONTAMINATES_TARGET, hashes.pixel_sha256)
            decision.contaminated_target_id = match.target_id
            decision.hamming_distance = match.distance
            decision.reason = "exact_pixels" if match.exact else "near_hash"
            return DedupOutcome(decision, None), hashes, ""

        object_key = image_key(hashes.pixel_sha256)
        # Most images are new: encoded before the claim below, so that other images' decisions do not wait for it.
        encoding = encode_for_storage(data, decoded, hashes.pixel_sha256, self.policy.max_image_pixels)
        bytes_written = 0
        # Read before the claim, in parallel with other decisions: an object that exists stays.
        existing = self._existing_object(hashes.pixel_sha256, fetched)
        near: NearMatch | None = None
        waits_for: _Claim | None = None
        claim: _Claim | None = None
        # Concurrent decisions (the service decides a batch on several threads) take turns to claim
        # new pixels: two copies or near-copies decided at once must not both be UNIQUE. The claim
        # is in memory only; the writes of a claimed image and the reads above run in parallel, and a
        # decision that meets an image still being written here waits for that image alone.
        with self._claim:
            mine = self._claims.get(hashes.pixel_sha256)
            if mine is not None:
                waits_for = mine  # the same pixels, being (or just) written by another decision here
            elif existing is None:
                near, waits_for = self._near_match(hashes)
                if near is None:
                    metadata = object_metadata(fetched, decoded.width, decoded.height, hashes, encoding.label, len(encoding.data))
                    claim = self._claims.open(hashes.pixel_sha256, metadata)
                    intent = self._intent(fetched, hashes, metadata) if self._indexable(hashes) else None
                    if intent is not None:
                        self.near.reserve(intent)  # seen by every later decision here from now on
        if claim is not None:
            self._write_claimed(claim, intent, object_key, encoding)
            kind, size, stored_format, bytes_written = UNIQUE, len(encoding.data), encoding.label, len(encoding.data)
        else:
            if waits_for is not None:
                written = self._claims.wait(waits_for)
                if near is None:
                    existing = written
            if existing is not None and is_first_finder(existing, fetched):
                # Our own object from an attempt that crashed before its decision record.
                kind, size, stored_format = UNIQUE, _int(existing.get("size-bytes")), existing.get("format", "")
                self._ensure_indexed(fetched, hashes, existing)
            elif existing is not None:
                kind, size, stored_format = EXACT_DUPLICATE, 0, existing.get("format", "")
            else:
                kind, size, stored_format = NEAR_DUPLICATE, 0, ""

        decision = self._decision(fetched, kind, hashes.pixel_sha256)
        decision.object_key = object_key
        stored = None
        if kind == UNIQUE:
            decision.reason = "stored"
            if bytes_written and bytes_written <= self.policy.inline_max_bytes:
                decision.image_data = encoding.data  # exactly the object's bytes: the scorer's input is the same either way
            stored = events_pb2.ImageStored(
                pixel_sha256=hashes.pixel_sha256,
                object_key=object_key,
                exploration_id=fetched.exploration_id,
                iteration=fetched.iteration,
                query_id=fetched.query_id,
                concept=fetched.concept,
                width=decoded.width,
                height=decoded.height,
                size_bytes=size,
                stored_at=decision.decided_at,
            )
        elif kind == EXACT_DUPLICATE:
            decision.reason = "same_pixels"
            decision.duplicate_of = hashes.pixel_sha256
        else:
            decision.reason = "near_hash"
            decision.duplicate_of = near.pixel_sha256
            decision.hamming_distance = near.distance
            decision.object_key = image_key(near.pixel_sha256)
        return DedupOutcome(decision, stored, bytes_written=bytes_written), hashes, stored_format

    # ---- the shared near-duplicate index -----------------------------------------------------
    def _indexable(self, hashes: ImageHashes) -> bool:
        return self.near is not None and hashes.informative

    def _near_match(self, hashes: ImageHashes) -> tuple[NearMatch | None, "_Claim | None"]:
        """The nearest stored image, and the claim to wait for when it is still being written here."""
        if not self._indexable(hashes) or self.near.max_distance < 0:
            return None, None
        for _ in range(MAX_LOST_INTENTS_PER_DECISION):
            match = self.near.nearest(hashes.phash, hashes.dhash, exclude=hashes.pixel_sha256)
            if match is None:
                return None, None
            pending = self._claims.get(match.pixel_sha256)
            if pending is not None:
                return match, pending
            intent = self.near.intent(match.pixel_sha256)
            if intent is None or self.complete_intent(intent):
                return match, None
            # An entry whose object can never exist: gone from the index, look again.
        raise DependencyUnavailable("too many near-duplicate candidates without an object; retrying the image later")

    def _write_claimed(self, claim: "_Claim", intent: Intent | None, object_key: str, encoding) -> None:
        """The claimed image's intent (durable before its object), then the object; waiters learn the outcome."""
        intent_written = False
        try:
            if intent is not None:
                self.near.write_intent(intent)
                intent_written = True
            self.store.put_bytes(self.bucket, object_key, encoding.data, content_type=encoding.content_type, metadata=claim.metadata)
            if intent is not None:
                self.near.stored(intent.pixel_sha256)
        except BaseException:
            if intent is not None and not intent_written:
                self.near.forget(intent.pixel_sha256)  # never durable: nobody else may count on it
            self._claims.close(claim, written=False)
            raise
        self._claims.close(claim, written=True)

    def _existing_object(self, pixel_sha: str, fetched: events_pb2.ImageFetched) -> dict[str, str] | None:
        """The stored object's metadata; an intent of another finder for these pixels is completed first."""
        existing = self.store.stat_metadata(self.bucket, image_key(pixel_sha))
        if existing is not None or self.near is None:
            return existing
        intent = self.near.intent(pixel_sha)
        if intent is None or is_first_finder(intent.metadata, fetched):
            return None  # nothing stored, or our own attempt that died before its object: redone below
        if not self.complete_intent(intent):
            return None
        return self.store.stat_metadata(self.bucket, image_key(pixel_sha))

    def _ensure_indexed(self, fetched: events_pb2.ImageFetched, hashes: ImageHashes, metadata: dict[str, str]) -> None:
        """A redone UNIQUE decision: its entry was made durable before its object; keep it in memory too."""
        if not self._indexable(hashes):
            return
        if hashes.pixel_sha256 in self.near:
            self.near.confirm(hashes.pixel_sha256)  # known through the intent: the object exists
            return
        self.near.write_intent(self._intent(fetched, hashes, dict(metadata)))
        self.near.stored(hashes.pixel_sha256)

    def complete_intent(self, intent: Intent) -> bool:
        """Makes sure the object of an intent exists, writing it as its first finder would have; False if it cannot."""
        outcome = self._complete(intent)
        if self.near is not None:
            self.near.metrics.completed.labels(outcome=outcome).inc()
        if outcome == "lost":
            log.warning("intent without object or staged bytes dropped", extra={"pixel_sha256": intent.pixel_sha256})
            if self.near is not None:
                self.near.drop(intent.pixel_sha256)
            return False
        if self.near is not None:
            self.near.confirm(intent.pixel_sha256)
        return True

    def _complete(self, intent: Intent) -> str:
        key = image_key(intent.pixel_sha256)
        if self.store.stat_metadata(self.bucket, key) is not None:
            return "present"
        data = intent.data or (self.store.get_or_none(intent.staging_bucket, intent.staging_key) if intent.staging_key else None)
        if data is None or raw_sha256(data) != intent.raw_sha256:
            return "lost"
        try:
            decoded = decode_image(data, self.policy.max_image_pixels)
        except ImageRejected:
            return "lost"
        if pixel_sha256_of(decoded.rgb) != intent.pixel_sha256:
            return "lost"
        encoding = encode_for_storage(data, decoded, intent.pixel_sha256, self.policy.max_image_pixels)
        metadata = {**intent.metadata, "format": encoding.label, "size-bytes": str(len(encoding.data))}
        self.store.put_bytes(self.bucket, key, encoding.data, content_type=encoding.content_type, metadata=metadata)
        return "written"

    # ---- pieces ------------------------------------------------------------------------------
    def _staged_location(self, fetched: events_pb2.ImageFetched) -> tuple[str, str]:
        if fetched.staging_key.startswith("s3://"):
            return parse_s3_uri(fetched.staging_key)
        return self.bucket, fetched.staging_key

    def _intent(self, fetched: events_pb2.ImageFetched, hashes: ImageHashes, metadata: dict[str, str]) -> Intent:
        """How to write the object again: from the staged copy, or (nothing staged) the carried bytes themselves."""
        bucket, staging_key = self._staged_location(fetched) if fetched.staging_key else (self.bucket, "")
        data = b"" if fetched.staging_key else fetched.data
        return Intent(hashes.pixel_sha256, hashes.phash, hashes.dhash, bucket, staging_key, fetched.raw_sha256, metadata, self.near.writer, data)

    def _staged_bytes(self, fetched: events_pb2.ImageFetched) -> bytes:
        if fetched.data:
            return fetched.data  # carried by the event; checked against raw_sha256 like a staged copy
        bucket, key = self._staged_location(fetched)
        data = self.store.get_or_none(bucket, key)
        if data is None:
            raise PermanentError("staging_missing", fetched.staging_key[:200])
        return data

    def _decision(self, fetched: events_pb2.ImageFetched, kind: int, pixel_sha: str = "") -> events_pb2.ImageDecision:
        return events_pb2.ImageDecision(
            exploration_id=fetched.exploration_id,
            iteration=fetched.iteration,
            query_id=fetched.query_id,
            concept=fetched.concept,
            url=fetched.url,
            raw_sha256=fetched.raw_sha256,
            pixel_sha256=pixel_sha,
            kind=kind,
            decided_at=now_timestamp(),
        )

    def _invalid(self, fetched: events_pb2.ImageFetched, reason: str) -> DedupOutcome:
        decision = self._decision(fetched, INVALID)
        decision.reason = reason
        return DedupOutcome(decision, None)

    def _write_provenance(self, fetched: events_pb2.ImageFetched, decision: events_pb2.ImageDecision) -> None:
        # Credited to the object the decision points at (a near-duplicate's is another image's);
        # keyed by (object, exploration, query, URL): a redo overwrites the same object.
        stored_sha = decision.duplicate_of if decision.kind == NEAR_DUPLICATE else decision.pixel_sha256
        self.store.put_json(
            self.bucket,
            provenance_key(stored_sha, fetched.exploration_id, fetched.query_id, fetched.url),
            {
                "pixel_sha256": stored_sha,
                "fetched_pixel_sha256": decision.pixel_sha256,
                "hamming_distance": decision.hamming_distance,
                "exploration_id": fetched.exploration_id,
                "iteration": fetched.iteration,
                "query_id": fetched.query_id,
                "concept": fetched.concept,
                "url": sanitise_url(fetched.url),
                "raw_sha256": fetched.raw_sha256,
                "kind": common_pb2.DecisionKind.Name(decision.kind),
            },
        )


def validate_fetched(fetched: events_pb2.ImageFetched) -> None:
    """Fields that become parts of object keys must be safe there; a bad event is dead-lettered."""
    if not valid_id(fetched.exploration_id):
        raise PermanentError("invalid_event", f"exploration_id {fetched.exploration_id[:80]!r}")
    if not valid_id(fetched.query_id):
        raise PermanentError("invalid_event", f"query_id {fetched.query_id[:80]!r}")
    if not SHA256_PATTERN.match(fetched.raw_sha256):
        raise PermanentError("invalid_event", f"raw_sha256 {fetched.raw_sha256[:80]!r}")
    if not fetched.staging_key and not fetched.data:
        raise PermanentError("invalid_event", "staging_key and data are both empty")


def object_metadata(fetched: events_pb2.ImageFetched, width: int, height: int, hashes: ImageHashes, stored_format: str, size: int) -> dict[str, str]:
    """Provenance of the first finder; written once with the object (S3 allows 2 KB of it)."""
    return {
        "exploration-id": fetched.exploration_id,
        "query-id": fetched.query_id,
        "raw-sha256": fetched.raw_sha256,
        "url-hash": url_hash(fetched.url),
        "source-url": sanitise_url(fetched.url),
        "concept": header_value(fetched.concept, 128),
        "width": str(width),
        "height": str(height),
        "hash-version": HASH_VERSION,
        "dhash": hash_hex(hashes.dhash),
        "phash": hash_hex(hashes.phash),
        # "flat" pictures are never matched by distance (hashing.MIN_LOW_FREQUENCY_AMPLITUDE).
        "perceptual": "informative" if hashes.informative else "flat",
        "format": stored_format,
        "size-bytes": str(size),
    }


def is_first_finder(metadata: Mapping[str, str], fetched: events_pb2.ImageFetched) -> bool:
    return (
        metadata.get("exploration-id") == fetched.exploration_id
        and metadata.get("query-id") == fetched.query_id
        and metadata.get("raw-sha256") == fetched.raw_sha256
        and metadata.get("url-hash") == url_hash(fetched.url)
    )


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def record_of(key: str, outcome: DedupOutcome, hashes: ImageHashes | None, stored_format: str) -> dict:
    decision = events_pb2.ImageDecision()
    decision.CopyFrom(outcome.decision)
    decision.ClearField("image_data")  # the object holds the bytes; a replayed decision goes without them
    return {
        "record_version": RECORD_VERSION,
        "decision_key": key,
        "decision": json_format.MessageToDict(decision, preserving_proto_field_name=True),
        "stored": None if outcome.stored is None else json_format.MessageToDict(outcome.stored, preserving_proto_field_name=True),
        "hashes": None
        if hashes is None
        else {"hash_version": HASH_VERSION, "dhash": hash_hex(hashes.dhash), "phash": hash_hex(hashes.phash), "informative": hashes.informative},
        "stored_format": stored_format,
    }


def decision_from_record(record: Mapping) -> events_pb2.ImageDecision:
    return json_format.ParseDict(record["decision"], events_pb2.ImageDecision(), ignore_unknown_fields=True)


def outcome_from_record(record: Mapping) -> DedupOutcome:
    stored = record.get("stored")
    return DedupOutcome(
        decision=decision_from_record(record),
        stored=None if not stored else json_format.ParseDict(stored, events_pb2.ImageStored(), ignore_unknown_fields=True),
        replayed=True,
    )
