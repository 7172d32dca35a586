"""Bookkeeping of explorations: what was asked, what arrived, when a query and an iteration are complete.

Everything is keyed by identities carried in the events (query id, raw sha256 + URL), never counted
blindly, so a redelivered event changes nothing. The record serialises to JSON for the object store.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from iex.v1 import common_pb2

ACCEPTED = {
    common_pb2.DECISION_KIND_UNIQUE,
    common_pb2.DECISION_KIND_EXACT_DUPLICATE,
    common_pb2.DECISION_KIND_NEAR_DUPLICATE,
}
TERMINAL = {
    common_pb2.EXPLORATION_STATE_SUCCEEDED,
    common_pb2.EXPLORATION_STATE_FAILED,
    common_pb2.EXPLORATION_STATE_CANCELLED,
}


def decision_id(raw_sha256: str, url: str) -> str:
    """One fetched image of a query: the same bytes from two URLs are two results."""
    return f"{raw_sha256[:32]}:{hashlib.sha1(url.encode()).hexdigest()[:12]}"


def candidate_digest(object_key: str) -> str:
    """A stored object, compactly, in the exploration's record of what its trainer has seen."""
    return hashlib.sha256(object_key.encode()).hexdigest()[:16]


@dataclass
class QueryState:
    query_id: str
    concept: str
    descriptor: str
    text: str
    descriptor_source: str = ""
    is_label: bool = False
    crawled: bool = False
    results_returned: int = 0
    images_expected: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    # decision id -> DecisionKind value
    decisions: dict[str, int] = field(default_factory=dict)
    # decision id -> object key of the image it is credited with (accepted decisions only)
    accepted_objects: dict[str, str] = field(default_factory=dict)
    # decision id -> reward
    rewards: dict[str, float] = field(default_factory=dict)
    concept_reward: float | None = None
    # Set when the iteration leaves COLLECTING: the counts and completeness, after which the per-image
    # maps above are dropped (the iteration's manifest in S3 keeps the images and their rewards). At
    # the paper's scale (25k images an iteration, 40 iterations) this keeps the record a few MB.
    frozen_counts: dict[str, int] | None = None
    frozen_complete: bool | None = None

    @property
    def complete(self) -> bool:
        if self.frozen_complete is not None:
            return self.frozen_complete
        return (
            self.crawled
            and len(self.decisions) >= self.images_expected
            and all(d in self.rewards for d in self.accepted_objects)
        )

    def freeze(self) -> None:
        self.frozen_counts = self.counts()
        self.frozen_complete = self.complete
        self.decisions.clear()
        self.accepted_objects.clear()
        self.rewards.clear()
        self.refused.clear()

    def counts(self) -> dict[str, int]:
        if self.frozen_counts is not None:
            return dict(self.frozen_counts)
        kinds = list(self.decisions.values())
        return {
            "queries_issued": 1,
            "queries_crawled": int(self.crawled),
            "search_results": self.results_returned,
            "images_fetched": self.images_expected if self.crawled else len(self.decisions),
            "images_refused": sum(self.refused.values()),
            "images_unique": kinds.count(common_pb2.DECISION_KIND_UNIQUE),
            "images_duplicate": kinds.count(common_pb2.DECISION_KIND_EXACT_DUPLICATE) + kinds.count(common_pb2.DECISION_KIND_NEAR_DUPLICATE),
            "images_contaminating": kinds.count(common_pb2.DECISION_KIND_CONTAMINATES_TARGET),
            "images_invalid": kinds.count(common_pb2.DECISION_KIND_INVALID),
            "images_scored": len(self.rewards),
        }


@dataclass
class IterationState:
    iteration: int
    phase: int = common_pb2.ITERATION_PHASE_COLLECTING
    started_at: float = field(default_factory=time.time)
    deadline: float = 0.0
    finished_at: float = 0.0
    queries: dict[str, QueryState] = field(default_factory=dict)
    scored_with: tuple[str, int] | None = None
    trained_model: tuple[str, int] | None = None
    knn_top1: float | None = None
    linear_probe_top1: float | None = None
    eval_images: int = 0
    # The whole evaluation of the model trained on this iteration (evaluation_dict's keys), None until it arrives.
    evaluation: dict[str, Any] | None = None
    # When collecting ended (the trainer was handed the iteration) and when its model was published.
    collected_at: float = 0.0
    trained_at: float = 0.0
    queries_incomplete: int = 0
    manifest_key: str = ""
    # Frozen once the iteration leaves COLLECTING, so late events cannot change the reported numbers.
    final_counts: dict[str, int] | None = None
    # The plan is persisted before its queries are published; a restart republishes an unpublished plan
    # (same ids, same texts) instead of planning again.
    published: bool = True
    # How the queries were chosen ("uniform", "prior", "exact", "fic", "pic"), on how many observed rewards, how fast.
    reward_model: str = ""
    observations_used: int = 0
    planning_seconds: float = 0.0
    # S3 key of the distribution the queries were sampled from (mu, sigma, probabilities over the pool).
    distribution_key: str = ""

    def counts(self) -> dict[str, int]:
        if self.final_counts is not None:
            return dict(self.final_counts)
        return sum_counts(q.counts() for q in self.queries.values())

    @property
    def complete(self) -> bool:
        return bool(self.queries) and all(q.complete for q in self.queries.values())

    def concept_rewards(self) -> list[float]:
        return [q.concept_reward for q in self.queries.values() if q.concept_reward is not None]


COUNT_FIELDS = (
    "queries_issued",
    "queries_crawled",
    "search_results",
    "images_fetched",
    "images_refused",
    "images_unique",
    "images_duplicate",
    "images_contaminating",
    "images_invalid",
    "images_scored",
)


def sum_counts(items) -> dict[str, int]:
    total = dict.fromkeys(COUNT_FIELDS, 0)
    for item in items:
        for key in COUNT_FIELDS:
            total[key] += item.get(key, 0)
    return total


@dataclass
class ExplorationRecord:
    exploration_id: str
    # ExplorationSpec serialised (protobuf bytes as hex) so the record stays plain JSON.
    spec_hex: str
    state: int = common_pb2.EXPLORATION_STATE_PENDING
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    error: str = ""
    serving_model: tuple[str, int] | None = None
    current_iteration: int = 0
    iterations: dict[int, IterationState] = field(default_factory=dict)
    # concept -> list of observed concept rewards (the reward model's observations)
    observations: dict[str, list[float]] = field(default_factory=dict)
    # concept -> times queried
    times_queried: dict[str, int] = field(default_factory=dict)
    # The iteration the loop wants to start next (0: none); the planning worker turns it into queries.
    pending_iteration: int = 0
    # Why the exploration stopped (a budget), and what a waiting exploration waits for.
    stop_reason: str = ""
    detail: str = ""
    vocabulary_digest: str = ""
    vocabulary_size: int = 0
    # Digests (sha256(object key)[:16]) of every object already handed to the trainer as a candidate:
    # an image another exploration stored first (a duplicate for dedup) is still new to this one,
    # one this exploration already trained on is not. 17 bytes an image in the persisted record.
    candidate_digests: list[str] = field(default_factory=list)
    # The initial encoder's evaluation (iteration 0): model name/version, knn_top1, linear_probe_top1,
    # eval_images, protocol, train_images, classes, measurable, not_measurable_reason,
    # detectable_difference, record_key.
    initial_evaluation: dict[str, Any] | None = None
    # Bumped on every change; watchers wait on it.
    revision: int = 0

    @property
    def iterations_finished(self) -> int:
        return sum(1 for it in self.iterations.values() if it.phase == common_pb2.ITERATION_PHASE_FINISHED)

    def current(self) -> IterationState | None:
        return self.iterations.get(self.current_iteration)

    def touch(self) -> None:
        self.updated_at = time.time()
        self.revision += 1

    # -- serialisation ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["iterations"] = {str(k): v for k, v in data["iterations"].items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ExplorationRecord":
        iterations = {}
        for key, raw in data.get("iterations", {}).items():
            queries = {qid: QueryState(**q) for qid, q in raw.pop("queries", {}).items()}
            for name in ("scored_with", "trained_model"):
                if raw.get(name) is not None:
                    raw[name] = tuple(raw[name])
            iterations[int(key)] = IterationState(queries=queries, **raw)
        data = dict(data)
        data["iterations"] = iterations
        if data.get("serving_model") is not None:
            data["serving_model"] = tuple(data["serving_model"])
        return cls(**data)
