"""Running concept rewards: per query, the mean of the best image rewards scored so far.

The paper's concept reward is the mean of a query's top-10 image rewards. The planner computes
the authoritative value when it decides a query is complete (it alone knows how many images to
expect); the scorer publishes the running value as images are scored (ConceptRewardUpdated), for
dashboards, users and any consumer that wants it early.

Decisions are keyed by exploration id, so all of one exploration's images reach the replica that
owns its partition: that replica's aggregate is complete, with no coordination. It is kept in S3
(`scorer/concepts/<exploration>/<query>.json`) so a rebalanced or restarted replica carries on.

Idempotent: rewards are held per decision (raw sha256 + URL, as the planner counts them), so a
redelivered image changes nothing. Rewards of different encoders are not comparable: an image
scored with a newer model version starts the query's aggregate over with that version, and
rewards of an older version than the aggregate's are left out.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable

from services.common.rewards import concept_reward
from services.scorer import records

_SAFE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def decision_id(raw_sha256: str, url: str) -> str:
    """One fetched image of a query (the planner's identity: same bytes from two URLs are two)."""
    return f"{raw_sha256[:32]}:{hashlib.sha1(url.encode()).hexdigest()[:12]}"


def aggregate_key(exploration_id: str, query_id: str) -> str:
    name = query_id if _SAFE_ID_RE.match(query_id) and ".." not in query_id else "h-" + hashlib.sha256(query_id.encode()).hexdigest()[:40]
    return f"{records.PREFIX}/concepts/{exploration_id}/{name}.json"


@dataclass(frozen=True)
class ScoredImage:
    """What the aggregate needs of one ImageScored."""

    exploration_id: str
    iteration: int
    query_id: str
    concept: str
    decision_id: str
    reward: float
    model_name: str
    model_version: int


@dataclass
class QueryAggregate:
    exploration_id: str
    query_id: str
    iteration: int
    concept: str
    model_name: str
    model_version: int
    rewards: dict[str, float] = field(default_factory=dict)

    def reward(self, top: int) -> float:
        return concept_reward(self.rewards.values(), top)

    @property
    def best(self) -> float:
        return max(self.rewards.values()) if self.rewards else 0.0

    def add(self, image: ScoredImage) -> bool:
        """Adds one image reward; True when the aggregate changed."""
        if image.model_version < self.model_version:
            return False
        if image.model_version > self.model_version or image.model_name != self.model_name:
            self.model_name, self.model_version = image.model_name, image.model_version
            self.rewards = {}
        if self.rewards.get(image.decision_id) == image.reward:
            return False
        self.rewards[image.decision_id] = image.reward
        return True

    def to_json(self) -> dict[str, Any]:
        return {
            "exploration_id": self.exploration_id,
            "query_id": self.query_id,
            "iteration": self.iteration,
            "concept": self.concept,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "rewards": self.rewards,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "QueryAggregate":
        return cls(
            exploration_id=str(value["exploration_id"]),
            query_id=str(value["query_id"]),
            iteration=int(value.get("iteration", 0)),
            concept=str(value.get("concept", "")),
            model_name=str(value.get("model_name", "")),
            model_version=int(value.get("model_version", 0)),
            rewards={str(k): float(v) for k, v in dict(value.get("rewards", {})).items()},
        )


class ConceptAggregator:
    """Per-query aggregates, cached in memory (LRU) and persisted in S3 before they are announced."""

    def __init__(self, store, bucket: str, top: int, max_cached_queries: int = 4096) -> None:
        if top < 1:
            raise ValueError(f"top must be >= 1, got {top}")
        self.store = store
        self.bucket = bucket
        self.top = top
        self.max_cached_queries = max(1, max_cached_queries)
        self._cache: OrderedDict[tuple[str, str], QueryAggregate] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, images: Iterable[ScoredImage]) -> list[QueryAggregate]:
        """Folds scored images into their queries' aggregates and returns every query touched
        (first-seen order), changed or not: a redelivered batch must re-announce what a crash
        may have left unannounced. Changed aggregates are persisted first. Raises
        DependencyUnavailable when S3 is away; memory is then left as it was, so a retry redoes
        the same work."""
        grouped: dict[tuple[str, str], list[ScoredImage]] = {}
        for image in images:
            if image.query_id:
                grouped.setdefault((image.exploration_id, image.query_id), []).append(image)
        touched: list[QueryAggregate] = []
        for (exploration_id, query_id), group in grouped.items():
            current = self._get(exploration_id, query_id)
            updated = QueryAggregate(**{**current.__dict__, "rewards": dict(current.rewards)}) if current else None
            for image in group:
                if updated is None:
                    updated = QueryAggregate(exploration_id, query_id, image.iteration, image.concept, image.model_name, image.model_version)
                updated.add(image)
            assert updated is not None
            unchanged = current is not None and (updated.model_name, updated.model_version, updated.rewards) == (
                current.model_name,
                current.model_version,
                current.rewards,
            )
            if not unchanged:
                # Durable before announced: a restarted replica must never know less than it published.
                self.store.put_json(self.bucket, aggregate_key(exploration_id, query_id), updated.to_json())
                self._put(updated)
            touched.append(updated)
        return touched

    def get(self, exploration_id: str, query_id: str) -> QueryAggregate | None:
        return self._get(exploration_id, query_id)

    def _get(self, exploration_id: str, query_id: str) -> QueryAggregate | None:
        key = (exploration_id, query_id)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        value = self.store.get_json(self.bucket, aggregate_key(exploration_id, query_id))
        if value is None:
            return None
        aggregate = QueryAggregate.from_json(value)
        self._put(aggregate)
        return aggregate

    def _put(self, aggregate: QueryAggregate) -> None:
        with self._lock:
            key = (aggregate.exploration_id, aggregate.query_id)
            self._cache[key] = aggregate
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_cached_queries:
                self._cache.popitem(last=False)


__all__ = ["ConceptAggregator", "QueryAggregate", "ScoredImage", "aggregate_key", "decision_id"]
