"""How the near-duplicate index is kept in S3: segments, write-ahead intents and their keys.

    dedup/near-index/v<hash version>/segments/<count>-<created ns>-<writer>-<nonce>.seg
    dedup/near-index/v<hash version>/wal/<pixel sha256>.json
    dedup/near-index/v<hash version>/initialised.json

A *segment* is an immutable batch of entries (pixel sha256, pHash, dHash) of images whose object is
stored. Its key starts with its entry count, so compaction can pick the small ones from a listing.
Body: a JSON header line, then the shas (32 bytes each), pHashes and dHashes (little-endian uint64);
the header carries a sha256 of the body, so a truncated or foreign object is refused, not half-read.

A *write-ahead intent* is written just before an accepted image's object: its hashes plus what it
takes to store that object again (staged bytes, first-finder metadata). An intent whose object is
missing (the writer died in between) is completed by whoever finds it; see services.dedup.sharedindex.

The hash version is part of the prefix: hashes of another version are not comparable, and an index
of the current version is rebuilt from the stored objects (services.dedup.reindex).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass, field

import numpy as np

from services.dedup.hashing import HASH_VERSION, hash_hex, parse_hash_hex

ROOT = "dedup/near-index"
SEGMENT_MAGIC = b"IEXNEAR1"
INTENT_VERSION = 1

_SEGMENT_NAME = re.compile(r"^(\d{10})-(\d{20})-([A-Za-z0-9_.-]{1,80})-([0-9a-f]{8})\.seg$")
_WAL_NAME = re.compile(r"^([0-9a-f]{64})\.json$")


class SegmentError(ValueError):
    """An object under the index prefix that is not a valid segment or intent."""


def prefix(hash_version: str = HASH_VERSION) -> str:
    return f"{ROOT}/v{hash_version}/"


def segments_prefix(hash_version: str = HASH_VERSION) -> str:
    return prefix(hash_version) + "segments/"


def wal_prefix(hash_version: str = HASH_VERSION) -> str:
    return prefix(hash_version) + "wal/"


def marker_key(hash_version: str = HASH_VERSION) -> str:
    return prefix(hash_version) + "initialised.json"


def safe_writer(writer: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", writer)[:80] or "writer"


def new_segment_key(count: int, writer: str, hash_version: str = HASH_VERSION) -> str:
    return f"{segments_prefix(hash_version)}{count:010d}-{time.time_ns():020d}-{safe_writer(writer)}-{secrets.token_hex(4)}.seg"


def segment_count(key: str) -> int | None:
    """Entries of a segment, read from its key; None when the key is not a segment's."""
    match = _SEGMENT_NAME.match(key.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def wal_key(pixel_sha256: str, hash_version: str = HASH_VERSION) -> str:
    return f"{wal_prefix(hash_version)}{pixel_sha256}.json"


def wal_sha(key: str) -> str | None:
    match = _WAL_NAME.match(key.rsplit("/", 1)[-1])
    return match.group(1) if match else None


# ---- segments --------------------------------------------------------------------------------
def encode_segment(shas: np.ndarray, phash: np.ndarray, dhash: np.ndarray, writer: str) -> bytes:
    if shas.shape != (len(phash), 32) or len(phash) != len(dhash):
        raise ValueError("shas must be (n, 32) and the hash arrays n long")
    body = np.ascontiguousarray(shas, dtype=np.uint8).tobytes() + phash.astype("<u8").tobytes() + dhash.astype("<u8").tobytes()
    header = {
        "hash_version": HASH_VERSION,
        "count": int(len(phash)),
        "writer": writer,
        "created_at": time.time(),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    return SEGMENT_MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + body


def decode_segment(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shas (n, 32) uint8, pHash uint64, dHash uint64); SegmentError when the bytes are not a whole segment."""
    if not data.startswith(SEGMENT_MAGIC):
        raise SegmentError("not a segment")
    end = data.find(b"\n", len(SEGMENT_MAGIC))
    if end < 0:
        raise SegmentError("segment header not terminated")
    try:
        header = json.loads(data[len(SEGMENT_MAGIC) : end])
        count = int(header["count"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SegmentError(f"segment header: {exc}") from exc
    if header.get("hash_version") != HASH_VERSION:
        raise SegmentError(f"segment of hash version {header.get('hash_version')!r}")
    body = data[end + 1 :]
    if len(body) != count * 48 or hashlib.sha256(body).hexdigest() != header.get("body_sha256"):
        raise SegmentError("segment body truncated or corrupt")
    shas = np.frombuffer(body, dtype=np.uint8, count=count * 32).reshape(count, 32)
    phash = np.frombuffer(body, dtype="<u8", count=count, offset=count * 32).astype(np.uint64)
    dhash = np.frombuffer(body, dtype="<u8", count=count, offset=count * 40).astype(np.uint64)
    return shas, phash, dhash


# ---- write-ahead intents ---------------------------------------------------------------------
@dataclass(frozen=True)
class Intent:
    """An accepted image about to be stored: its hashes and how to store it again."""

    pixel_sha256: str
    phash: int
    dhash: int
    staging_bucket: str
    staging_key: str
    raw_sha256: str
    # The object's metadata (first finder, sizes, hashes): what the completed object carries.
    metadata: dict[str, str] = field(default_factory=dict)
    writer: str = ""
    # The fetched bytes when nothing was staged (they travelled in the event): the intent is then
    # the only copy that can complete the object.
    data: bytes = b""

    def to_json(self) -> dict:
        return {
            "intent_version": INTENT_VERSION,
            "hash_version": HASH_VERSION,
            "pixel_sha256": self.pixel_sha256,
            "phash": hash_hex(self.phash),
            "dhash": hash_hex(self.dhash),
            "staging_bucket": self.staging_bucket,
            "staging_key": self.staging_key,
            "raw_sha256": self.raw_sha256,
            "metadata": dict(self.metadata),
            "writer": self.writer,
            **({"data_base64": base64.b64encode(self.data).decode("ascii")} if self.data else {}),
        }

    @classmethod
    def from_json(cls, value: dict) -> "Intent":
        try:
            if value.get("hash_version") != HASH_VERSION:
                raise SegmentError(f"intent of hash version {value.get('hash_version')!r}")
            return cls(
                pixel_sha256=str(value["pixel_sha256"]),
                phash=parse_hash_hex(value["phash"]),
                dhash=parse_hash_hex(value["dhash"]),
                staging_bucket=str(value["staging_bucket"]),
                staging_key=str(value["staging_key"]),
                raw_sha256=str(value["raw_sha256"]),
                metadata={str(k): str(v) for k, v in dict(value.get("metadata") or {}).items()},
                writer=str(value.get("writer", "")),
                data=base64.b64decode(value["data_base64"], validate=True) if value.get("data_base64") else b"",
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, SegmentError):
                raise
            raise SegmentError(f"intent: {exc}") from exc
