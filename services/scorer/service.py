"""The scorer service: serves encoder versions through Triton and rewards every accepted image.

Consumes
- iex.planner.explorations.v1 (ExplorationCreated): remembers the target (persisted in S3).
- iex.trainer.models.v1 (ModelPublished): loads the version into Triton, embeds the target bank
  with it, switches, announces ModelServing; a version that cannot be served is announced with
  ModelLoadFailed while the previous one keeps serving.
- iex.dedup.decisions.v1 (ImageDecision): rewards of UNIQUE / EXACT_DUPLICATE / NEAR_DUPLICATE
  images -> ImageScored, their embeddings -> S3 shards per model version, and the running reward
  of each query touched -> ConceptRewardUpdated.

Batching across events: a decision is only validated and buffered by its handler; the buffered
decisions of a polled batch are scored together just before the batch's offsets are committed
(`before_commit`), as one set of pipelined Triton requests. A ModelPublished first scores what is
buffered before it (with the version serving until then), so no decision handled before a switch is
scored with the version after it. An item that cannot be scored (object missing, undecodable) is
written to the dead-letter topic by the scorer itself, as the consumer loop would have; the rest of
the batch is scored. An unexpected failure of a whole batch falls back to scoring its decisions one
by one, so one bad image never holds back or dead-letters the others.

Idempotence: serving records and exploration records are overwritten with the same content on
redelivery; a redelivered ModelPublished of the serving version re-announces the same
ModelServing; a reward is a pure function of (image, model version, target bank), so a redelivered
decision republishes the same ImageScored, rewrites the same embedding shard and re-announces the
same concept reward.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
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
from services.scorer.concepts import ConceptAggregator, QueryAggregate, ScoredImage, decision_id
from services.scorer.engine import EngineConfig, ItemFailed, ScoringEngine, ServeOutcome, ServeStatus, ServingModel
from services.scorer.metrics import SOURCE_EVENT, ScorerMetrics
from services.scorer.preprocess import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from services.scorer.records import ExplorationTarget
from services.scorer.rewards import l2_normalise
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
_PERSISTED_MEMORY = 65536
_HEX = frozenset("0123456789abcdef")


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
    scorer_decision_batch_max: int = setting(
        128, help="decisions polled, and scored together in one set of Triton requests, at most per batch", minimum=1, maximum=4096
    )
    scorer_io_threads: int = setting(8, help="threads reading and decoding images (S3 reads and Pillow release the GIL)", minimum=1, maximum=128)
    scorer_persist_embeddings: bool = setting(True, help="write the embedding of every image scored from events to S3 shards per model version")
    scorer_persist_banks: bool = setting(True, help="keep target banks in S3 per model version, so a restart reads them back instead of re-embedding")
    scorer_discard_failed_versions: bool = setting(
        True, help="remove a version Triton refused to load from IEX_MODEL_REPOSITORY (else every later load of the model retries it)"
    )
    scorer_concept_top: int = setting(10, help="image rewards averaged into a running concept reward (paper: top 10)", minimum=1, maximum=1000)
    scorer_publish_concept_rewards: bool = setting(True, help="publish ConceptRewardUpdated (running per-query rewards) as images are scored")
    scorer_park_timeout_s: float = setting(
        86400.0,
        help="a decision parked because no model serves its exploration is dead-lettered as no_model_serving after this many seconds",
        minimum=1.0,
    )
    scorer_park_sweep_s: float = setting(
        30.0, help="seconds between looks at the parked decisions (scored once a model serves, dead-lettered once too old)", minimum=0.0
    )


class ScorerService(Service):
    name = "scorer"
    settings_class = ScorerSettings
    # A model switch (load + embedding the whole target bank) runs inside one handler call.
    max_poll_interval_ms = 900_000

    def __init__(self, settings: ScorerSettings, *, encoder=None, store=None) -> None:
        super().__init__(settings)
        # The consumer loop reads this when it starts: it bounds the decisions scored together.
        self.max_poll_records = settings.scorer_decision_batch_max
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
                io_threads=settings.scorer_io_threads,
                persist_banks=settings.scorer_persist_banks,
                model_repository=settings.model_repository,
                discard_failed_versions=settings.scorer_discard_failed_versions,
            ),
            self.scorer_metrics,
        )
        self.concepts = ConceptAggregator(self.store, settings.s3_bucket, settings.scorer_concept_top)
        # Decisions handled since the last flush, in handling order (consumer thread only).
        self._pending: list[tuple[events_pb2.ImageDecision, EventContext | None]] = []
        self._pending_ids: set[tuple[str, int, int]] = set()
        # (model, version, image sha) already written to a shard by this replica: a duplicate
        # image costs a set lookup, not another S3 object.
        self._persisted: OrderedDict[tuple[str, int, str], None] = OrderedDict()
        self._persisted_lock = threading.Lock()
        # Monotonic time of the last sweep of the parked decisions (0: sweep at the first commit).
        self._last_sweep = 0.0

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

    def before_commit(self) -> None:
        # Raises DependencyUnavailable only; the consumer loop then retries before committing.
        self.flush_decisions()
        if time.monotonic() - self._last_sweep >= self.settings.scorer_park_sweep_s:
            self.sweep_parked()

    def on_stop(self) -> None:
        self.engine.close()
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
            self.flush_decisions(defer_unserved=True)
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
        # Decisions handled before this event are scored with the version serving until now.
        # Those of an exploration nothing serves yet stay buffered (this very event may be the
        # one that makes them scorable); they are scored before the batch is committed.
        self.flush_decisions(defer_unserved=True)
        self._serve_and_announce(event)

    def handle_decision(self, event: events_pb2.ImageDecision, ctx: EventContext | None = None) -> None:
        """Validates and buffers; the batch is scored by `flush_decisions` before the commit."""
        if event.kind not in SCORED_KINDS:
            self.scorer_metrics.decisions_ignored.labels(kind=_kind_name(event.kind)).inc()
            return
        _checked_exploration_id(event.exploration_id)
        if not event.object_key:
            raise PermanentError("missing_object_key", f"decision {event.raw_sha256} of kind {_kind_name(event.kind)}")
        if ctx is not None:
            identity = (ctx.topic, ctx.partition, ctx.offset)
            if identity in self._pending_ids:
                return  # the same record handed over twice before a flush
            self._pending_ids.add(identity)
        self._pending.append((event, ctx))

    # ---- work --------------------------------------------------------------------------------
    @property
    def pending_decisions(self) -> int:
        return len(self._pending)

    def flush_decisions(self, *, defer_unserved: bool = False) -> None:
        """Scores every buffered decision, grouped by exploration, one set of Triton requests per
        group. The decisions of an exploration no model serves yet are kept in the buffer when
        `defer_unserved` (a model switch in the same batch may serve them), else parked durably in
        S3 (`sweep_parked` and the next switch take them back). Raises DependencyUnavailable (and
        keeps the buffer) when S3, Triton or Kafka is away."""
        if not self._pending:
            return
        groups: dict[str, list[tuple[events_pb2.ImageDecision, EventContext | None]]] = {}
        for item in self._pending:
            groups.setdefault(item[0].exploration_id, []).append(item)
        deferred: list[tuple[events_pb2.ImageDecision, EventContext | None]] = []
        for exploration_id, items in groups.items():
            try:
                serving = self.engine.serving(exploration_id)
            except DependencyUnavailable:
                raise
            except Exception as exc:  # noqa: BLE001 - as the consumer loop would: never kill the consumer
                log.exception("serving state could not be restored", extra={"exploration_id": exploration_id})
                for item in items:
                    self._dead_letter(item, _bounded_reason(exc))
                done = {id(item) for item in items}
                self._pending = [item for item in self._pending if id(item) not in done]
                continue
            if serving is None:
                if defer_unserved:
                    deferred.extend(items)
                    continue
                # Not an outage to wait for in the consumer loop (the ModelPublished that would end
                # the wait may be behind this very batch, and a decision of an exploration no model
                # will ever serve would stop scoring for good): parked in S3, scored when a model
                # serves the exploration, dead-lettered as no_model_serving after the park timeout.
                self._park_decisions(exploration_id, items)
            else:
                self._score_isolated(serving, items)
            # Scored and published, or parked: a later failure of another group must not redo this one.
            done = {id(item) for item in items}
            self._pending = [item for item in self._pending if id(item) not in done]
        self._pending = deferred
        self._pending_ids = {(c.topic, c.partition, c.offset) for _, c in deferred if c is not None}

    def score_decisions(self, decisions: Sequence[events_pb2.ImageDecision]) -> None:
        """Buffers and scores `decisions` now (tools and tests; the service goes through the loop)."""
        for decision in decisions:
            self.handle_decision(decision)
        self.flush_decisions()

    def _score_isolated(self, serving: ServingModel, items: list[tuple[events_pb2.ImageDecision, EventContext | None]]) -> None:
        """Scores a group; if that fails unexpectedly, each decision gets a second attempt on its
        own, and only the ones failing again are dead-lettered."""
        try:
            self._score_group(serving, items)
            return
        except DependencyUnavailable:
            raise
        except Exception:  # noqa: BLE001 - one bad image must not sink (or dead-letter) the batch
            log.exception("decisions could not be scored together, scoring them one by one", extra={"decisions": len(items)})
        for item in items:
            try:
                self._score_group(serving, [item])
            except DependencyUnavailable:
                raise
            except Exception as exc:  # noqa: BLE001 - dead-lettered with a bounded reason
                log.warning("decision could not be scored", extra={"object_key": item[0].object_key, "error": str(exc)[:300]})
                self._dead_letter(item, _bounded_reason(exc))

    def _score_group(self, serving: ServingModel, items: list[tuple[events_pb2.ImageDecision, EventContext | None]]) -> None:
        decisions = [decision for decision, _ in items]
        keys = [decision.object_key for decision in decisions]

        def load(index: int):
            # A new object's bytes may travel in its decision (dedup's IEX_DEDUP_INLINE_MAX_BYTES).
            data = decisions[index].image_data or self.store.get_or_none(self.settings.s3_bucket, keys[index])
            if data is None:
                raise ItemFailed("object_missing", keys[index])
            try:
                return decode_image(data, serving.image_size, max_pixels=self.settings.max_image_pixels)
            except ImageDecodeError as exc:
                raise ItemFailed("undecodable_image", f"{keys[index]}: {exc}") from exc

        embeddings, failed = self.engine.embed_items(serving, keys, load)
        scored = [index for index in range(len(decisions)) if index not in failed]
        rewards = self.engine.rewards(serving, embeddings[scored]) if scored else []
        if scored and self.settings.scorer_persist_embeddings:
            # Stored before anything is announced: a consumer that saw ImageScored finds the vector.
            self._persist_embeddings(serving, [decisions[i] for i in scored], embeddings[scored])
        model = serving.ref()
        for index, reward in zip(scored, rewards):
            self._publish_scored(decisions[index], float(reward), model)
        self.scorer_metrics.images_scored.labels(source=SOURCE_EVENT).inc(len(scored))
        self.scorer_metrics.decision_batch.observe(len(decisions))
        if scored and self.settings.scorer_publish_concept_rewards:
            touched = self.concepts.add(
                ScoredImage(
                    exploration_id=decisions[i].exploration_id,
                    iteration=decisions[i].iteration,
                    query_id=decisions[i].query_id,
                    concept=decisions[i].concept,
                    decision_id=decision_id(decisions[i].raw_sha256, decisions[i].url),
                    reward=float(reward),
                    model_name=serving.model_name,
                    model_version=serving.version,
                )
                for i, reward in zip(scored, rewards)
            )
            for aggregate in touched:
                self._publish_concept_reward(aggregate)
        for index, failure in failed.items():
            self._dead_letter(items[index], failure.kind)

    def _persist_embeddings(self, serving: ServingModel, decisions: Sequence[events_pb2.ImageDecision], vectors) -> None:
        keys: list[str] = []
        rows: list[int] = []
        with self._persisted_lock:
            for row, decision in enumerate(decisions):
                sha = stored_image_sha(decision)
                if (serving.model_name, serving.version, sha) not in self._persisted:
                    keys.append(sha)
                    rows.append(row)
        if not keys:
            return
        self.engine.embeddings.put_images(serving.model_name, serving.version, keys, l2_normalise(vectors[rows]))
        self.scorer_metrics.embeddings_stored.inc(len(set(keys)))
        with self._persisted_lock:
            for sha in keys:
                self._persisted[(serving.model_name, serving.version, sha)] = None
            while len(self._persisted) > _PERSISTED_MEMORY:
                self._persisted.popitem(last=False)

    def _publish_concept_reward(self, aggregate: QueryAggregate) -> None:
        top = self.settings.scorer_concept_top
        event = events_pb2.ConceptRewardUpdated(
            exploration_id=aggregate.exploration_id,
            iteration=aggregate.iteration,
            query_id=aggregate.query_id,
            concept=aggregate.concept,
            reward=aggregate.reward(top),
            images_scored=len(aggregate.rewards),
            top=top,
            best_image_reward=aggregate.best,
            model=common_pb2.ModelRef(name=aggregate.model_name, version=aggregate.model_version),
            updated_at=now_timestamp(),
        )
        self._publisher().publish(topics.CONCEPT_REWARDS, event, key=aggregate.exploration_id)
        self.scorer_metrics.concept_rewards_published.inc()

    def _dead_letter(self, item: tuple[events_pb2.ImageDecision, EventContext | None], reason: str) -> None:
        """What the consumer loop does with a record it gives up on, for one item of a batch."""
        decision, ctx = item
        reason = reason[:64]
        letter = events_pb2.DeadLetter(
            topic=topics.DECISIONS.name,
            partition=ctx.partition if ctx is not None else -1,
            offset=ctx.offset if ctx is not None else -1,
            key=(ctx.key if ctx is not None else decision.exploration_id).encode(),
            value=decision.SerializeToString(),
            reason=reason,
            attempts=1,
            consumer_group=f"iex-{self.name}",
            failed_at=now_timestamp(),
        )
        self._publisher().publish(topics.DECISIONS.dead_letter, letter, key=decision.exploration_id)
        self.scorer_metrics.decisions_dead_lettered.labels(reason=reason).inc()
        if self.consumer is not None:
            self.consumer.dead_lettered.labels(topic=topics.DECISIONS.name, reason=reason).inc()
        log.warning("decision dead-lettered", extra={"object_key": decision.object_key, "reason": reason})

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

    # ---- decisions waiting for a model -----------------------------------------------------------
    def _park_decisions(self, exploration_id: str, items: list[tuple[events_pb2.ImageDecision, EventContext | None]]) -> None:
        """Writes the decisions to `scorer/parked-decisions/<id>/`: once the object is written, the
        records may be committed (DependencyUnavailable when S3 is away: they stay buffered)."""
        parked_at = time.time()
        entries = [
            records.ParkedDecision(
                decision=decision,
                topic=ctx.topic if ctx is not None else topics.DECISIONS.name,
                partition=ctx.partition if ctx is not None else -1,
                offset=ctx.offset if ctx is not None else -1,
                key=ctx.key if ctx is not None else decision.exploration_id,
            )
            for decision, ctx in items
        ]
        key = records.parked_decisions_key(exploration_id, int(parked_at * 1000), secrets.token_hex(6))
        self.store.put_json(self.settings.s3_bucket, key, records.parked_to_json(entries, parked_at))
        self.scorer_metrics.decisions_parked.inc(len(entries))
        log.info("decisions parked until a model serves their exploration", extra={"exploration_id": exploration_id, "decisions": len(entries), "key": key})

    def _parked_keys(self) -> dict[str, list[tuple[int, str]]]:
        """Parked objects by exploration: [(parked at ms, key)], oldest first."""
        found: dict[str, list[tuple[int, str]]] = {}
        for key in self.store.list_keys(self.settings.s3_bucket, records.PARKED_DECISIONS_PREFIX):
            parsed = records.parse_parked_key(key)
            if parsed is not None:
                found.setdefault(parsed[0], []).append((parsed[1], key))
        for keys in found.values():
            keys.sort()
        return found

    def _read_parked(self, key: str) -> list[tuple[events_pb2.ImageDecision, EventContext | None]] | None:
        value = self.store.get_json(self.settings.s3_bucket, key)
        if value is None:
            return None  # taken back by another replica meanwhile
        try:
            parked = records.parked_from_json(value)
        except Exception:  # noqa: BLE001 - an object this code did not write: nothing to score in it
            log.exception("unreadable parked decisions removed", extra={"key": key})
            return []
        return [
            (item.decision, EventContext(topic=item.topic, partition=item.partition, offset=item.offset, key=item.key, headers={}, timestamp_ms=0))
            for item in parked
        ]

    def _score_parked(self, exploration_id: str, serving: ServingModel, keys: list[tuple[int, str]] | None = None) -> int:
        """Scores the decisions parked for `exploration_id` with `serving`, then removes them.
        A crash in between scores them again: harmless, a reward is a pure function of its inputs."""
        if keys is None:
            prefix = f"{records.PARKED_DECISIONS_PREFIX}{exploration_id}/"
            keys = sorted(
                (parsed[1], key)
                for key in self.store.list_keys(self.settings.s3_bucket, prefix)
                if (parsed := records.parse_parked_key(key)) is not None and parsed[0] == exploration_id
            )
        scored = 0
        for _, key in keys:
            items = self._read_parked(key)
            if items is None:
                continue
            if items:
                self._score_isolated(serving, items)
                scored += len(items)
            self.store.delete(self.settings.s3_bucket, key)
        if scored:
            self.scorer_metrics.parked_decisions_scored.inc(scored)
            log.info("parked decisions scored", extra={"exploration_id": exploration_id, "decisions": scored, "model_version": serving.version})
        return scored

    def sweep_parked(self, now: float | None = None) -> None:
        """Scores the parked decisions of explorations a model now serves (a switch on another
        replica, or a crash between a switch and its own sweep), and dead-letters as
        `no_model_serving` those parked longer than `scorer_park_timeout_s`. An outage only
        postpones the sweep: the batch being committed does not depend on it."""
        self._last_sweep = time.monotonic()
        now = time.time() if now is None else now
        try:
            parked = self._parked_keys()
            waiting = 0
            for exploration_id, keys in parked.items():
                try:
                    serving = self.engine.serving(exploration_id)
                except DependencyUnavailable:
                    raise
                except Exception:  # noqa: BLE001 - as flush_decisions: never kill the consumer; the timeout still applies
                    log.exception("serving state could not be restored", extra={"exploration_id": exploration_id})
                    serving = None
                if serving is not None:
                    self._score_parked(exploration_id, serving, keys)
                    continue
                for parked_at_ms, key in keys:
                    if now - parked_at_ms / 1000.0 < self.settings.scorer_park_timeout_s:
                        waiting += 1
                        continue
                    items = self._read_parked(key) or []
                    for item in items:
                        self._dead_letter(item, "no_model_serving")
                    self._publisher().flush()  # the dead letters are durable before the park is gone
                    self.store.delete(self.settings.s3_bucket, key)
            self.scorer_metrics.parked_batches.set(waiting)
        except DependencyUnavailable as exc:
            log.warning("parked decisions not swept, will retry", extra={"error": str(exc)[:300]})

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
            # Decisions parked while nothing served this exploration are scored now.
            self._score_parked(exploration_id, outcome.serving)
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


def stored_image_sha(decision: events_pb2.ImageDecision) -> str:
    """Identity of the image that was embedded: the stored object the decision is credited with
    (itself when unique, the image it duplicates otherwise)."""
    if decision.kind != common_pb2.DECISION_KIND_UNIQUE and decision.duplicate_of:
        return decision.duplicate_of
    if decision.pixel_sha256:
        return decision.pixel_sha256
    tail = decision.object_key.rsplit("/", 1)[-1]
    return tail if len(tail) == 64 and set(tail) <= _HEX else "key-" + decision.object_key


def _bounded_reason(exc: BaseException) -> str:
    if isinstance(exc, PermanentError):
        return exc.reason
    if isinstance(exc, ItemFailed):
        return exc.kind
    return type(exc).__name__


def _checked_exploration_id(exploration_id: str) -> str:
    if not records.valid_exploration_id(exploration_id):
        raise PermanentError("invalid_exploration_id", repr(exploration_id[:80]))
    return exploration_id


def _kind_name(kind: int) -> str:
    try:
        return common_pb2.DecisionKind.Name(kind)
    except ValueError:
        return "unknown"
