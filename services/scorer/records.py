"""What the scorer keeps in S3 so that a restarted replica knows what it knew (prefix `scorer/`).

- `scorer/explorations/<id>.json`    the exploration's target (from ExplorationCreated)
- `scorer/serving/<id>.json`         the model version announced with ModelServing
- `scorer/pending-models/<id>.json`  a ModelPublished that arrived before its ExplorationCreated
- `scorer/parked-decisions/<id>/<parked at, ms>-<token>.json`  decisions of a committed batch that
  no model served yet (docs/scorer.md, "Decisions before the first model")
- `scorer/concepts/<id>/<query>.json` a query's running concept reward (services.scorer.concepts)

Embeddings (images and target banks, per model version) live under `embeddings/`; see
services.scorer.embeddings.

Each record is written before the event that depends on it is published, so after a crash the
record is never behind what other services were told.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any, Sequence

from iex.v1 import events_pb2

PREFIX = "scorer"
# Ids become object keys: no slashes, no dot-segments, bounded length.
_EXPLORATION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def valid_exploration_id(exploration_id: str) -> bool:
    return bool(_EXPLORATION_ID_RE.match(exploration_id)) and ".." not in exploration_id


def exploration_key(exploration_id: str) -> str:
    return f"{PREFIX}/explorations/{exploration_id}.json"


def serving_key(exploration_id: str) -> str:
    return f"{PREFIX}/serving/{exploration_id}.json"


def pending_model_key(exploration_id: str) -> str:
    return f"{PREFIX}/pending-models/{exploration_id}.json"


@dataclass(frozen=True)
class ExplorationTarget:
    exploration_id: str
    # s3://bucket/prefix; the bank is built from the objects under <prefix>/train/.
    target_uri: str
    # Image size the exploration was created with; a ModelPublished's own size wins over it.
    image_size: int

    def to_json(self) -> dict[str, Any]:
        return {"exploration_id": self.exploration_id, "target_uri": self.target_uri, "image_size": self.image_size}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "ExplorationTarget":
        return cls(str(value["exploration_id"]), str(value["target_uri"]), int(value.get("image_size", 0)))


@dataclass(frozen=True)
class ServingRecord:
    model_name: str
    version: int
    image_size: int
    target_bank_size: int
    # Unix seconds of the first switch to this version; kept on republication so that a
    # redelivered ModelPublished announces the same ModelServing.
    serving_since: float

    def to_json(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "version": self.version,
            "image_size": self.image_size,
            "target_bank_size": self.target_bank_size,
            "serving_since": self.serving_since,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "ServingRecord":
        return cls(
            model_name=str(value["model_name"]),
            version=int(value["version"]),
            image_size=int(value["image_size"]),
            target_bank_size=int(value.get("target_bank_size", 0)),
            serving_since=float(value.get("serving_since", 0.0)),
        )


def pending_model_to_json(event: events_pb2.ModelPublished) -> dict[str, Any]:
    return {"version": int(event.model.version), "event": base64.b64encode(event.SerializeToString()).decode("ascii")}


def pending_model_from_json(value: dict[str, Any]) -> events_pb2.ModelPublished:
    return events_pb2.ModelPublished.FromString(base64.b64decode(value["event"]))


PARKED_DECISIONS_PREFIX = f"{PREFIX}/parked-decisions/"


@dataclass(frozen=True)
class ParkedDecision:
    decision: events_pb2.ImageDecision
    # Where the record was consumed (for its dead letter, if it comes to that); -1 when unknown.
    topic: str = ""
    partition: int = -1
    offset: int = -1
    key: str = ""


def parked_decisions_key(exploration_id: str, parked_at_ms: int, token: str) -> str:
    return f"{PARKED_DECISIONS_PREFIX}{exploration_id}/{parked_at_ms:013d}-{token}.json"


def parse_parked_key(key: str) -> tuple[str, int] | None:
    """(exploration id, parked at ms) of a parked-decisions key, None for anything else."""
    if not key.startswith(PARKED_DECISIONS_PREFIX):
        return None
    exploration_id, _, name = key[len(PARKED_DECISIONS_PREFIX) :].partition("/")
    stamp = name.split("-", 1)[0]
    if not valid_exploration_id(exploration_id) or not name.endswith(".json") or not stamp.isdigit():
        return None
    return exploration_id, int(stamp)


def _without_bytes(decision) -> bytes:
    """The event as parked: bytes carried for speed are left out (the scorer reads object_key later)."""
    if not decision.image_data:
        return decision.SerializeToString()
    copy = type(decision)()
    copy.CopyFrom(decision)
    copy.ClearField("image_data")
    return copy.SerializeToString()


def parked_to_json(items: Sequence[ParkedDecision], parked_at: float) -> dict[str, Any]:
    return {
        "parked_at": parked_at,
        "decisions": [
            {
                "event": base64.b64encode(_without_bytes(item.decision)).decode("ascii"),
                "topic": item.topic,
                "partition": item.partition,
                "offset": item.offset,
                "key": item.key,
            }
            for item in items
        ],
    }


def parked_from_json(value: dict[str, Any]) -> list[ParkedDecision]:
    return [
        ParkedDecision(
            decision=events_pb2.ImageDecision.FromString(base64.b64decode(entry["event"])),
            topic=str(entry.get("topic", "")),
            partition=int(entry.get("partition", -1)),
            offset=int(entry.get("offset", -1)),
            key=str(entry.get("key", "")),
        )
        for entry in value.get("decisions", [])
    ]
