"""The scorer's Prometheus instruments, in one place (names become iex_scorer_<thing>_<unit>).

Labels stay bounded: exploration ids never become labels (they grow without limit); per-exploration
state is visible through GetServingModel instead.
"""

from __future__ import annotations

from services.common.metrics import Metrics

# Cosine similarities live in [-1, 1]; 0.1-wide buckets show how the distribution shifts.
REWARD_BUCKETS = tuple(round(-1.0 + 0.1 * i, 1) for i in range(21))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Loading a version and embedding a target bank take seconds to minutes.
SLOW_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# Bounded label values.
PURPOSE_SCORE = "score"
PURPOSE_BANK = "bank"
SOURCE_EVENT = "event"
SOURCE_API = "api"


class ScorerMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.inference_seconds = metrics.histogram(
            "inference_duration_seconds", "Latency of one Triton embedding request", ["purpose"]
        )
        self.batch_images = metrics.histogram(
            "inference_batch_images", "Images per Triton embedding request", ["purpose"], buckets=BATCH_BUCKETS
        )
        self.images_scored = metrics.counter("images_scored_total", "Images given a reward", ["source"])
        self.reward = metrics.histogram(
            "image_reward", "Image rewards (mean cosine similarity to the k nearest target images)", buckets=REWARD_BUCKETS
        )
        self.decisions_ignored = metrics.counter("decisions_ignored_total", "Dedup decisions not scored, by kind", ["kind"])
        self.cache_lookups = metrics.counter("embedding_cache_lookups_total", "Embedding cache lookups", ["result"])
        self.loaded_version = metrics.gauge("model_loaded_version", "Version of the model most recently switched to")
        self.explorations_serving = metrics.gauge("explorations_serving", "Explorations with a model and target bank in memory")
        self.model_loads = metrics.counter("model_loads_total", "Model versions switched to (target bank built)")
        self.load_failures = metrics.counter("model_load_failures_total", "Model versions that could not be served", ["reason"])
        self.load_seconds = metrics.histogram(
            "model_switch_duration_seconds", "Time from ModelPublished to the switch (load + target bank)", buckets=SLOW_BUCKETS
        )
        self.bank_images = metrics.gauge("target_bank_images", "Images in the most recently built target bank")
        self.target_images_skipped = metrics.counter(
            "target_images_skipped_total", "Target train objects left out of a bank", ["reason"]
        )
        self.models_parked = metrics.counter(
            "models_parked_total", "ModelPublished events parked until their exploration is known"
        )
        # The alert signal: > 0 while some exploration's newest published version could not be
        # served (the previous one keeps serving). Back to 0 once a version at least as new serves.
        self.load_failing = metrics.gauge(
            "model_load_failing", "Explorations whose newest published model version could not be served"
        )
        self.versions_discarded = metrics.counter(
            "model_versions_discarded_total", "Versions Triton refused to load, removed from the model repository"
        )
        self.banks_reused = metrics.counter(
            "target_banks_reused_total", "Target banks read back from S3 instead of being embedded again"
        )
        self.decision_batch = metrics.histogram(
            "decision_batch_decisions", "Decisions scored together (one polled batch of events)", buckets=BATCH_BUCKETS
        )
        self.embeddings_stored = metrics.counter(
            "embeddings_stored_total", "Image embeddings written to S3 shards (per model version)"
        )
        self.decisions_dead_lettered = metrics.counter(
            "decisions_dead_lettered_total", "Decisions that could not be scored, sent to the dead-letter topic", ["reason"]
        )
        self.concept_rewards_published = metrics.counter(
            "concept_rewards_published_total", "ConceptRewardUpdated events published"
        )
        self.decisions_parked = metrics.counter(
            "decisions_parked_total", "Decisions parked in S3 because no model served their exploration yet"
        )
        self.parked_decisions_scored = metrics.counter(
            "parked_decisions_scored_total", "Parked decisions taken back and scored once a model served their exploration"
        )
        # Objects of parked decisions (one per committed batch) waiting in S3 for a model, as of
        # this replica's last sweep.
        self.parked_batches = metrics.gauge("parked_decision_batches", "Objects of parked decisions awaiting a model (last sweep)")
