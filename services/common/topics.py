"""Kafka topics: one per event, named iex.<domain>.<event>.v1, each with its protobuf message and a dead-letter topic."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import Message

from iex.v1 import events_pb2


@dataclass(frozen=True)
class Topic:
    name: str
    message: type[Message]
    # What the key identifies; documentation for producers.
    key: str

    @property
    def dead_letter(self) -> str:
        return f"{self.name}.dlq"


EXPLORATIONS = Topic("iex.planner.explorations.v1", events_pb2.ExplorationCreated, "exploration_id")
QUERIES = Topic("iex.planner.queries.v1", events_pb2.QueryIssued, "query_id")
ITERATIONS = Topic("iex.planner.iterations.v1", events_pb2.IterationFinished, "exploration_id")
IMAGES_FETCHED = Topic("iex.crawler.images-fetched.v1", events_pb2.ImageFetched, "raw_sha256")
QUERIES_CRAWLED = Topic("iex.crawler.queries-crawled.v1", events_pb2.QueryCrawled, "exploration_id")
DECISIONS = Topic("iex.dedup.decisions.v1", events_pb2.ImageDecision, "exploration_id")
IMAGES_STORED = Topic("iex.dedup.images-stored.v1", events_pb2.ImageStored, "pixel_sha256")
IMAGES_SCORED = Topic("iex.scorer.images-scored.v1", events_pb2.ImageScored, "exploration_id")
MODELS_SERVING = Topic("iex.scorer.models-serving.v1", events_pb2.ModelServing, "exploration_id")
MODEL_LOAD_FAILED = Topic("iex.scorer.model-load-failed.v1", events_pb2.ModelLoadFailed, "exploration_id")
CONCEPT_REWARDS = Topic("iex.scorer.concept-rewards.v1", events_pb2.ConceptRewardUpdated, "exploration_id")
MODELS = Topic("iex.trainer.models.v1", events_pb2.ModelPublished, "exploration_id")
EVALUATIONS = Topic("iex.trainer.evaluations.v1", events_pb2.EvaluationFinished, "exploration_id")

ALL: tuple[Topic, ...] = (
    EXPLORATIONS,
    QUERIES,
    ITERATIONS,
    IMAGES_FETCHED,
    QUERIES_CRAWLED,
    DECISIONS,
    IMAGES_STORED,
    IMAGES_SCORED,
    MODELS_SERVING,
    MODEL_LOAD_FAILED,
    CONCEPT_REWARDS,
    MODELS,
    EVALUATIONS,
)

BY_NAME: dict[str, Topic] = {topic.name: topic for topic in ALL}


def all_topic_names(with_dead_letters: bool = True) -> list[str]:
    names = [topic.name for topic in ALL]
    if with_dead_letters:
        names += [topic.dead_letter for topic in ALL]
    return names
