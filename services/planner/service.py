"""The planner service: the exploration API and the loop's conductor.

It owns every exploration's record (persisted in S3 before offsets are committed), issues queries,
decides when a query and an iteration are complete, hands the iteration to the trainer, and moves
on when the scorer serves the new model.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Iterator, Mapping

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from iex.v1 import common_pb2, events_pb2, planner_pb2, planner_pb2_grpc
from services.common import topics
from services.common.errors import DependencyUnavailable
from services.common.kafka import EventContext, Handler, now_timestamp
from services.common.objectstore import parse_s3_uri
from services.common.rewards import concept_reward
from services.common.service import Service
from services.common.settings import ServiceSettings, setting
from services.planner import sampling
from services.planner.state import ACCEPTED, TERMINAL, ExplorationRecord, IterationState, QueryState, decision_id, sum_counts
from services.planner.validation import InvalidField, SpecDefaults, check_exploration_id, normalise_spec

log = logging.getLogger(__name__)

STATE_PREFIX = "explorations"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")


@dataclass(frozen=True)
class PlannerSettings(ServiceSettings):
    planner_default_iterations: int = setting(40, help="iterations when a request leaves spec.iterations at 0 (paper: ~40)", minimum=1)
    planner_default_queries: int = setting(256, help="queries per iteration by default (paper: 256)", minimum=1)
    planner_default_images_per_query: int = setting(100, help="search results per query by default (paper: 100)", minimum=1)
    planner_default_backend: str = setting("local", help="search backend by default")
    planner_search_backends: tuple[str, ...] = setting(("local", "clip-retrieval"), help="backend names the crawler knows, comma separated")
    planner_default_init: str = setting("random", help="encoder initialisation by default")
    planner_default_backbone: str = setting("mobilenetv3_small_050", help="timm backbone by default")
    planner_default_image_size: int = setting(64, help="encoder input size by default", minimum=16)
    planner_iteration_deadline_s: int = setting(1800, help="seconds an iteration collects before moving on with what arrived", minimum=1)
    planner_replay_fraction: float = setting(0.5, help="share of an iteration's images, best rewards first, kept in the replay buffer", minimum=0.0, maximum=1.0)
    planner_concept_top: int = setting(10, help="concept reward = mean of this many best image rewards of its query", minimum=1)
    planner_spread: float = setting(3.0, help="(max - min) / tau of the sampling softmax", minimum=0.01)


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    if seconds:
        ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _model_ref(value: tuple[str, int] | None) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=value[0], version=value[1]) if value else common_pb2.ModelRef()


class Explorations:
    """The records, guarded by one lock; a condition wakes watchers on every change."""

    def __init__(self, store, bucket: str) -> None:
        self.store = store
        self.bucket = bucket
        self.records: dict[str, ExplorationRecord] = {}
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.dirty: set[str] = set()

    def state_key(self, exploration_id: str) -> str:
        return f"{STATE_PREFIX}/{exploration_id}/state.json"

    def load_all(self) -> int:
        loaded = 0
        for key in self.store.list_keys(self.bucket, f"{STATE_PREFIX}/"):
            if key.endswith("/state.json"):
                data = self.store.get_json(self.bucket, key)
                if data:
                    record = ExplorationRecord.from_json(data)
                    self.records[record.exploration_id] = record
                    loaded += 1
        return loaded

    def mark(self, record: ExplorationRecord) -> None:
        record.touch()
        self.dirty.add(record.exploration_id)
        self.changed.notify_all()

    def persist_dirty(self) -> None:
        with self.lock:
            pending = [(eid, self.records[eid].to_json()) for eid in sorted(self.dirty)]
            self.dirty.clear()
        try:
            for eid, data in pending:
                self.store.put_json(self.bucket, self.state_key(eid), data)
        except Exception:
            with self.lock:
                self.dirty.update(eid for eid, _ in pending)
            raise


class PlannerService(Service, planner_pb2_grpc.PlannerServiceServicer):
    name = "planner"
    settings_class = PlannerSettings

    def __init__(self, settings: PlannerSettings) -> None:
        super().__init__(settings)
        self.settings: PlannerSettings = settings
        self.explorations = Explorations(self.store, settings.s3_bucket)
        self.defaults = SpecDefaults(
            iterations=settings.planner_default_iterations,
            queries_per_iteration=settings.planner_default_queries,
            images_per_query=settings.planner_default_images_per_query,
            search_backend=settings.planner_default_backend,
            init=settings.planner_default_init,
            backbone=settings.planner_default_backbone,
            image_size=settings.planner_default_image_size,
            iteration_deadline_seconds=settings.planner_iteration_deadline_s,
            search_backends=settings.planner_search_backends,
        )
        m = self.metrics
        self.m_explorations = m.gauge("explorations", "Explorations by state", ["state"])
        self.m_queries = m.counter("queries_issued_total", "Queries published")
        self.m_iterations = m.counter("iterations_finished_total", "Iterations handed to the trainer", ["outcome"])
        self.m_concept_reward = m.histogram(
            "concept_reward", "Concept rewards of completed queries", buckets=(-0.5, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
        )
        self.m_iteration_seconds = m.histogram(
            "iteration_collect_duration_seconds", "Time from issuing an iteration's queries to its completion", buckets=(5, 15, 30, 60, 120, 300, 600, 1800, 3600)
        )

    # ---- lifecycle -----------------------------------------------------------------------------
    def register(self, server: grpc.Server) -> list[str]:
        planner_pb2_grpc.add_PlannerServiceServicer_to_server(self, server)
        return [planner_pb2.DESCRIPTOR.services_by_name["PlannerService"].full_name]

    def on_start(self) -> None:
        super().on_start()
        with self.explorations.lock:
            loaded = self.explorations.load_all()
        log.info("explorations restored", extra={"count": loaded})
        self._update_state_gauge()

    def handlers(self) -> Mapping[str, Handler]:
        return {
            topics.MODELS_SERVING.name: self.on_model_serving,
            topics.MODEL_LOAD_FAILED.name: self.on_model_load_failed,
            topics.QUERIES_CRAWLED.name: self.on_query_crawled,
            topics.DECISIONS.name: self.on_decision,
            topics.IMAGES_SCORED.name: self.on_image_scored,
            topics.MODELS.name: self.on_model_published,
            topics.EVALUATIONS.name: self.on_evaluation,
        }

    def before_commit(self) -> None:
        self.explorations.persist_dirty()

    def after_batch(self) -> None:
        """Deadlines: an iteration whose time is up moves on with what arrived."""
        now = time.time()
        changed = False
        with self.explorations.lock:
            for record in self.explorations.records.values():
                it = record.current()
                if record.state == common_pb2.EXPLORATION_STATE_RUNNING and it and it.phase == common_pb2.ITERATION_PHASE_COLLECTING and it.deadline and now > it.deadline:
                    log.warning("iteration deadline passed", extra={"exploration": record.exploration_id, "iteration": it.iteration})
                    self._finish_collecting(record, it)
                    changed = True
        if changed:
            self._sync()

    def on_stop(self) -> None:
        try:
            self.explorations.persist_dirty()
        except DependencyUnavailable:
            log.error("could not persist planner state on shutdown")

    def _sync(self) -> None:
        """Makes state and published events durable now (outside the consumer's commit path)."""
        self.explorations.persist_dirty()
        if self.publisher is not None:
            self.publisher.flush()

    def _update_state_gauge(self) -> None:
        with self.explorations.lock:
            by_state: dict[int, int] = {}
            for record in self.explorations.records.values():
                by_state[record.state] = by_state.get(record.state, 0) + 1
        for name, value in common_pb2.ExplorationState.items():
            if value:
                self.m_explorations.labels(state=name.removeprefix("EXPLORATION_STATE_").lower()).set(by_state.get(value, 0))

    # ---- the loop ------------------------------------------------------------------------------
    def _spec(self, record: ExplorationRecord) -> planner_pb2.ExplorationSpec:
        return planner_pb2.ExplorationSpec.FromString(bytes.fromhex(record.spec_hex))

    def _record(self, exploration_id: str) -> ExplorationRecord | None:
        record = self.explorations.records.get(exploration_id)
        if record is None or record.state in TERMINAL:
            return None
        return record

    def _choose_concepts(self, record: ExplorationRecord, spec: planner_pb2.ExplorationSpec, iteration: int) -> list[str]:
        rng = np.random.default_rng([spec.seed, iteration])
        if spec.mode == common_pb2.EXPLORATION_MODE_LABELS_ONLY:
            pool = list(spec.labels)
            picks = sampling.sample(sampling.uniform(len(pool)), spec.queries_per_iteration, rng)
            return [pool[i] for i in picks]
        pool = list(spec.concepts)
        probs = self._distribution(record, spec, pool)
        picks = sampling.sample(probs, spec.queries_per_iteration, rng)
        concepts = [pool[i] for i in picks]
        if spec.mode == common_pb2.EXPLORATION_MODE_LABELS:
            labels = list(spec.labels)
            use_label = rng.random(len(concepts)) < 0.5
            concepts = [labels[rng.integers(len(labels))] if flag else c for c, flag in zip(concepts, use_label)]
        return concepts

    def _distribution(self, record: ExplorationRecord, spec: planner_pb2.ExplorationSpec, pool: list[str]) -> np.ndarray:
        """The next query distribution over `pool`.

        Random mode is uniform. The learned modes rank concepts by their observed mean reward, with
        never-queried concepts placed optimistically at the best observed score until a reward model
        that generalises across concepts (the GP of issue #6) is configured.
        """
        if spec.mode == common_pb2.EXPLORATION_MODE_RANDOM or not record.observations:
            return sampling.uniform(len(pool))
        observed = {c: float(np.mean(v)) for c, v in record.observations.items() if v}
        optimistic = max(observed.values())
        scores = np.array([observed.get(c, optimistic) for c in pool], dtype=np.float64)
        return sampling.next_distribution(scores, spread=self.settings.planner_spread)

    def _start_iteration(self, record: ExplorationRecord, iteration: int) -> None:
        spec = self._spec(record)
        it = IterationState(iteration=iteration, deadline=time.time() + spec.iteration_deadline_seconds, scored_with=record.serving_model)
        concepts = self._choose_concepts(record, spec, iteration)
        for index, concept in enumerate(concepts):
            # Deterministic ids: re-issuing after a crash yields the same ids, which downstream dedups.
            query_id = f"{record.exploration_id}-i{iteration}-q{index}"
            descriptor = ""
            text = f"{descriptor} {concept}".strip()
            it.queries[query_id] = QueryState(query_id=query_id, concept=concept, descriptor=descriptor, text=text)
            record.times_queried[concept] = record.times_queried.get(concept, 0) + 1
            self.publisher.publish(
                topics.QUERIES,
                events_pb2.QueryIssued(
                    query_id=query_id,
                    exploration_id=record.exploration_id,
                    iteration=iteration,
                    concept=concept,
                    descriptor=descriptor,
                    text=text,
                    num_results=spec.images_per_query,
                    search_backend=spec.search_backend,
                    issued_at=now_timestamp(),
                ),
                # By query, not exploration: queries need no order, and one exploration's queries
                # then spread over every crawler replica.
                key=query_id,
            )
        self.m_queries.inc(len(concepts))
        record.iterations[iteration] = it
        record.current_iteration = iteration
        record.state = common_pb2.EXPLORATION_STATE_RUNNING
        self.explorations.mark(record)
        log.info("iteration started", extra={"exploration": record.exploration_id, "iteration": iteration, "queries": len(concepts)})

    def _query(self, exploration_id: str, iteration: int, query_id: str) -> tuple[ExplorationRecord, IterationState, QueryState] | None:
        record = self._record(exploration_id)
        if record is None:
            return None
        it = record.iterations.get(iteration)
        if it is None or it.phase != common_pb2.ITERATION_PHASE_COLLECTING:
            return None  # late event for an iteration that already moved on: ignored, counted as missing
        query = it.queries.get(query_id)
        if query is None:
            return None
        return record, it, query

    def _after_query_update(self, record: ExplorationRecord, it: IterationState, query: QueryState) -> None:
        if query.complete and query.concept_reward is None:
            query.concept_reward = concept_reward(query.rewards.values(), self.settings.planner_concept_top)
            self.m_concept_reward.observe(query.concept_reward)
        self.explorations.mark(record)
        # A paused exploration still finishes the iteration in hand; the pause holds at the boundary.
        if it.complete and record.state in (common_pb2.EXPLORATION_STATE_RUNNING, common_pb2.EXPLORATION_STATE_PAUSED):
            self._finish_collecting(record, it)

    def _finish_collecting(self, record: ExplorationRecord, it: IterationState) -> None:
        """All queries accounted for (or deadline): record rewards, write the manifest, hand to the trainer."""
        spec = self._spec(record)
        incomplete = 0
        for query in it.queries.values():
            if query.concept_reward is None:
                if not query.complete:
                    incomplete += 1
                query.concept_reward = concept_reward(query.rewards.values(), self.settings.planner_concept_top)
            record.observations.setdefault(query.concept, []).append(query.concept_reward)
        it.queries_incomplete = incomplete
        it.final_counts = it.counts()
        it.phase = common_pb2.ITERATION_PHASE_TRAINING
        self.m_iteration_seconds.observe(time.time() - it.started_at)

        # Candidates: images this iteration stored as new objects; replay: the best share of them.
        best: dict[str, float] = {}
        for query in it.queries.values():
            for did, key in query.accepted_objects.items():
                if query.decisions.get(did) == common_pb2.DECISION_KIND_UNIQUE and did in query.rewards:
                    best[key] = max(best.get(key, -2.0), query.rewards[did])
        ranked = sorted(best, key=lambda k: (-best[k], k))
        replay = ranked[: int(round(len(ranked) * self.settings.planner_replay_fraction))]
        target_bucket, target_prefix = parse_s3_uri(spec.target_uri)
        target_train, target_eval = self._target_objects(target_bucket, target_prefix)
        rewards = it.concept_rewards()
        manifest = {
            "exploration_id": record.exploration_id,
            "iteration": it.iteration,
            "images_bucket": self.settings.s3_bucket,
            "candidates": sorted(best),
            "candidate_rewards": {k: best[k] for k in sorted(best)},
            "replay": replay,
            "target_bucket": target_bucket,
            "target_train": target_train,
            "target_eval": target_eval,
            "concept_rewards": [
                {"query_id": q.query_id, "concept": q.concept, "text": q.text, "reward": q.concept_reward, "complete": q.complete}
                for q in it.queries.values()
            ],
        }
        it.manifest_key = f"{STATE_PREFIX}/{record.exploration_id}/iterations/{it.iteration}/manifest.json"
        self.store.put_json(self.settings.s3_bucket, it.manifest_key, manifest)
        self.publisher.publish(
            topics.ITERATIONS,
            events_pb2.IterationFinished(
                exploration_id=record.exploration_id,
                iteration=it.iteration,
                manifest_key=it.manifest_key,
                candidates=len(best),
                replay_selected=len(replay),
                mean_concept_reward=float(np.mean(rewards)) if rewards else 0.0,
                last=it.iteration >= spec.iterations,
                finished_at=now_timestamp(),
            ),
            key=record.exploration_id,
        )
        self.m_iterations.labels(outcome="complete" if incomplete == 0 else "deadline").inc()
        self.explorations.mark(record)
        log.info(
            "iteration collected",
            extra={"exploration": record.exploration_id, "iteration": it.iteration, "candidates": len(best), "incomplete_queries": incomplete},
        )

    def _target_objects(self, bucket: str, prefix: str) -> tuple[list[str], list[dict[str, str]]]:
        base = f"{prefix}/" if prefix else ""
        train = sorted(k for k in self.store.list_keys(bucket, f"{base}train/") if k.lower().endswith(IMAGE_SUFFIXES))
        evaluation = []
        for key in sorted(self.store.list_keys(bucket, f"{base}eval/")):
            parts = key[len(f"{base}eval/") :].split("/")
            if len(parts) >= 2 and key.lower().endswith(IMAGE_SUFFIXES):
                evaluation.append({"key": key, "label": parts[0]})
        return train, evaluation

    def _advance(self, record: ExplorationRecord) -> None:
        """Called when the model trained on the current iteration is served (or failed to load)."""
        spec = self._spec(record)
        it = record.current()
        if it is not None and it.phase == common_pb2.ITERATION_PHASE_TRAINING:
            it.phase = common_pb2.ITERATION_PHASE_FINISHED
            it.finished_at = time.time()
        if record.iterations_finished >= spec.iterations:
            record.state = common_pb2.EXPLORATION_STATE_SUCCEEDED
            self.explorations.mark(record)
            self._update_state_gauge()
            log.info("exploration succeeded", extra={"exploration": record.exploration_id})
            return
        if record.state == common_pb2.EXPLORATION_STATE_PAUSED:
            self.explorations.mark(record)
            return
        self._start_iteration(record, record.current_iteration + 1)

    # ---- handlers ------------------------------------------------------------------------------
    def on_model_serving(self, event: events_pb2.ModelServing, ctx: EventContext) -> None:
        with self.explorations.lock:
            record = self._record(event.exploration_id)
            if record is None:
                return
            model = (event.model.name, event.model.version)
            if record.serving_model and record.serving_model[1] >= model[1]:
                return  # redelivery or an older version
            record.serving_model = model
            it = record.current()
            if record.current_iteration == 0:
                if record.state == common_pb2.EXPLORATION_STATE_PENDING:
                    self._start_iteration(record, 1)
                else:
                    self.explorations.mark(record)
            elif it is not None and it.phase == common_pb2.ITERATION_PHASE_TRAINING and model[1] > it.iteration:
                self._advance(record)
            else:
                self.explorations.mark(record)
            self._update_state_gauge()

    def on_model_load_failed(self, event: events_pb2.ModelLoadFailed, ctx: EventContext) -> None:
        with self.explorations.lock:
            record = self._record(event.exploration_id)
            if record is None:
                return
            it = record.current()
            log.error(
                "model failed to load; continuing with the serving one",
                extra={"exploration": record.exploration_id, "version": event.model.version, "reason": event.reason[:200]},
            )
            if record.current_iteration == 0:
                record.state = common_pb2.EXPLORATION_STATE_FAILED
                record.error = f"initial model failed to load: {event.reason[:500]}"
                self.explorations.mark(record)
                self._update_state_gauge()
            elif it is not None and it.phase == common_pb2.ITERATION_PHASE_TRAINING and event.model.version > it.iteration:
                self._advance(record)

    def on_query_crawled(self, event: events_pb2.QueryCrawled, ctx: EventContext) -> None:
        with self.explorations.lock:
            found = self._query(event.exploration_id, event.iteration, event.query_id)
            if found is None:
                return
            record, it, query = found
            query.crawled = True
            query.results_returned = event.results_returned
            query.images_expected = event.images_fetched
            query.refused = dict(event.refused)
            self._after_query_update(record, it, query)

    def on_decision(self, event: events_pb2.ImageDecision, ctx: EventContext) -> None:
        with self.explorations.lock:
            found = self._query(event.exploration_id, event.iteration, event.query_id)
            if found is None:
                return
            record, it, query = found
            did = decision_id(event.raw_sha256, event.url)
            query.decisions[did] = int(event.kind)
            if event.kind in ACCEPTED:
                query.accepted_objects[did] = event.object_key
            self._after_query_update(record, it, query)

    def on_image_scored(self, event: events_pb2.ImageScored, ctx: EventContext) -> None:
        with self.explorations.lock:
            found = self._query(event.exploration_id, event.iteration, event.query_id)
            if found is None:
                return
            record, it, query = found
            query.rewards[decision_id(event.raw_sha256, event.url)] = float(event.reward)
            it.scored_with = (event.model.name, event.model.version)
            self._after_query_update(record, it, query)

    def on_model_published(self, event: events_pb2.ModelPublished, ctx: EventContext) -> None:
        with self.explorations.lock:
            record = self._record(event.exploration_id)
            if record is None:
                return
            it = record.iterations.get(event.iteration)
            if it is not None:
                it.trained_model = (event.model.name, event.model.version)
                self.explorations.mark(record)

    def on_evaluation(self, event: events_pb2.EvaluationFinished, ctx: EventContext) -> None:
        with self.explorations.lock:
            record = self.explorations.records.get(event.exploration_id)
            if record is None:
                return
            it = record.iterations.get(event.iteration)
            if it is not None:
                it.knn_top1 = float(event.knn_top1)
                self.explorations.mark(record)

    # ---- gRPC API ------------------------------------------------------------------------------
    def _to_proto(self, record: ExplorationRecord) -> planner_pb2.Exploration:
        iterations = []
        for n in sorted(record.iterations):
            it = record.iterations[n]
            rewards = it.concept_rewards()
            iterations.append(
                planner_pb2.IterationSummary(
                    iteration=n,
                    phase=it.phase,
                    counts=common_pb2.ImageCounts(**it.counts()),
                    mean_concept_reward=float(np.mean(rewards)) if rewards else 0.0,
                    max_concept_reward=float(np.max(rewards)) if rewards else 0.0,
                    queries_incomplete=it.queries_incomplete,
                    scored_with=_model_ref(it.scored_with),
                    trained_model=_model_ref(it.trained_model),
                    knn_top1=it.knn_top1 or 0.0,
                    started_at=_ts(it.started_at),
                    finished_at=_ts(it.finished_at),
                )
            )
        return planner_pb2.Exploration(
            exploration_id=record.exploration_id,
            spec=self._spec(record),
            state=record.state,
            current_iteration=record.current_iteration,
            iterations_finished=record.iterations_finished,
            counts=common_pb2.ImageCounts(**sum_counts(it.counts() for it in record.iterations.values())),
            serving_model=_model_ref(record.serving_model),
            iterations=iterations,
            error=record.error,
            created_at=_ts(record.created_at),
            updated_at=_ts(record.updated_at),
        )

    def _get(self, exploration_id: str, context: grpc.ServicerContext) -> ExplorationRecord:
        try:
            check_exploration_id(exploration_id)
        except InvalidField as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        record = self.explorations.records.get(exploration_id)
        if record is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"exploration_id: no exploration {exploration_id!r}")
        return record

    def CreateExploration(self, request: planner_pb2.CreateExplorationRequest, context) -> planner_pb2.CreateExplorationResponse:
        try:
            spec = normalise_spec(request.spec, self.defaults)
            exploration_id = check_exploration_id(request.exploration_id) if request.exploration_id else uuid.uuid4().hex[:12]
        except InvalidField as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        bucket, prefix = parse_s3_uri(spec.target_uri)
        try:
            has_train = any(True for _ in self.store.list_keys(bucket, f"{prefix}/train/" if prefix else "train/"))
        except DependencyUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"object store unavailable: {exc}")
        except Exception as exc:  # noqa: BLE001 - a missing bucket is the caller's mistake, reported as such
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"spec.target_uri: cannot list {spec.target_uri}: {exc}")
        if not has_train:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"spec.target_uri: no images under {spec.target_uri}/train/")
        with self.explorations.lock:
            existing = self.explorations.records.get(exploration_id)
            if existing is not None:
                if existing.spec_hex != spec.SerializeToString(deterministic=True).hex():
                    context.abort(grpc.StatusCode.ALREADY_EXISTS, f"exploration_id: {exploration_id!r} exists with a different spec")
                return planner_pb2.CreateExplorationResponse(exploration=self._to_proto(existing))
            record = ExplorationRecord(exploration_id=exploration_id, spec_hex=spec.SerializeToString(deterministic=True).hex())
            self.explorations.records[exploration_id] = record
            self.explorations.mark(record)
            self.publisher.publish(
                topics.EXPLORATIONS,
                events_pb2.ExplorationCreated(
                    exploration_id=exploration_id,
                    target_uri=spec.target_uri,
                    init=spec.init,
                    backbone=spec.backbone,
                    image_size=spec.image_size,
                    created_at=now_timestamp(),
                    seed=spec.seed,
                ),
                key=exploration_id,
            )
        try:
            self._sync()
        except DependencyUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"could not record the exploration: {exc}")
        self._update_state_gauge()
        log.info("exploration created", extra={"exploration": exploration_id, "mode": common_pb2.ExplorationMode.Name(spec.mode)})
        return planner_pb2.CreateExplorationResponse(exploration=self._to_proto(record))

    def GetExploration(self, request, context) -> planner_pb2.GetExplorationResponse:
        with self.explorations.lock:
            return planner_pb2.GetExplorationResponse(exploration=self._to_proto(self._get(request.exploration_id, context)))

    def ListExplorations(self, request, context) -> planner_pb2.ListExplorationsResponse:
        if request.page_size < 0 or request.page_size > 1000:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_size: must be between 0 and 1000")
        if request.state not in common_pb2.ExplorationState.values():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"state: unknown state {request.state}")
        size = request.page_size or 50
        try:
            start = int(request.page_token or 0)
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_token: not a token returned by ListExplorations")
        with self.explorations.lock:
            records = sorted(self.explorations.records.values(), key=lambda r: (r.created_at, r.exploration_id))
            if request.state:
                records = [r for r in records if r.state == request.state]
            page = records[start : start + size]
            token = str(start + size) if start + size < len(records) else ""
            return planner_pb2.ListExplorationsResponse(explorations=[self._to_proto(r) for r in page], next_page_token=token)

    def WatchExploration(self, request, context) -> Iterator[planner_pb2.WatchExplorationResponse]:
        seen = -1
        while context.is_active() and not self.stopping.is_set():
            with self.explorations.lock:
                record = self._get(request.exploration_id, context)
                if record.revision == seen:
                    self.explorations.changed.wait(timeout=1.0)
                    continue
                seen = record.revision
                snapshot = self._to_proto(record)
                ended = record.state in TERMINAL
            yield planner_pb2.WatchExplorationResponse(exploration=snapshot)
            if ended:
                return

    def _set_state(self, request, context, allowed: set[int], new_state: int):
        with self.explorations.lock:
            record = self._get(request.exploration_id, context)
            if record.state == new_state:
                return self._to_proto(record)
            if record.state not in allowed:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"exploration_id: exploration is {common_pb2.ExplorationState.Name(record.state)}",
                )
            previous = record.state
            record.state = new_state
            self.explorations.mark(record)
            if new_state == common_pb2.EXPLORATION_STATE_RUNNING and previous == common_pb2.EXPLORATION_STATE_PAUSED:
                self._resume(record)
        try:
            self._sync()
        except DependencyUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"could not record the change: {exc}")
        self._update_state_gauge()
        with self.explorations.lock:
            return self._to_proto(record)

    def _resume(self, record: ExplorationRecord) -> None:
        """A pause holds the loop at an iteration boundary; resuming continues from there."""
        it = record.current()
        if record.current_iteration == 0:
            if record.serving_model is None:
                record.state = common_pb2.EXPLORATION_STATE_PENDING  # still waiting for the initial encoder
            else:
                self._start_iteration(record, 1)
        elif it is not None and it.phase == common_pb2.ITERATION_PHASE_FINISHED:
            self._advance(record)
        elif it is not None and it.phase == common_pb2.ITERATION_PHASE_COLLECTING and it.complete:
            self._finish_collecting(record, it)

    def PauseExploration(self, request, context):
        running = {common_pb2.EXPLORATION_STATE_RUNNING, common_pb2.EXPLORATION_STATE_PENDING}
        return planner_pb2.PauseExplorationResponse(exploration=self._set_state(request, context, running, common_pb2.EXPLORATION_STATE_PAUSED))

    def ResumeExploration(self, request, context):
        return planner_pb2.ResumeExplorationResponse(
            exploration=self._set_state(request, context, {common_pb2.EXPLORATION_STATE_PAUSED}, common_pb2.EXPLORATION_STATE_RUNNING)
        )

    def CancelExploration(self, request, context):
        live = {common_pb2.EXPLORATION_STATE_RUNNING, common_pb2.EXPLORATION_STATE_PENDING, common_pb2.EXPLORATION_STATE_PAUSED}
        return planner_pb2.CancelExplorationResponse(exploration=self._set_state(request, context, live, common_pb2.EXPLORATION_STATE_CANCELLED))

    def TopConcepts(self, request, context) -> planner_pb2.TopConceptsResponse:
        if request.limit < 0 or request.limit > 10_000:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit: must be between 0 and 10000")
        with self.explorations.lock:
            record = self._get(request.exploration_id, context)
            spec = self._spec(record)
            pool = list(spec.labels) if spec.mode == common_pb2.EXPLORATION_MODE_LABELS_ONLY else list(spec.concepts)
            probs = self._distribution(record, spec, pool) if pool else np.zeros(0)
            observed = {c: float(np.mean(v)) for c, v in record.observations.items() if v}
            rows = []
            for i, concept in enumerate(pool):
                rows.append(
                    planner_pb2.ConceptScore(
                        concept=concept,
                        predicted_reward=observed.get(concept, 0.0),
                        uncertainty=0.0 if concept in observed else 1.0,
                        observed_reward=observed.get(concept, 0.0),
                        times_queried=record.times_queried.get(concept, 0),
                        sampling_probability=float(probs[i]),
                    )
                )
        rows.sort(key=lambda r: (-r.sampling_probability, -r.observed_reward, r.concept))
        return planner_pb2.TopConceptsResponse(concepts=rows[: request.limit or 20])

    def QueryHistory(self, request, context) -> planner_pb2.QueryHistoryResponse:
        if request.iteration < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "iteration: must be >= 0")
        if request.page_size < 0 or request.page_size > 10_000:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_size: must be between 0 and 10000")
        try:
            start = int(request.page_token or 0)
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_token: not a token returned by QueryHistory")
        size = request.page_size or 100
        with self.explorations.lock:
            record = self._get(request.exploration_id, context)
            rows = []
            for n in sorted(record.iterations):
                if request.iteration and n != request.iteration:
                    continue
                for query in record.iterations[n].queries.values():
                    rows.append(
                        planner_pb2.QueryRecord(
                            query_id=query.query_id,
                            iteration=n,
                            concept=query.concept,
                            descriptor=query.descriptor,
                            text=query.text,
                            counts=common_pb2.ImageCounts(**query.counts()),
                            concept_reward=query.concept_reward or 0.0,
                            complete=query.complete,
                        )
                    )
        page = rows[start : start + size]
        token = str(start + size) if start + size < len(rows) else ""
        return planner_pb2.QueryHistoryResponse(queries=page, next_page_token=token)
