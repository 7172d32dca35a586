"""The dedup service: decides every fetched image, stores new ones, publishes decisions.

Consumes  iex.crawler.images-fetched.v1 (ImageFetched)        -> one ImageDecision each
          iex.planner.explorations.v1   (ExplorationCreated)  -> which target to decontaminate against
Publishes iex.dedup.decisions.v1     (ImageDecision, key exploration id) for every fetched image
          iex.dedup.images-stored.v1 (ImageStored, key pixel sha256) for UNIQUE decisions only

Idempotence: see services.dedup.store. A redelivered image re-publishes its recorded decision (and
ImageStored) unchanged, so an event lost between the record and the commit is published again.

Near-duplicates are looked up in the index of every stored image, shared by the replicas through S3
(services.dedup.sharedindex): loaded before consuming starts, flushed and refreshed between batches.

The fetched images of one poll are decided by `IEX_DEDUP_DECISION_THREADS` threads at once (the
consumer loop's `concurrency`): reading the decision record and the staged bytes, decoding, hashing
and writing provenance and records overlap; the claim of a new object is taken in turns
(services.dedup.store), so a batch decides exactly as one image after the other would.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time

import grpc

from iex.v1 import dedup_pb2_grpc, events_pb2
from services.common import topics
from services.common.errors import DependencyUnavailable, PermanentError
from services.common.kafka import EventContext
from services.common.service import Service
from services.dedup.api import SERVICE_NAME, DedupApi
from services.dedup.explorations import ExplorationDirectory, PlannerExplorationLookup, PlannerLookup, valid_id
from services.dedup.reindex import rebuild
from services.dedup.settings import DedupSettings
from services.dedup.sharedindex import IndexTimings, SharedNearIndex
from services.dedup.stats import DedupStats
from services.dedup.store import NEAR_DUPLICATE, Deduplicator, DedupOutcome, DedupPolicy, kind_label
from services.dedup.targets import TargetGuard

log = logging.getLogger(__name__)

PIPELINE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
DISTANCE_BUCKETS = (0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 24, 28, 32, 48, 64)


class DedupService(Service):
    name = "dedup"
    settings_class = DedupSettings
    # The first image of a new target waits while its evaluation split is hashed (once, then cached in S3).
    max_poll_interval_ms = 600_000

    def __init__(self, settings: DedupSettings, store=None, planner_lookup: PlannerLookup | None = None) -> None:
        super().__init__(settings)
        if store is not None:
            self.store = store
        bucket = settings.s3_bucket
        if planner_lookup is None and settings.planner_address:
            planner_lookup = PlannerExplorationLookup(settings.planner_address, client=settings)
        self.planner_lookup = planner_lookup
        self.directory = ExplorationDirectory(self.store, bucket, planner_lookup)

        m = self.metrics
        self.decisions_total = m.counter("decisions_total", "Images decided, by decision kind (replays not counted)", ["kind"])
        self.replayed_total = m.counter("replayed_decisions_total", "Redelivered images answered from their decision record")
        self.objects_stored_total = m.counter("objects_stored_total", "New image objects written")
        self.stored_bytes_total = m.counter("stored_bytes_total", "Bytes of new image objects written")
        self.decision_seconds = m.histogram("decision_duration_seconds", "Time to decide one image, S3 round trips included", ["kind"])
        self.fetch_to_decision_seconds = m.histogram(
            "fetch_to_decision_seconds", "Time from the crawler's fetch to the decision", buckets=PIPELINE_BUCKETS
        )
        self.target_loads_total = m.counter("target_hash_loads_total", "Target evaluation hashes (re)loaded, by where from", ["source"])
        self.explorations_total = m.counter("explorations_learned_total", "Exploration -> target associations recorded")
        self.near_distance = m.histogram(
            "near_duplicate_distance", "pHash + dHash distance of near-duplicate decisions to the image they duplicate", buckets=DISTANCE_BUCKETS
        )
        self.index_errors_total = m.counter("near_index_maintenance_errors_total", "Failed flushes, refreshes or merges of the shared index")

        replica = settings.replica_id or socket.gethostname()
        # One writer name per process: a restarted replica's leftovers are another writer's, adopted like any orphan.
        self.near = SharedNearIndex(
            self.store,
            bucket,
            writer=f"{replica}-{secrets.token_hex(3)}",
            max_distance=settings.near_duplicate_max_distance,
            timings=IndexTimings(
                refresh_s=settings.near_index_refresh_s,
                flush_s=settings.near_index_flush_s,
                wal_grace_s=settings.near_index_wal_grace_s,
                orphan_after_s=settings.near_index_orphan_after_s,
                max_segments=settings.near_index_max_segments,
            ),
            metrics=m,
        )
        self._rebuild_thread: threading.Thread | None = None

        self.guard = TargetGuard(
            self.store,
            bucket,
            self.directory.target_uri,
            max_pixels=settings.max_image_pixels,
            refresh_s=settings.target_refresh_s,
            workers=settings.target_hash_workers,
            on_load=lambda source: self.target_loads_total.labels(source=source).inc(),
        )
        policy = DedupPolicy(
            max_image_bytes=settings.max_image_bytes,
            max_image_pixels=settings.max_image_pixels,
            min_image_side=settings.min_image_side,
            contamination_max_distance=settings.contamination_max_distance,
            inline_max_bytes=min(settings.dedup_inline_max_bytes, settings.kafka_max_message_bytes // 2),
        )
        self.deduplicator = Deduplicator(self.store, bucket, self.guard, policy, near=self.near)
        self.stats = DedupStats(self.store, bucket, replica, settings.stats_persist_interval_s)

    # ---- hooks -------------------------------------------------------------------------------
    def register(self, server: grpc.Server) -> list[str]:
        dedup_pb2_grpc.add_DedupServiceServicer_to_server(DedupApi(self.store, self.settings.s3_bucket, self.stats), server)
        return [SERVICE_NAME]

    def handlers(self):
        return {
            topics.IMAGES_FETCHED.name: self.handle_image_fetched,
            topics.EXPLORATIONS.name: self.handle_exploration_created,
        }

    def on_start(self) -> None:
        super().on_start()
        self.stats.load()
        self.load_near_index()

    def load_near_index(self) -> None:
        """Loads the shared index before the first decision; an index never built is rebuilt in the background."""
        started = time.monotonic()
        initialised = self.near.load()
        log.info("near-duplicate index loaded", extra={"entries": len(self.near), "seconds": round(time.monotonic() - started, 2)})
        if not initialised and self._rebuild_thread is None:
            # Objects stored before this index (version) existed: decisions go on meanwhile, with
            # near-duplicates of not yet reindexed images missed, not wrongly found.
            self._rebuild_thread = threading.Thread(target=self._rebuild_index, name="near-index-rebuild", daemon=True)
            self._rebuild_thread.start()

    def _rebuild_index(self) -> None:
        try:
            added = rebuild(self.near, workers=self.settings.target_hash_workers)
            log.info("near-duplicate index rebuilt from the stored objects", extra={"entries_added": added, "entries": len(self.near)})
        except Exception as exc:  # noqa: BLE001 - retried by the next start; decisions go on without it
            self.index_errors_total.inc()
            log.warning("near-duplicate index rebuild failed", extra={"error": str(exc)[:300]})

    def maintain_near_index(self) -> None:
        """Between batches: our new entries out (flush), the others' in (refresh), orphans adopted, segments merged."""
        try:
            self.near.flush()
            if self.near.refresh():
                orphans = self.near.orphans()
                if orphans:
                    adopted = self.near.adopt(orphans, self.deduplicator.complete_intent)
                    log.info("orphaned index intents adopted", extra={"intents": len(orphans), "adopted": adopted})
                self.near.compact()
        except Exception as exc:  # noqa: BLE001 - entries stay durable as intents; retried after the next batch
            self.index_errors_total.inc()
            log.warning("near-duplicate index maintenance failed", extra={"error": str(exc)[:300]})

    def concurrent_topics(self) -> dict[str, int]:
        return {topics.IMAGES_FETCHED.name: self.settings.dedup_decision_threads}

    def after_batch(self) -> None:
        try:
            self.stats.persist()
        except Exception as exc:  # noqa: BLE001 - counts are written again later; never stop consuming for them
            log.warning("could not write decision counts", extra={"error": str(exc)[:300]})
        self.maintain_near_index()

    def on_stop(self) -> None:
        try:
            self.stats.persist(force=True)
        except Exception as exc:  # noqa: BLE001 - shutting down: report and go
            log.warning("could not write decision counts", extra={"error": str(exc)[:300]})
        try:
            self.near.flush(force=True)
        except Exception as exc:  # noqa: BLE001 - the entries stay durable as intents, adopted by another replica
            log.warning("could not flush the near-duplicate index", extra={"error": str(exc)[:300]})
        close = getattr(self.planner_lookup, "close", None)
        if close is not None:
            close()

    # ---- handlers ----------------------------------------------------------------------------
    def handle_image_fetched(self, fetched: events_pb2.ImageFetched, ctx: EventContext | None = None) -> DedupOutcome:
        started = time.perf_counter()
        outcome = self.deduplicator.decide_and_store(fetched)
        self._publish(outcome)
        if outcome.replayed:
            self.replayed_total.inc()
            return outcome
        kind = kind_label(outcome.decision.kind)
        self.decisions_total.labels(kind=kind).inc()
        if outcome.decision.kind == NEAR_DUPLICATE:
            self.near_distance.observe(outcome.decision.hamming_distance)
        self.decision_seconds.labels(kind=kind).observe(time.perf_counter() - started)
        if fetched.HasField("fetched_at"):
            age = outcome.decision.decided_at.ToNanoseconds() - fetched.fetched_at.ToNanoseconds()
            self.fetch_to_decision_seconds.observe(max(0.0, age / 1e9))
        if outcome.bytes_written:
            self.objects_stored_total.inc()
            self.stored_bytes_total.inc(outcome.bytes_written)
        self.stats.record(outcome)
        return outcome

    def _publish(self, outcome: DedupOutcome) -> None:
        if self.publisher is None:
            raise DependencyUnavailable("publisher not started")
        decision = outcome.decision
        self.publisher.publish(topics.DECISIONS, decision, key=decision.exploration_id)
        if outcome.stored is not None:
            self.publisher.publish(topics.IMAGES_STORED, outcome.stored, key=outcome.stored.pixel_sha256)

    def handle_exploration_created(self, created: events_pb2.ExplorationCreated, ctx: EventContext | None = None) -> None:
        if not valid_id(created.exploration_id):
            raise PermanentError("invalid_event", f"exploration_id {created.exploration_id[:80]!r}")
        self.directory.remember(created.exploration_id, created.target_uri)
        self.explorations_total.inc()
        # Hash the evaluation split now, so the exploration's first image does not wait for it.
        try:
            hashes = self.guard.for_target(created.target_uri)
        except PermanentError as exc:
            # Its images will be dead-lettered with the same reason; the event itself is fine.
            log.warning("target evaluation images unreadable", extra={"exploration_id": created.exploration_id, "reason": exc.reason})
            return
        log.info(
            "exploration registered",
            extra={"exploration_id": created.exploration_id, "target_uri": created.target_uri, "eval_images": len(hashes)},
        )
