"""The planner service: the exploration API and the loop's conductor.

It owns every exploration's record (persisted in S3 before offsets are committed), decides when a
query and an iteration are complete, hands the iteration to the trainer, and moves on when the scorer
serves the new model. Choosing the next queries (the GP posterior over the vocabulary, sampling,
descriptors) takes seconds, so it runs on a planning thread, outside the consumer and the records'
lock: the loop only asks for "iteration n" (`pending_iteration`, persisted), and the planning thread
turns the request into queries, persists the plan, then publishes it. A restarted planner finds
those requests and unpublished plans in S3 and carries them out, so no iteration is skipped and no
finished query is issued again.
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
from services.common.settings import ServiceSettings, SettingsError, setting
from services.planner import descriptors as descriptor_sources
from services.planner import distributions, gp, planning, sampling
from services.planner.state import ACCEPTED, TERMINAL, ExplorationRecord, IterationState, QueryState, candidate_digest, decision_id, sum_counts
from services.planner.validation import InvalidField, SpecDefaults, check_exploration_id, normalise_spec
from services.planner.vocabulary import CUSTOM, WORDNET, EmbeddingCache, VocabularySettings, Vocabulary, custom_vocabulary, embedding_digest, wordnet_vocabulary

log = logging.getLogger(__name__)

STATE_PREFIX = "explorations"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
MODES = {
    common_pb2.EXPLORATION_MODE_IE: "ie",
    common_pb2.EXPLORATION_MODE_RANDOM: "uniform",
    common_pb2.EXPLORATION_MODE_LABELS: "labels",
    common_pb2.EXPLORATION_MODE_LABELS_ONLY: "uniform",
}


@dataclass(frozen=True)
class PlannerSettings(ServiceSettings, VocabularySettings):
    planner_default_iterations: int = setting(40, help="iterations when a request leaves spec.iterations unset (paper: ~40)", minimum=1)
    planner_default_queries: int = setting(256, help="queries per iteration when spec.queries_per_iteration is unset (paper: 256)", minimum=1)
    planner_default_images_per_query: int = setting(100, help="search results per query when spec.images_per_query is unset (paper: 100)", minimum=1)
    planner_default_backend: str = setting("local", help="search backend by default")
    planner_search_backends: tuple[str, ...] = setting(("local", "clip-retrieval"), help="backend names the crawler knows, comma separated")
    planner_default_init: str = setting("random", help="encoder initialisation by default")
    planner_default_backbone: str = setting("mobilenetv3_small_050", help="timm backbone by default")
    planner_default_image_size: int = setting(64, help="encoder input size by default", minimum=16)
    planner_iteration_deadline_s: int = setting(1800, help="seconds an iteration collects before moving on with what arrived", minimum=1)
    planner_replay_fraction: float = setting(0.5, help="share of an iteration's images, best rewards first, kept in the replay buffer", minimum=0.0, maximum=1.0)
    planner_concept_top: int = setting(10, help="concept reward = mean of this many best image rewards of its query", minimum=1)
    planner_spread: float = setting(3.0, help="(max - min) / tau of the sampling softmax when a request leaves spec.sampling.spread at 0", minimum=0.01)
    planner_default_vocabulary: str = setting(
        "wordnet", help="vocabulary of requests that bring no concepts: 'wordnet' (146,347 WordNet noun concepts) or 'none' (concepts required)", choices=("wordnet", "none")
    )
    planner_default_descriptors: str = setting("none", help="descriptor source when a request leaves spec.descriptors empty", choices=descriptor_sources.SOURCES)
    planner_preload_vocabulary: bool = setting(False, help="load (or build) the default vocabulary's embeddings at start instead of on first use")
    planner_tier_masses: tuple[float, ...] = setting(
        sampling.PAPER_MASSES,
        help="probability shares of the 250 best concepts, the next 750 and the rest, when a request leaves spec.sampling.tier_masses empty (the paper's 0.8,0.1,0.1)",
    )
    planner_gp_length_scale: float = setting(
        gp.PROJECT_LENGTH_SCALE, help="RBF length-scale of the GP when a request leaves spec.reward_model.length_scale at 0 (paper: 1.0)", minimum=0.01, maximum=100.0
    )
    planner_gp_noise: float = setting(0.1, help="GP observation noise variance on standardised rewards, when a request leaves it at 0", minimum=1e-6)
    planner_gp_rank: int = setting(512, help="rank of the vocabulary kernel factor the approximate GP uses", minimum=16, maximum=8192)
    planner_gp_exact_max: int = setting(
        0, help="distinct observed concepts up to which the GP is exact, then PIC/FIC; 0: 2048 on a CPU, 16384 on CUDA", minimum=0
    )
    planner_gp_normalize: bool = setting(True, help="standardise concept rewards before the GP (scikit-learn's normalize_y)")
    planner_fresh_concepts: bool = setting(
        True,
        help="leave concepts whose query was already asked (another sense of the same name included) out of later iterations' draws, and draw each query once per iteration, when queries carry no descriptor (a deterministic search, like the offline web's or a cache's, answers them with the same images again); they still inform the GP. false: the paper's draw",
    )
    planner_device: str = setting("auto", help="torch device of the reward model: auto (CUDA when present), cpu or cuda", choices=("auto", "cpu", "cuda"))
    planner_llm_url: str = setting("", help="OpenAI-compatible base URL for LLM descriptors (e.g. http://vllm:8000/v1); empty disables 'llm'")
    planner_llm_model: str = setting("", help="model name sent to the LLM endpoint")
    planner_llm_api_key: str = setting("", help="bearer token for the LLM endpoint", secret=True)
    planner_llm_timeout_s: float = setting(10.0, help="seconds to wait for one LLM completion request", minimum=0.1)
    planner_distribution_rows: int = setting(10_000, help="rows of each iteration's distribution stored with their concept names (TopConcepts reads them)", minimum=1)

    def __post_init__(self) -> None:
        problem = sampling.masses_problem(self.planner_tier_masses)
        if problem:
            raise SettingsError(f"IEX_PLANNER_TIER_MASSES: {problem}")


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    if seconds:
        ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _model_ref(value: tuple[str, int] | None) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=value[0], version=value[1]) if value else common_pb2.ModelRef()


def _evaluation(value: dict | None) -> planner_pb2.EncoderEvaluation:
    if not value:
        return planner_pb2.EncoderEvaluation()
    model = value.get("model") or None
    return planner_pb2.EncoderEvaluation(
        model=_model_ref(tuple(model) if model else None),
        knn_top1=float(value.get("knn_top1", 0.0)),
        linear_probe_top1=float(value.get("linear_probe_top1", 0.0)),
        eval_images=int(value.get("eval_images", 0)),
        # Records written before the paper's protocol existed lack these.
        protocol=str(value.get("protocol", "")),
        train_images=int(value.get("train_images", 0)),
        classes=int(value.get("classes", 0)),
        measurable=bool(value.get("measurable", False)),
        not_measurable_reason=str(value.get("not_measurable_reason", "")),
        detectable_difference=float(value.get("detectable_difference", 0.0)),
        record_key=str(value.get("record_key", "")),
    )


def evaluation_dict(event: events_pb2.EvaluationFinished) -> dict:
    """What the planner keeps of an EvaluationFinished (initial encoder and every iteration)."""
    return {
        "model": [event.model.name, int(event.model.version)],
        "knn_top1": float(event.knn_top1),
        "linear_probe_top1": float(event.linear_probe_top1),
        "eval_images": int(event.eval_images),
        "protocol": event.protocol,
        "train_images": int(event.train_images),
        "classes": int(event.classes),
        "measurable": bool(event.measurable),
        "not_measurable_reason": event.not_measurable_reason,
        "detectable_difference": float(event.detectable_difference),
        "record_key": event.record_key,
    }


class Explorations:
    """The records, guarded by one lock; a condition wakes watchers on every change."""

    def __init__(self, store, bucket: str) -> None:
        self.store = store
        self.bucket = bucket
        self.records: dict[str, ExplorationRecord] = {}
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.dirty: set[str] = set()
        # Serialises writers so a slower, older snapshot never overwrites a newer one.
        self._write_lock = threading.Lock()

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
        with self._write_lock:
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
    # Handlers are dictionary updates, and every committed batch rewrites the record in S3: large
    # batches keep that to a few dozen writes per iteration at the paper's 25k images (50k events).
    max_poll_records = 1000

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
            vocabulary=WORDNET if settings.planner_default_vocabulary == "wordnet" else "",
            descriptors=settings.planner_default_descriptors,
            llm_configured=bool(settings.planner_llm_url),
            spread=settings.planner_spread,
            tier_masses=settings.planner_tier_masses,
            gp_length_scale=settings.planner_gp_length_scale,
            gp_noise=settings.planner_gp_noise,
            gp_rank=settings.planner_gp_rank,
            gp_exact_max=settings.planner_gp_exact_max,
        )
        self.embeddings = EmbeddingCache(self.store, settings.s3_bucket, cache_dir=settings.cache_dir(), on_ready=self._on_embeddings_ready)
        self.reward_model = planning.RewardModel(device=settings.planner_device)
        self._vocabularies: dict[str, Vocabulary] = {}
        self._vocabulary_lock = threading.Lock()
        self._label_embeddings: dict[str, np.ndarray] = {}
        self._pools: dict[str, planning.Pool] = {}
        self._latest: dict[str, distributions.Distribution] = {}
        self._descriptor_sources: dict[str, descriptor_sources.DescriptorSource] = {}
        # Explorations the planning thread should look at; a set, so repeated wake-ups coalesce.
        self._work: set[str] = set()
        self._work_ready = threading.Condition()
        self._planner_thread: threading.Thread | None = None
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
        self.m_planning_seconds = m.histogram(
            "planning_duration_seconds", "One planning step: posterior over the pool, sampling, descriptors", ["reward_model"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
        )
        self.m_descriptor_fallbacks = m.counter("descriptor_fallbacks_total", "LLM descriptor batches answered by the offline source instead")
        self.m_waiting = m.gauge("explorations_waiting_for_vocabulary", "Explorations whose next iteration waits for vocabulary embeddings")

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
        if self.settings.planner_preload_vocabulary and self.defaults.vocabulary == WORDNET:
            threading.Thread(target=self._preload_default_vocabulary, name="vocabulary-preload", daemon=True).start()

    def start(self) -> None:
        super().start()
        self._planner_thread = threading.Thread(target=self._planning_loop, name="planning", daemon=True)
        self._planner_thread.start()
        # Whatever a previous process left half-done (requested iterations, unpublished plans) resumes now.
        with self.explorations.lock:
            for record in self.explorations.records.values():
                if record.state not in TERMINAL:
                    self._wake(record.exploration_id)

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
        """Deadlines and wall-time budgets: an iteration whose time is up moves on with what arrived."""
        now = time.time()
        changed = False
        with self.explorations.lock:
            for record in self.explorations.records.values():
                it = record.current()
                if record.state != common_pb2.EXPLORATION_STATE_RUNNING or it is None or it.phase != common_pb2.ITERATION_PHASE_COLLECTING or not it.published:
                    continue
                if it.deadline and now > it.deadline:
                    log.warning("iteration deadline passed", extra={"exploration": record.exploration_id, "iteration": it.iteration})
                    self._finish_collecting(record, it)
                    changed = True
        if changed:
            self._sync()

    def on_stop(self) -> None:
        with self._work_ready:
            self._work_ready.notify_all()
        if self._planner_thread is not None:
            self._planner_thread.join(timeout=30)
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

    # ---- vocabularies and pools ------------------------------------------------------------------
    def _spec(self, record: ExplorationRecord) -> planner_pb2.ExplorationSpec:
        return planner_pb2.ExplorationSpec.FromString(bytes.fromhex(record.spec_hex))

    def _preload_default_vocabulary(self) -> None:
        try:
            self.embeddings.request(self._vocabulary_of(WORDNET, ()))
        except Exception:  # noqa: BLE001 - preloading is an optimisation; the first exploration retries
            log.exception("could not preload the default vocabulary")

    def _vocabulary_of(self, kind: str, concepts) -> Vocabulary:
        """The vocabulary object (names and texts, no embeddings), cached: WordNet takes seconds to read."""
        key = WORDNET if kind == WORDNET else embedding_digest(list(concepts), model="custom-list")
        with self._vocabulary_lock:
            vocabulary = self._vocabularies.get(key)
            if vocabulary is None:
                vocabulary = wordnet_vocabulary(concept_text=self.settings.planner_concept_text) if kind == WORDNET else custom_vocabulary(list(concepts))
                self._vocabularies[key] = vocabulary
            return vocabulary

    def _on_embeddings_ready(self, digest: str) -> None:
        with self.explorations.lock:
            for record in self.explorations.records.values():
                if record.pending_iteration and record.state not in TERMINAL:
                    self._wake(record.exploration_id)

    def _embed_labels(self, texts: list[str]) -> np.ndarray:
        from services.common.textembed import shared_minilm

        missing = [t for t in texts if t not in self._label_embeddings]
        if missing:
            for text, vector in zip(missing, shared_minilm().embed(missing)):
                self._label_embeddings[text] = vector
        return np.stack([self._label_embeddings[t] for t in texts]).astype(np.float32)

    def _pool(self, exploration_id: str, spec: planner_pb2.ExplorationSpec) -> tuple[planning.Pool | None, str]:
        """The exploration's pool, or None and what it waits for (embeddings being built)."""
        cached = self._pools.get(exploration_id)
        if cached is not None:
            return cached, ""
        if spec.mode == common_pb2.EXPLORATION_MODE_LABELS_ONLY:
            pool = planning.labels_only_pool(list(spec.labels))
        else:
            vocabulary = self._vocabulary_of(spec.vocabulary or CUSTOM, spec.concepts)
            if spec.mode == common_pb2.EXPLORATION_MODE_RANDOM:
                pool = planning.vocabulary_pool(vocabulary, None)
            else:
                job = self.embeddings.request(vocabulary)
                if job.state != "ready" or job.embeddings is None:
                    return None, job.describe() or "waiting for vocabulary embeddings"
                if spec.mode == common_pb2.EXPLORATION_MODE_LABELS:
                    labels = list(dict.fromkeys(spec.labels))
                    label_vectors = self._embed_labels(planning.label_texts(labels, list(spec.label_descriptions)))
                    pool = planning.label_guided_pool(
                        vocabulary, job.embeddings, labels, label_vectors, spec.sampling.prune_fraction, spec.sampling.prune_neighbours
                    )
                else:
                    pool = planning.vocabulary_pool(vocabulary, job.embeddings)
        self._pools[exploration_id] = pool
        return pool, ""

    def _descriptor_source(self, name: str) -> descriptor_sources.DescriptorSource:
        source = self._descriptor_sources.get(name)
        if source is None:
            s = self.settings
            if name == descriptor_sources.CURATED:
                source = descriptor_sources.CuratedDescriptors()
            elif name == descriptor_sources.WORDNET:
                source = descriptor_sources.WordNetDescriptors()
            elif name == descriptor_sources.LLM:
                source = descriptor_sources.LLMDescriptors(s.planner_llm_url, s.planner_llm_model, api_key=s.planner_llm_api_key, timeout_s=s.planner_llm_timeout_s)
            else:
                source = descriptor_sources.NoDescriptors()
            self._descriptor_sources[name] = source
        return source

    # ---- the planning thread ---------------------------------------------------------------------
    def _wake(self, exploration_id: str) -> None:
        with self._work_ready:
            self._work.add(exploration_id)
            self._work_ready.notify()

    def _planning_loop(self) -> None:
        last_sweep = 0.0
        while not self.stopping.is_set():
            with self._work_ready:
                if not self._work:
                    self._work_ready.wait(timeout=2.0)
                batch, self._work = sorted(self._work), set()
            if time.monotonic() - last_sweep > 10.0:
                # A periodic sweep catches what a failed step left behind (S3 or Kafka away).
                last_sweep = time.monotonic()
                with self.explorations.lock:
                    batch = sorted(set(batch) | {eid for eid, r in self.explorations.records.items() if self._needs_planning(r)})
            waiting = 0
            for exploration_id in batch:
                if self.stopping.is_set():
                    return
                try:
                    waiting += self._plan_step(exploration_id)
                except DependencyUnavailable as exc:
                    log.warning("planning step postponed", extra={"exploration": exploration_id, "error": str(exc)[:300]})
                except Exception as exc:  # noqa: BLE001 - a planning bug fails that exploration, not the service
                    log.exception("planning failed", extra={"exploration": exploration_id})
                    self._fail(exploration_id, f"planning failed: {type(exc).__name__}: {exc}"[:500])
            self.m_waiting.set(waiting)

    @staticmethod
    def _needs_planning(record: ExplorationRecord) -> bool:
        if record.state in TERMINAL:
            return False
        it = record.current()
        return bool(record.pending_iteration) or (it is not None and not it.published)

    def _fail(self, exploration_id: str, error: str) -> None:
        with self.explorations.lock:
            record = self.explorations.records.get(exploration_id)
            if record is None or record.state in TERMINAL:
                return
            record.state = common_pb2.EXPLORATION_STATE_FAILED
            record.error = error
            record.pending_iteration = 0
            self.explorations.mark(record)
        self._update_state_gauge()
        try:
            self._sync()
        except DependencyUnavailable:
            pass

    def _queried_rows(self, pool: planning.Pool, rewards: dict[str, list[float]], spec) -> np.ndarray | None:
        """Concepts not to draw again (planner_fresh_concepts): those queried, unless a descriptor makes each query new."""
        if not self.settings.planner_fresh_concepts or (spec.descriptors or descriptor_sources.NONE) != descriptor_sources.NONE:
            return None
        return planning.queried_rows(pool, rewards)

    def _plan_step(self, exploration_id: str) -> int:
        """Publishes a persisted plan, or plans a requested iteration. Returns 1 while waiting for embeddings."""
        with self.explorations.lock:
            record = self.explorations.records.get(exploration_id)
            if record is None or record.state in TERMINAL:
                self._pools.pop(exploration_id, None)
                return 0
            it = record.current()
            unpublished = it is not None and not it.published
        if unpublished:
            self._publish_plan(record, it)
            return 0
        with self.explorations.lock:
            iteration = record.pending_iteration
            if not iteration or record.state == common_pb2.EXPLORATION_STATE_PAUSED:
                return 0
            spec = self._spec(record)
            reason = self._budget_reason(record, spec)
            if reason:
                self._stop_for_budget(record, reason)
                return 0
            rewards = {k: list(v) for k, v in record.observations.items()}
        pool, waiting_for = self._pool(exploration_id, spec)
        if pool is None:
            with self.explorations.lock:
                if record.detail != waiting_for:
                    record.detail = waiting_for
                    self.explorations.mark(record)
            return 1
        plan = planning.make_plan(
            pool,
            rewards,
            mode=MODES[spec.mode],
            queries=spec.queries_per_iteration,
            rng=np.random.default_rng([spec.seed, iteration]),
            sampling_params=planning.SamplingParams(
                spread=spec.sampling.spread,
                tiers=tuple(spec.sampling.tier_sizes),
                masses=tuple(spec.sampling.tier_masses),
                label_fraction=spec.sampling.label_fraction,
                prune_fraction=spec.sampling.prune_fraction,
                prune_neighbours=spec.sampling.prune_neighbours,
            ),
            model_params=planning.ModelParams(
                length_scale=spec.reward_model.length_scale,
                noise=spec.reward_model.noise,
                rank=spec.reward_model.rank,
                exact_max=spec.reward_model.exact_max,
                normalize=self.settings.planner_gp_normalize,
            ),
            reward_model=self.reward_model,
            descriptors=self._descriptor_source(spec.descriptors or descriptor_sources.NONE),
            exclude=self._queried_rows(pool, rewards, spec),
        )
        self.m_planning_seconds.labels(reward_model=plan.method).observe(plan.seconds)
        if spec.descriptors == descriptor_sources.LLM and any(d.source != descriptor_sources.LLM for d in plan.descriptors):
            self.m_descriptor_fallbacks.inc()
        distribution_key = f"{STATE_PREFIX}/{exploration_id}/iterations/{iteration}/distribution.npz"
        latest = distributions.from_plan(iteration, pool, plan)
        with self.explorations.lock:
            if record.state in TERMINAL or record.pending_iteration != iteration or record.state == common_pb2.EXPLORATION_STATE_PAUSED:
                return 0  # cancelled or paused while planning: the plan is dropped, nothing was published
            it = IterationState(
                iteration=iteration,
                scored_with=record.serving_model,
                published=False,
                reward_model=plan.method,
                observations_used=plan.observations_used,
                planning_seconds=round(plan.seconds, 4),
                distribution_key=distribution_key,
            )
            for index, (row, descriptor) in enumerate(zip(plan.picks, plan.descriptors)):
                # Deterministic ids: a republished plan carries the same ids, which downstream dedups.
                query_id = f"{record.exploration_id}-i{iteration}-q{index}"
                it.queries[query_id] = QueryState(
                    query_id=query_id,
                    concept=pool.keys[row],
                    descriptor=descriptor.text,
                    text=descriptor_sources.query_text(descriptor.text, pool.names[row]),
                    descriptor_source=descriptor.source,
                    is_label=bool(pool.is_label[row]),
                )
            record.iterations[iteration] = it
            record.current_iteration = iteration
            record.pending_iteration = 0
            record.state = common_pb2.EXPLORATION_STATE_RUNNING
            record.detail = ""
            record.vocabulary_digest = pool.digest
            record.vocabulary_size = len(pool)
            self.explorations.mark(record)
            self._latest[exploration_id] = latest
        # The plan is durable before anything is published: a crash from here on republishes it as is.
        self.explorations.persist_dirty()
        try:
            self.store.put_bytes(self.settings.s3_bucket, distribution_key, distributions.encode(latest, self.settings.planner_distribution_rows))
        except DependencyUnavailable as exc:  # TopConcepts falls back to memory; analysis loses one iteration
            log.warning("could not store the distribution", extra={"key": distribution_key, "error": str(exc)[:200]})
        with self.explorations.lock:
            publish = record.state not in TERMINAL and not it.published
        if publish:
            self._publish_plan(record, it)
        self._update_state_gauge()
        log.info(
            "iteration planned",
            extra={
                "exploration": exploration_id,
                "iteration": iteration,
                "queries": len(plan.picks),
                "reward_model": plan.method,
                "observations": plan.observations_used,
                "seconds": round(plan.seconds, 3),
            },
        )
        return 0

    def _publish_plan(self, record: ExplorationRecord, it: IterationState) -> None:
        """Publishes a persisted plan's queries, waits for the broker, then starts the iteration's clock.

        Sending happens under the records' lock (it is quick); the wait for the broker does not.
        A failure leaves the plan unpublished, and the next sweep sends it again with the same ids.
        """
        with self.explorations.lock:
            if it.published or record.state in TERMINAL:
                return
            spec = self._spec(record)
            self._send_queries(record, it, spec)
        self.publisher.flush()
        with self.explorations.lock:
            self._mark_published(record, it, spec)
        # Durable at once: until "published" is in S3 a restart would send the same queries again
        # (harmless downstream, the ids are the same, but the topic would carry them twice).
        try:
            self.explorations.persist_dirty()
        except DependencyUnavailable as exc:  # the consumer's next commit persists it
            log.warning("could not persist the published plan yet", extra={"exploration": record.exploration_id, "error": str(exc)[:200]})

    def _send_queries(self, record: ExplorationRecord, it: IterationState, spec: planner_pb2.ExplorationSpec) -> None:
        for query in it.queries.values():
            self.publisher.publish(
                topics.QUERIES,
                events_pb2.QueryIssued(
                    query_id=query.query_id,
                    exploration_id=record.exploration_id,
                    iteration=it.iteration,
                    concept=query.concept,
                    descriptor=query.descriptor,
                    text=query.text,
                    num_results=spec.images_per_query,
                    search_backend=spec.search_backend,
                    issued_at=now_timestamp(),
                ),
                # By query, not exploration: queries need no order, and one exploration's queries
                # then spread over every crawler replica.
                key=query.query_id,
            )

    def _mark_published(self, record: ExplorationRecord, it: IterationState, spec: planner_pb2.ExplorationSpec) -> None:
        if it.published:
            return
        now = time.time()
        it.published = True
        it.started_at = now
        it.deadline = now + spec.iteration_deadline_seconds
        if spec.max_wall_seconds:
            it.deadline = min(it.deadline, record.created_at + spec.max_wall_seconds)
        for query in it.queries.values():
            record.times_queried[query.concept] = record.times_queried.get(query.concept, 0) + 1
        self.m_queries.inc(len(it.queries))
        self.explorations.mark(record)
        log.info("iteration started", extra={"exploration": record.exploration_id, "iteration": it.iteration, "queries": len(it.queries)})

    # ---- the loop ------------------------------------------------------------------------------
    def _record(self, exploration_id: str) -> ExplorationRecord | None:
        record = self.explorations.records.get(exploration_id)
        if record is None or record.state in TERMINAL:
            return None
        return record

    def _request_iteration(self, record: ExplorationRecord, iteration: int) -> None:
        """Asks the planning thread for `iteration` (caller holds the lock; persisted with the record)."""
        record.pending_iteration = iteration
        self.explorations.mark(record)
        self._wake(record.exploration_id)

    def _budget_reason(self, record: ExplorationRecord, spec: planner_pb2.ExplorationSpec, extra_iteration: int = 0) -> str:
        """The budget that is used up ('' when none): iterations, images or wall time."""
        if record.iterations_finished + extra_iteration >= spec.iterations:
            return "iterations"
        if spec.max_images and sum(it.counts()["images_fetched"] for it in record.iterations.values()) >= spec.max_images:
            return "images"
        if spec.max_wall_seconds and time.time() >= record.created_at + spec.max_wall_seconds:
            return "wall_time"
        return ""

    def _stop_for_budget(self, record: ExplorationRecord, reason: str) -> None:
        """Ends an exploration whose budget ran out between iterations (caller holds the lock)."""
        record.state = common_pb2.EXPLORATION_STATE_SUCCEEDED
        record.stop_reason = reason
        record.pending_iteration = 0
        record.detail = ""
        self.explorations.mark(record)
        self._pools.pop(record.exploration_id, None)
        log.info("exploration succeeded", extra={"exploration": record.exploration_id, "stop_reason": reason})

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
        if it.complete and it.published and record.state in (common_pb2.EXPLORATION_STATE_RUNNING, common_pb2.EXPLORATION_STATE_PAUSED):
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
        it.collected_at = time.time()
        self.m_iteration_seconds.observe(time.time() - it.started_at)

        # Candidates: the objects this iteration's images map to that are new to this exploration
        # (stored by it, or stored earlier by another exploration: dedup is shared, training sets
        # are not); replay: the best share of them.
        used = set(record.candidate_digests)
        best: dict[str, float] = {}
        for query in it.queries.values():
            for did, key in query.accepted_objects.items():
                if did in query.rewards and candidate_digest(key) not in used:
                    best[key] = max(best.get(key, -2.0), query.rewards[did])
        record.candidate_digests.extend(sorted(candidate_digest(key) for key in best))
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
            # The trainer's evaluation reads the train split's labels (<target_uri>/train_labels.json) there.
            "target_uri": spec.target_uri,
            "target_train": target_train,
            "target_eval": target_eval,
            "concept_rewards": [
                {"query_id": q.query_id, "concept": q.concept, "text": q.text, "reward": q.concept_reward, "complete": q.complete}
                for q in it.queries.values()
            ],
        }
        it.manifest_key = f"{STATE_PREFIX}/{record.exploration_id}/iterations/{it.iteration}/manifest.json"
        self.store.put_json(self.settings.s3_bucket, it.manifest_key, manifest)
        last = bool(self._budget_reason(record, spec, extra_iteration=1))
        self.publisher.publish(
            topics.ITERATIONS,
            events_pb2.IterationFinished(
                exploration_id=record.exploration_id,
                iteration=it.iteration,
                manifest_key=it.manifest_key,
                candidates=len(best),
                replay_selected=len(replay),
                mean_concept_reward=float(np.mean(rewards)) if rewards else 0.0,
                last=last,
                finished_at=now_timestamp(),
            ),
            key=record.exploration_id,
        )
        for query in it.queries.values():
            query.freeze()
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
        reason = self._budget_reason(record, spec)
        if reason:
            self._stop_for_budget(record, reason)
            self._update_state_gauge()
            return
        if record.state == common_pb2.EXPLORATION_STATE_PAUSED:
            self.explorations.mark(record)
            return
        self._request_iteration(record, record.current_iteration + 1)

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
                if record.state == common_pb2.EXPLORATION_STATE_PENDING and not record.pending_iteration:
                    self._request_iteration(record, 1)
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
                record.pending_iteration = 0
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
                if not it.trained_at:  # a republished version keeps its first publication time
                    it.trained_at = time.time()
                self.explorations.mark(record)

    def on_evaluation(self, event: events_pb2.EvaluationFinished, ctx: EventContext) -> None:
        with self.explorations.lock:
            record = self.explorations.records.get(event.exploration_id)
            if record is None:
                return
            if event.iteration == 0:
                # The initial encoder, before any web image: kept so reports can compare before/after.
                record.initial_evaluation = evaluation_dict(event)
                self.explorations.mark(record)
                return
            it = record.iterations.get(event.iteration)
            if it is not None:
                it.knn_top1 = float(event.knn_top1)
                it.linear_probe_top1 = float(event.linear_probe_top1)
                it.eval_images = int(event.eval_images)
                it.evaluation = evaluation_dict(event)
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
                    linear_probe_top1=it.linear_probe_top1 or 0.0,
                    eval_images=it.eval_images,
                    evaluation=_evaluation(it.evaluation),
                    started_at=_ts(it.started_at),
                    finished_at=_ts(it.finished_at),
                    collected_at=_ts(it.collected_at),
                    trained_at=_ts(it.trained_at),
                    reward_model=it.reward_model,
                    planning_seconds=it.planning_seconds,
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
            stop_reason=record.stop_reason,
            detail=record.detail or self._waiting_detail(record),
            vocabulary_digest=record.vocabulary_digest,
            vocabulary_size=record.vocabulary_size,
            initial_evaluation=_evaluation(record.initial_evaluation),
        )

    @staticmethod
    def _waiting_detail(record: ExplorationRecord) -> str:
        if record.state == common_pb2.EXPLORATION_STATE_PENDING and record.serving_model is None:
            return "waiting for the initial encoder to be served"
        if record.pending_iteration and record.state == common_pb2.EXPLORATION_STATE_RUNNING:
            return f"planning iteration {record.pending_iteration}"
        return ""

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
        if spec.mode in (common_pb2.EXPLORATION_MODE_IE, common_pb2.EXPLORATION_MODE_LABELS):
            # Start loading (or building) the embeddings while the trainer prepares the initial encoder.
            threading.Thread(target=self._warm_vocabulary, args=(spec,), name="vocabulary-warm", daemon=True).start()
        self._update_state_gauge()
        log.info("exploration created", extra={"exploration": exploration_id, "mode": common_pb2.ExplorationMode.Name(spec.mode)})
        return planner_pb2.CreateExplorationResponse(exploration=self._to_proto(record))

    def _warm_vocabulary(self, spec: planner_pb2.ExplorationSpec) -> None:
        try:
            self.embeddings.request(self._vocabulary_of(spec.vocabulary or CUSTOM, spec.concepts))
        except Exception:  # noqa: BLE001 - the planning thread asks again and reports the failure
            log.exception("could not start loading the vocabulary")

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
            if start < 0:
                raise ValueError
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
            if new_state in TERMINAL:
                record.pending_iteration = 0
                record.detail = ""
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
        if record.pending_iteration:
            if record.current_iteration == 0:
                record.state = common_pb2.EXPLORATION_STATE_PENDING  # the first queries are not out yet
            self._wake(record.exploration_id)
        elif record.current_iteration == 0:
            record.state = common_pb2.EXPLORATION_STATE_PENDING
            if record.serving_model is not None:
                self._request_iteration(record, 1)
        elif it is not None and it.phase == common_pb2.ITERATION_PHASE_FINISHED:
            self._advance(record)
        elif it is not None and it.phase == common_pb2.ITERATION_PHASE_COLLECTING and it.complete and it.published:
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
            observed = {c: float(np.mean(v)) for c, v in record.observations.items() if v}
            times = dict(record.times_queried)
            latest = self._latest.get(record.exploration_id)
            it = record.current()
            key = it.distribution_key if it is not None else ""
        if (latest is None or (it is not None and latest.iteration != it.iteration)) and key:
            try:
                data = self.store.get_or_none(self.settings.s3_bucket, key)
                latest = distributions.decode(data) if data is not None else None
            except DependencyUnavailable as exc:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"could not read the stored distribution: {exc}")
            if latest is not None:
                with self.explorations.lock:
                    self._latest.setdefault(record.exploration_id, latest)
        limit = request.limit or 20
        if latest is None:
            # Nothing planned yet: the prior, i.e. what was observed (if anything) and no ranking.
            rows = [
                planner_pb2.ConceptScore(concept=c, name=c, observed_reward=r, times_queried=times.get(c, 0))
                for c, r in sorted(observed.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
            ]
            return planner_pb2.TopConceptsResponse(concepts=rows, iteration=0, observations=0, reward_model="prior")
        order = latest.ranked(limit)
        rows = []
        for i in order:
            concept = latest.keys[i]
            rows.append(
                planner_pb2.ConceptScore(
                    concept=concept,
                    predicted_reward=float(latest.mean[i]),
                    uncertainty=float(latest.std[i]),
                    observed_reward=observed.get(concept),  # unset while never observed
                    times_queried=times.get(concept, 0),
                    sampling_probability=float(latest.probabilities[i]),
                    name=latest.names[i],
                    embedded_text=latest.texts[i],
                    is_label=bool(latest.is_label[i]),
                )
            )
        return planner_pb2.TopConceptsResponse(
            concepts=rows, iteration=latest.iteration, observations=latest.observations, reward_model=latest.method, vocabulary_size=latest.size
        )

    def QueryHistory(self, request, context) -> planner_pb2.QueryHistoryResponse:
        if request.iteration < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "iteration: must be >= 0")
        if request.page_size < 0 or request.page_size > 10_000:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_size: must be between 0 and 10000")
        try:
            start = int(request.page_token or 0)
            if start < 0:
                raise ValueError
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_token: not a token returned by QueryHistory")
        size = request.page_size or 100
        with self.explorations.lock:
            record = self._get(request.exploration_id, context)
            if request.iteration and request.iteration not in record.iterations:
                context.abort(grpc.StatusCode.NOT_FOUND, f"iteration: exploration has no iteration {request.iteration}")
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
                            descriptor_source=query.descriptor_source,
                            is_label=query.is_label,
                        )
                    )
        page = rows[start : start + size]
        token = str(start + size) if start + size < len(rows) else ""
        return planner_pb2.QueryHistoryResponse(queries=page, next_page_token=token)
