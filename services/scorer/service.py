"""The scorer service: serves encoder versions through Triton and rewards every accepted image.

Consumes
- iex.planner.explorations.v1 (ExplorationCreated): remembers the target (persisted in S3).
- iex.trainer.models.v1 (ModelPublished): loads the version into Triton, embeds the target bank
  with it, switches, announces ModelServing; a version that cannot be served is announced with
  ModelLoadFailed while the previous one keeps serving.
- iex.dedup.decisions.v1 (ImageDecision): rewards of UNIQUE / EXACT_DUPLICATE / NEAR_DUPLICATE
  images -> ImageScored.

Idempotence: serving records and exploration records are overwritten with the same content on
redelivery; a redelivered ModelPublished of the serving version re-announces the same
ModelServing; a reward is a pure function of (image, model version, target bank), so a redelivered
decision republishes the same ImageScored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from iex.v1 import common_pb2, events_pb2, scorer_pb2_grpc
from services.common import topics
from services.common.errors import DependencyUnavailable, PermanentError
from services.common.kafka import EventContext, Handler, now_timestamp
from services.common.objectstore import parse_s3_uri
from services.common.service import Check, Service
from services.common.settings import ServiceSettings, setting
from services.scorer import records
from services.scorer.engine import EngineConfig, ItemFailed, ScoringEngine, ServeOutcome, ServeStatus
from services.scorer.metrics import SOURCE_EVENT, ScorerMetrics
from services.scorer.preprocess import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from services.scorer.records import ExplorationTarget
from services.scorer.servicer import SERVICE_NAME, ScorerServicer

log = logging.getLogger(__name__)

SCORED_KINDS = frozenset(
    {
        common_pb2.DECISION_KIND_UNIQUE,
        common_pb2.DECISION_KIND_EXACT_DUPLICATE,
        common_pb2.DECISION_KIND_NEAR_DUPLICATE,
    }
)
_MAX_REASON_CHARS = 1000


@dataclass(frozen=True)
class ScorerSettings(ServiceSettings):
    reward_k: int = setting(15, help="target neighbours averaged into an image reward (paper: k=15)", minimum=1, maximum=1024)
    batch_size: int = setting(32, help="images per Triton request", minimum=1, maximum=1024)
    max_inflight_batches: int = setting(4, help="Triton requests this replica keeps in flight at once", minimum=1, maximum=256)
    target_bank_max_images: int = setting(
        5000, help="target train images embedded into a bank (a deterministic hash-ordered subset beyond it)", minimum=1
    )
    embedding_cache_entries: int = setting(
        8192, help="image embeddings kept in memory per replica, so duplicates skip Triton (0 disables)", minimum=0
    )
    max_serving_explorations: int = setting(
        64, help="explorations whose target bank stays in memory; older ones are rebuilt from S3 on demand", minimum=1
    )
    default_image_size: int = setting(
        224, help="encoder input size when neither ModelPublished nor ExplorationCreated gives one", minimum=8, maximum=4096
    )
    max_image_pixels: int = setting(DEFAULT_MAX_PIXELS, help="largest image (width x height) decoded; larger ones are refused", minimum=1)
    triton_timeout_s: float = setting(60.0, help="timeout of one Triton inference or metadata request", minimum=0.1)
    triton_load_timeout_s: float = setting(300.0, help="timeout of one Triton model load", minimum=1.0)
    model_ready_timeout_s: float = setting(60.0, help="seconds a loaded version may take to report ready", minimum=0.0)


class ScorerService(Service):
    name = "scorer"
    settings_class = ScorerSettings
    # A model switch (load + embedding the whole target bank) runs inside one handler call.
    max_poll_interval_ms = 900_000

    def __init__(self, settings: ScorerSettings, *, encoder=None, store=None) -> None:
        super().__init__(settings)
        if store is not None:
            self.store = store
        if encoder is None:
            from services.common.modelrepo import TritonEncoder

            encoder = TritonEncoder(
                settings.triton_grpc_url,
                timeout_s=settings.triton_timeout_s,
                load_timeout_s=settings.triton_load_timeout_s,
                max_in_flight=settings.max_inflight_batches,
            )
        self.encoder = encoder
        self.scorer_metrics = ScorerMetrics(self.metrics)
        self.engine = ScoringEngine(
            encoder,
            self.store,
            EngineConfig(
                bucket=settings.s3_bucket,
                reward_k=settings.reward_k,
                batch_size=settings.batch_size,
                max_inflight_batches=settings.max_inflight_batches,
                target_bank_max_images=settings.target_bank_max_images,
                embedding_cache_entries=settings.embedding_cache_entries,
                default_image_size=settings.default_image_size,
                max_image_pixels=settings.max_image_pixels,
                model_ready_timeout_s=settings.model_ready_timeout_s,
                max_serving_explorations=settings.max_serving_explorations,
            ),
            self.scorer_metrics,
        )

    # ---- hooks -------------------------------------------------------------------------------
    def register(self, server: grpc.Server) -> list[str]:
        scorer_pb2_grpc.add_ScorerServiceServicer_to_server(ScorerServicer(self.engine), server)
        return [SERVICE_NAME]

    def handlers(self) -> Mapping[str, Handler]:
        return {
            topics.EXPLORATIONS.name: self.handle_exploration_created,
            topics.MODELS.name: self.handle_model_published,
            topics.DECISIONS.name: self.handle_decision,
        }

    def dependencies(self) -> dict[str, Check]:
        checks = super().dependencies()
        checks["triton"] = self.encoder.server_ready
        return checks

    def on_stop(self) -> None:
        close = getattr(self.encoder, "close", None)
        if close is not None:
            close()

    # ---- handlers ----------------------------------------------------------------------------
    def handle_exploration_created(self, event: events_pb2.ExplorationCreated, ctx: EventContext | None = None) -> None:
        exploration_id = _checked_exploration_id(event.exploration_id)
        try:
            parse_s3_uri(event.target_uri)
        except ValueError as exc:
            raise PermanentError("invalid_target_uri", str(exc)) from exc
        if event.image_size < 0:
            raise PermanentError("invalid_image_size", str(event.image_size))
        self.engine.remember_exploration(ExplorationTarget(exploration_id, event.target_uri, int(event.image_size)))
        # A model published before this event was consumed waits here (see handle_model_published).
        pending_key = records.pending_model_key(exploration_id)
        pending = self.store.get_json(self.settings.s3_bucket, pending_key)
        if pending is not None:
            self._serve_and_announce(records.pending_model_from_json(pending))
            self.store.delete(self.settings.s3_bucket, pending_key)

    def handle_model_published(self, event: events_pb2.ModelPublished, ctx: EventContext | None = None) -> None:
        exploration_id = _checked_exploration_id(event.exploration_id)
        if not event.model.name or event.model.version < 1:
            raise PermanentError("invalid_model_ref", f"{event.model.name!r} version {event.model.version}")
        if event.image_size < 0:
            raise PermanentError("invalid_image_size", str(event.image_size))
        if self.engine.exploration(exploration_id) is None:
            # Topics are not ordered with each other: the trainer may publish v1 before this
            # consumer has read ExplorationCreated. Waiting here would block that very event on
            # the same consumer, so the model is parked durably and served when it arrives.
            self._park(event)
            return
        self._serve_and_announce(event)

    def handle_decision(self, event: events_pb2.ImageDecision, ctx: EventContext | None = None) -> None:
        if event.kind not in SCORED_KINDS:
            self.scorer_metrics.decisions_ignored.labels(kind=_kind_name(event.kind)).inc()
            return
        self.score_decisions([event])

    # ---- work --------------------------------------------------------------------------------
    def score_decisions(self, decisions: Sequence[events_pb2.ImageDecision]) -> None:
        """Rewards accepted decisions and publishes one ImageScored each.

        Takes a sequence so that events can later be batched into fewer Triton requests; today
        each handler call passes one, so a failing item can be dead-lettered on its own.
        """
        by_exploration: dict[str, list[events_pb2.ImageDecision]] = {}
        for decision in decisions:
            by_exploration.setdefault(_checked_exploration_id(decision.exploration_id), []).append(decision)
        failures: list[ItemFailed] = []
        for exploration_id, group in by_exploration.items():
            for decision in group:
                if not decision.object_key:
                    raise PermanentError("missing_object_key", f"decision {decision.raw_sha256} of kind {_kind_name(decision.kind)}")
            serving = self.engine.serving(exploration_id)
            if serving is None:
                raise DependencyUnavailable(f"no model is serving for exploration {exploration_id} yet")
            keys = [decision.object_key for decision in group]

            def load(index: int, keys=keys, image_size=serving.image_size):
                data = self.store.get_or_none(self.settings.s3_bucket, keys[index])
                if data is None:
                    raise ItemFailed("object_missing", keys[index])
                try:
                    return decode_image(data, image_size, max_pixels=self.settings.max_image_pixels)
                except ImageDecodeError as exc:
                    raise ItemFailed("undecodable_image", f"{keys[index]}: {exc}") from exc

            embeddings, failed = self.engine.embed_items(serving, keys, load)
            scored = [index for index in range(len(group)) if index not in failed]
            rewards = self.engine.rewards(serving, embeddings[scored]) if scored else []
            for index, reward in zip(scored, rewards):
                self._publish_scored(group[index], float(reward), serving.ref())
            self.scorer_metrics.images_scored.labels(source=SOURCE_EVENT).inc(len(scored))
            failures.extend(failed.values())
        if failures:
            first = failures[0]
            raise PermanentError(first.kind, str(first))

    def _publish_scored(self, decision: events_pb2.ImageDecision, reward: float, model: common_pb2.ModelRef) -> None:
        event = events_pb2.ImageScored(
            exploration_id=decision.exploration_id,
            iteration=decision.iteration,
            query_id=decision.query_id,
            concept=decision.concept,
            pixel_sha256=decision.pixel_sha256,
            object_key=decision.object_key,
            reward=reward,
            model=model,
            scored_at=now_timestamp(),
            raw_sha256=decision.raw_sha256,
            url=decision.url,
            decision=decision.kind,
        )
        self._publisher().publish(topics.IMAGES_SCORED, event, key=decision.exploration_id)

    def _park(self, event: events_pb2.ModelPublished) -> None:
        key = records.pending_model_key(event.exploration_id)
        existing = self.store.get_json(self.settings.s3_bucket, key)
        if existing is None or int(existing.get("version", 0)) <= event.model.version:
            self.store.put_json(self.settings.s3_bucket, key, records.pending_model_to_json(event))
        self.scorer_metrics.models_parked.inc()
        log.info(
            "model parked until its exploration is known",
            extra={"exploration_id": event.exploration_id, "model": event.model.name, "version": event.model.version},
        )

    def _serve_and_announce(self, event: events_pb2.ModelPublished) -> ServeOutcome:
        exploration_id = event.exploration_id
        outcome = self.engine.serve(exploration_id, event.model.name, int(event.model.version), int(event.image_size))
        if outcome.status in (ServeStatus.SERVING, ServeStatus.ALREADY_SERVING):
            assert outcome.serving is not None
            since = Timestamp()
            since.FromNanoseconds(int(outcome.serving.serving_since * 1e9))
            announcement = events_pb2.ModelServing(
                exploration_id=exploration_id,
                model=outcome.serving.ref(),
                target_bank_size=outcome.serving.bank_size,
                serving_since=since,
            )
            self._publisher().publish(topics.MODELS_SERVING, announcement, key=exploration_id)
        elif outcome.status is ServeStatus.FAILED:
            failure = events_pb2.ModelLoadFailed(
                exploration_id=exploration_id,
                model=common_pb2.ModelRef(name=event.model.name, version=event.model.version),
                reason=f"{outcome.failure_kind}: {outcome.reason}"[:_MAX_REASON_CHARS],
            )
            if outcome.still_serving is not None:
                failure.serving.CopyFrom(common_pb2.ModelRef(name=outcome.still_serving[0], version=outcome.still_serving[1]))
            self._publisher().publish(topics.MODEL_LOAD_FAILED, failure, key=exploration_id)
        else:
            log.info(
                "stale model version ignored",
                extra={"exploration_id": exploration_id, "model": event.model.name, "version": event.model.version, "reason": outcome.reason},
            )
        return outcome

    def _publisher(self):
        if self.publisher is None:
            raise DependencyUnavailable("publisher not started")
        return self.publisher


def _checked_exploration_id(exploration_id: str) -> str:
    if not records.valid_exploration_id(exploration_id):
        raise PermanentError("invalid_exploration_id", repr(exploration_id[:80]))
    return exploration_id


def _kind_name(kind: int) -> str:
    try:
        return common_pb2.DecisionKind.Name(kind)
    except ValueError:
        return "unknown"
