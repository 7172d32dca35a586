"""The scorer's state and work, independent of Kafka and gRPC.

Per exploration it holds the serving model version and the target bank (the target's train images
embedded with that version), switches both at once when a new version is served, restores them
from S3 after a restart, and embeds images through Triton with a bounded number of requests in
flight. The encoder itself only ever runs in Triton.

Threads: the consumer thread switches versions and scores events while gRPC threads score API
requests. Serving state is immutable and replaced under a lock, so a request sees either the old
version with its bank or the new version with its bank, never a mix. Loads and bank builds for
one exploration are serialised by a per-exploration lock. Image reads and decodes run on a small
I/O pool (Pillow and the S3 client release the GIL), and the next window of target images is
decoded while the current one is in Triton; the encoder client bounds the Triton requests in
flight for the whole replica.

Target banks are kept in S3 per model version (services.scorer.embeddings), so a restarted
replica, or a redelivered ModelPublished, reads the bank back instead of embedding it again.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from iex.v1 import common_pb2
from services.common.errors import DependencyUnavailable
from services.common.modelrepo import InferenceError, ModelLoadError, ServerUnavailableError, discard_version
from services.common.objectstore import parse_s3_uri
from services.scorer import records
from services.scorer.cache import EmbeddingCache
from services.scorer.embeddings import EmbeddingStore, bank_digest
from services.scorer.metrics import PURPOSE_BANK, PURPOSE_SCORE, ScorerMetrics
from services.scorer.preprocess import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from services.scorer.records import ExplorationTarget, ServingRecord
from services.scorer.rewards import knn_rewards, l2_normalise

log = logging.getLogger(__name__)

# Objects under train/ that are certainly not images (Tux Paint stamps ship captions beside the
# photos); skipping them saves a read and a failed decode each.
_NON_IMAGE_SUFFIXES = (".txt", ".json", ".csv", ".md", ".xml", ".yaml", ".yml", ".html")


@dataclass(frozen=True)
class EngineConfig:
    bucket: str
    reward_k: int = 15
    batch_size: int = 32
    max_inflight_batches: int = 4
    target_bank_max_images: int = 5000
    embedding_cache_entries: int = 8192
    default_image_size: int = 224
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    model_ready_timeout_s: float = 60.0
    max_serving_explorations: int = 64
    io_threads: int = 8
    # Keep target banks in S3 per model version (read back on restore instead of re-embedding).
    persist_banks: bool = True
    # Local model repository shared with the trainer (empty: not reachable from here).
    model_repository: str = ""
    # Remove a version Triton refused to load from model_repository: with the latest-N version
    # policy it would otherwise be retried, and fail, on every later load of the model.
    discard_failed_versions: bool = True


@dataclass(frozen=True, eq=False)
class ServingModel:
    """One exploration's model version and the target bank embedded with it (read-only)."""

    exploration_id: str
    model_name: str
    version: int
    image_size: int
    bank: np.ndarray
    serving_since: float

    @property
    def bank_size(self) -> int:
        return int(self.bank.shape[0])

    @property
    def cache_scope(self) -> tuple[str, int, int]:
        return (self.model_name, self.version, self.image_size)

    def ref(self) -> common_pb2.ModelRef:
        return common_pb2.ModelRef(name=self.model_name, version=self.version)

    def record(self) -> ServingRecord:
        return ServingRecord(self.model_name, self.version, self.image_size, self.bank_size, self.serving_since)


class ServeStatus(enum.Enum):
    SERVING = "serving"  # switched to the version just now
    ALREADY_SERVING = "already_serving"  # redelivery: the version was already serving
    STALE = "stale"  # older than the version already announced: nothing to do
    FAILED = "failed"  # could not serve it; the previous version (if any) keeps serving


@dataclass(frozen=True)
class ServeOutcome:
    status: ServeStatus
    serving: ServingModel | None = None
    # What keeps serving after a failure (from memory or from the persisted record).
    still_serving: tuple[str, int] | None = None
    failure_kind: str = ""
    reason: str = ""


class ItemFailed(Exception):
    """One item of a batch cannot be scored; `kind` is a bounded token (metric label, DLQ reason)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


class ScoringEngine:
    def __init__(
        self,
        encoder: Any,
        store: Any,
        config: EngineConfig,
        metrics: ScorerMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.encoder = encoder
        self.store = store
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.cache = EmbeddingCache(config.embedding_cache_entries)
        self.embeddings = EmbeddingStore(store, config.bucket)
        self._lock = threading.Lock()
        self._explorations: dict[str, ExplorationTarget] = {}
        # LRU of serving states: finished explorations age out and are restored from S3 on demand.
        self._serving: OrderedDict[str, ServingModel] = OrderedDict()
        self._exploration_locks: dict[str, threading.Lock] = {}
        self._model_locks: dict[str, threading.Lock] = {}
        # Exploration -> the newest version that could not be served (cleared once one as new serves).
        self._failing: dict[str, int] = {}
        self._io = ThreadPoolExecutor(max_workers=max(1, config.io_threads), thread_name_prefix="scorer-io")
        # One window of target images decoded ahead while the previous one is in Triton.
        self._prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer-prefetch")

    def close(self) -> None:
        self._prefetch.shutdown(wait=False, cancel_futures=True)
        self._io.shutdown(wait=False, cancel_futures=True)

    def map_io(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """fn over items on the I/O pool, results in order; the first exception propagates."""
        if len(items) <= 1:
            return [fn(item) for item in items]
        return list(self._io.map(fn, items))

    # ---- explorations --------------------------------------------------------------------------
    def remember_exploration(self, target: ExplorationTarget) -> None:
        """Persists the exploration's target (idempotent: same id, same record)."""
        self.store.put_json(self.config.bucket, records.exploration_key(target.exploration_id), target.to_json())
        with self._lock:
            self._explorations[target.exploration_id] = target

    def exploration(self, exploration_id: str) -> ExplorationTarget | None:
        with self._lock:
            known = self._explorations.get(exploration_id)
        if known is not None:
            return known
        value = self.store.get_json(self.config.bucket, records.exploration_key(exploration_id))
        if value is None:
            return None
        target = ExplorationTarget.from_json(value)
        with self._lock:
            self._explorations[exploration_id] = target
        return target

    # ---- serving state -------------------------------------------------------------------------
    def serving_record(self, exploration_id: str) -> ServingRecord | None:
        value = self.store.get_json(self.config.bucket, records.serving_key(exploration_id))
        return None if value is None else ServingRecord.from_json(value)

    def current(self, exploration_id: str) -> ServingModel | None:
        """The serving state in memory, without touching S3 or Triton."""
        with self._lock:
            state = self._serving.get(exploration_id)
            if state is not None:
                self._serving.move_to_end(exploration_id)
            return state

    def serving(self, exploration_id: str) -> ServingModel | None:
        """The serving state, restored from `scorer/serving/<id>.json` when not in memory.

        Restoring loads the recorded version into Triton if it is not ready (Triton under explicit
        control forgets models when it restarts) and rebuilds the bank. When that version can no
        longer be loaded (pruned from the repository while this replica was away), the newest
        version Triton does serve for the model is used, so scoring does not stall; the published
        ImageScored events name the version used. Returns None when nothing was ever served.
        """
        state = self.current(exploration_id)
        if state is not None:
            return state
        with self._exploration_lock(exploration_id):
            state = self.current(exploration_id)
            if state is not None:
                return state
            record = self.serving_record(exploration_id)
            if record is None:
                return None
            target = self.exploration(exploration_id)
            if target is None:
                log.error("serving record without exploration record", extra={"exploration_id": exploration_id})
                return None
            self._require_server()
            name, version = record.model_name, record.version
            if not self.encoder.is_ready(name, version):
                version = self._load_for_restore(name, version)
            bank = self._build_bank_or_unavailable(target, name, version, record.image_size)
            if bank.shape[0] == 0:
                log.error("target bank is empty on restore", extra={"exploration_id": exploration_id, "target_uri": target.target_uri})
                return None
            state = ServingModel(exploration_id, name, version, record.image_size, bank, record.serving_since)
            self._install(state)
            log.info(
                "serving state restored",
                extra={"exploration_id": exploration_id, "model": name, "version": version, "bank": state.bank_size},
            )
            return state

    def serve(self, exploration_id: str, model_name: str, version: int, image_size: int) -> ServeOutcome:
        """Loads `version` into Triton, builds its target bank and switches to it.

        Never raises for a version that cannot be served (FAILED outcome; the previous version
        keeps serving); raises DependencyUnavailable when Triton or S3 cannot be reached, and
        LookupError when the exploration is not known.
        """
        target = self.exploration(exploration_id)
        if target is None:
            raise LookupError(f"exploration {exploration_id!r} is not known")
        image_size = image_size or target.image_size or self.config.default_image_size
        with self._exploration_lock(exploration_id):
            record = self.serving_record(exploration_id)
            current = self.current(exploration_id)
            wanted = (model_name, version)
            recorded = (record.model_name, record.version) if record is not None else None
            if current is not None and (current.model_name, current.version) == wanted and self.encoder.is_ready(model_name, version):
                if recorded != wanted:
                    self._persist(current)
                self._clear_failing(exploration_id, version)
                return ServeOutcome(ServeStatus.ALREADY_SERVING, serving=current)
            if record is not None and record.model_name == model_name and version < record.version:
                return ServeOutcome(
                    ServeStatus.STALE,
                    serving=current,
                    still_serving=(record.model_name, record.version),
                    reason=f"version {version} is older than the serving version {record.version}",
                )
            still_serving = (current.model_name, current.version) if current is not None else recorded
            self._require_server()
            started = time.perf_counter()
            try:
                self.encoder.load(model_name, version)
                self._wait_ready(model_name, version)
            except ModelLoadError as exc:
                self._require_server()  # a load that failed because Triton went away is retried
                reason = str(exc)
                if self._discard_unloadable(model_name, version, still_serving):
                    reason += "; the version was removed from the model repository"
                return self._failed(exploration_id, version, still_serving, "triton_load", reason)
            try:
                bank = self._build_bank(target, model_name, version, image_size)
            except ServerUnavailableError as exc:
                raise DependencyUnavailable(f"triton unavailable while embedding the target bank: {exc}") from exc
            except InferenceError as exc:
                self._require_server()
                reason = f"embedding the target bank with {model_name} v{version} failed: {exc}"
                return self._failed(exploration_id, version, still_serving, "inference", reason)
            if bank.shape[0] == 0:
                reason = f"no decodable image under {_train_prefix_uri(target.target_uri)}"
                return self._failed(exploration_id, version, still_serving, "empty_target", reason)
            since = record.serving_since if record is not None and recorded == wanted else self.clock()
            state = ServingModel(exploration_id, model_name, version, image_size, bank, since)
            # Durable before visible: the record must never be behind the announced ModelServing.
            self._persist(state)
            self._install(state)
            self._clear_failing(exploration_id, version)
            self.metrics.model_loads.inc()
            self.metrics.loaded_version.set(version)
            self.metrics.bank_images.set(state.bank_size)
            self.metrics.load_seconds.observe(time.perf_counter() - started)
            log.info(
                "model serving",
                extra={"exploration_id": exploration_id, "model": model_name, "version": version, "bank": state.bank_size},
            )
            return ServeOutcome(ServeStatus.SERVING, serving=state)

    # ---- embeddings and rewards ----------------------------------------------------------------
    def embed_items(
        self,
        serving: ServingModel,
        keys: Sequence[str],
        load_pixels: Callable[[int], np.ndarray],
    ) -> tuple[np.ndarray, dict[int, ItemFailed]]:
        """Embeddings of items identified by content keys, through the cache.

        `load_pixels(i)` produces item i's uint8 [S, S, 3] pixels on a cache miss, or raises
        ItemFailed. Returns (embeddings [N, D] with zero rows for failed items, failures by index).
        """
        scope = serving.cache_scope
        cache_keys: list[Hashable] = [(*scope, key) for key in keys]
        cached = self.cache.get_many(cache_keys)
        hits = sum(1 for value in cached if value is not None)
        self.metrics.cache_lookups.labels(result="hit").inc(hits)
        self.metrics.cache_lookups.labels(result="miss").inc(len(keys) - hits)
        failures: dict[int, ItemFailed] = {}
        missing: list[int] = []
        pixels: list[np.ndarray] = []

        def attempt(index: int) -> np.ndarray | ItemFailed:
            try:
                return load_pixels(index)
            except ItemFailed as exc:
                return exc

        to_load = [index for index, value in enumerate(cached) if value is None]
        for index, loaded in zip(to_load, self.map_io(attempt, to_load)):
            if isinstance(loaded, ItemFailed):
                failures[index] = loaded
            else:
                pixels.append(loaded)
                missing.append(index)
        fresh = None
        if pixels:
            fresh = self.embed_pixels(serving, np.stack(pixels))
            self.cache.put_many([cache_keys[i] for i in missing], fresh)
        dim = fresh.shape[1] if fresh is not None else next((v.shape[0] for v in cached if v is not None), serving.bank.shape[1])
        out = np.zeros((len(keys), dim), dtype=np.float32)
        for index, value in enumerate(cached):
            if value is not None:
                out[index] = value
        if fresh is not None:
            out[missing] = fresh
        return out, failures

    def embed_pixels(self, serving: ServingModel, pixels: np.ndarray) -> np.ndarray:
        """Embeds pixels with the serving version; reloads it once if Triton lost it (restart)."""
        return self._embed(serving.model_name, serving.version, pixels, PURPOSE_SCORE, reload_if_lost=True)

    def rewards(self, serving: ServingModel, embeddings: np.ndarray) -> np.ndarray:
        rewards = knn_rewards(embeddings, serving.bank, self.config.reward_k)
        for reward in rewards:
            self.metrics.reward.observe(float(reward))
        return rewards

    # ---- internals -----------------------------------------------------------------------------
    def _exploration_lock(self, exploration_id: str) -> threading.Lock:
        with self._lock:
            return self._exploration_locks.setdefault(exploration_id, threading.Lock())

    def _model_lock(self, model_name: str) -> threading.Lock:
        with self._lock:
            return self._model_locks.setdefault(model_name, threading.Lock())

    def _install(self, state: ServingModel) -> None:
        with self._lock:
            self._serving[state.exploration_id] = state
            self._serving.move_to_end(state.exploration_id)
            while len(self._serving) > self.config.max_serving_explorations:
                self._serving.popitem(last=False)
            self.metrics.explorations_serving.set(len(self._serving))

    def _persist(self, state: ServingModel) -> None:
        self.store.put_json(self.config.bucket, records.serving_key(state.exploration_id), state.record().to_json())

    def _failed(self, exploration_id: str, version: int, still_serving: tuple[str, int] | None, kind: str, reason: str) -> ServeOutcome:
        self.metrics.load_failures.labels(reason=kind).inc()
        with self._lock:
            self._failing[exploration_id] = max(version, self._failing.get(exploration_id, 0))
            self.metrics.load_failing.set(len(self._failing))
        log.warning(
            "model version not served",
            extra={"exploration_id": exploration_id, "version": version, "kind": kind, "reason": reason[:500], "still_serving": str(still_serving)},
        )
        return ServeOutcome(ServeStatus.FAILED, still_serving=still_serving, failure_kind=kind, reason=reason)

    def _clear_failing(self, exploration_id: str, serving_version: int) -> None:
        with self._lock:
            failed = self._failing.get(exploration_id)
            if failed is not None and serving_version >= failed:
                del self._failing[exploration_id]
            self.metrics.load_failing.set(len(self._failing))

    def failing_version(self, exploration_id: str) -> int | None:
        """The newest version of the exploration that could not be served, while none as new serves."""
        with self._lock:
            return self._failing.get(exploration_id)

    def _discard_unloadable(self, model_name: str, version: int, still_serving: tuple[str, int] | None) -> bool:
        """Removes a version Triton refused from the local repository; True when it was removed."""
        if not (self.config.discard_failed_versions and self.config.model_repository):
            return False
        if still_serving is not None and still_serving == (model_name, version):
            return False
        try:
            if version in self.encoder.ready_versions(model_name):
                return False  # never remove what Triton serves, whatever the load said
            removed = discard_version(self.config.model_repository, model_name, version)
        except (InferenceError, OSError) as exc:
            log.warning("could not discard a version that failed to load", extra={"model": model_name, "version": version, "error": str(exc)[:300]})
            return False
        if removed:
            self.metrics.versions_discarded.inc()
            log.warning("version that failed to load removed from the model repository", extra={"model": model_name, "version": version})
        return removed

    def _require_server(self) -> None:
        if not self.encoder.server_ready():
            raise DependencyUnavailable(f"triton at {getattr(self.encoder, 'url', '?')} is not ready")

    def _wait_ready(self, model_name: str, version: int) -> None:
        deadline = time.monotonic() + self.config.model_ready_timeout_s
        delay = 0.05
        while not self.encoder.is_ready(model_name, version):
            if time.monotonic() >= deadline:
                raise ModelLoadError(f"{model_name!r} version {version} not ready {self.config.model_ready_timeout_s:.0f}s after loading")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _load_for_restore(self, model_name: str, version: int) -> int:
        """Loads `version` for a restore; falls back to the newest ready version of the model."""
        with self._model_lock(model_name):
            try:
                self.encoder.load(model_name, version)
                self._wait_ready(model_name, version)
                return version
            except ModelLoadError as exc:
                self._require_server()
                try:
                    ready = list(self.encoder.ready_versions(model_name))
                except InferenceError as index_error:
                    raise DependencyUnavailable(f"cannot list ready versions of {model_name!r}: {index_error}") from index_error
                if not ready:
                    raise DependencyUnavailable(f"cannot serve {model_name!r} version {version} and no version is ready: {exc}") from exc
                fallback = max(ready)
                log.warning(
                    "recorded version cannot be loaded, scoring with the newest ready version",
                    extra={"model": model_name, "version": version, "fallback": fallback, "error": str(exc)[:300]},
                )
                return fallback

    def _build_bank_or_unavailable(self, target: ExplorationTarget, model_name: str, version: int, image_size: int) -> np.ndarray:
        try:
            return self._build_bank(target, model_name, version, image_size)
        except InferenceError as exc:
            raise DependencyUnavailable(f"cannot embed the target bank with {model_name} v{version}: {exc}") from exc

    def _target_keys(self, target: ExplorationTarget) -> tuple[str, list[str]]:
        bucket, prefix = parse_s3_uri(target.target_uri)
        train_prefix = f"{prefix}/train/" if prefix else "train/"
        keys = [key for key in self.store.list_keys(bucket, train_prefix) if not key.lower().endswith(_NON_IMAGE_SUFFIXES)]
        # A cap must not keep only the alphabetically first classes: order by a hash of the key,
        # which is deterministic (the same bank for every replica and every rebuild) and unbiased.
        keys.sort(key=lambda key: hashlib.sha256(key.encode()).digest())
        return bucket, keys[: self.config.target_bank_max_images]

    def _build_bank(self, target: ExplorationTarget, model_name: str, version: int, image_size: int) -> np.ndarray:
        """The target's train images embedded with (model_name, version): float32 [M, D], read-only.

        Read back from S3 when this very input (same objects, same size) was embedded with this
        version before; otherwise embedded window by window (the next window decoded while the
        current one is in Triton) and stored."""
        bucket, keys = self._target_keys(target)
        digest = bank_digest(target.target_uri, image_size, keys)
        if self.config.persist_banks and keys:
            stored = self.embeddings.get_bank(model_name, version, digest)
            if stored is not None and stored[1].shape[0] > 0 and set(stored[0]) <= set(keys):
                self.metrics.banks_reused.inc()
                return stored[1]
        window = self.config.batch_size * self.config.max_inflight_batches
        windows = [keys[start : start + window] for start in range(0, len(keys), window)]
        kept: list[str] = []
        chunks: list[np.ndarray] = []
        pending: Future | None = self._prefetch.submit(self._load_target_window, bucket, windows[0], image_size) if windows else None
        for index in range(len(windows)):
            assert pending is not None
            window_keys, pixels = pending.result()
            pending = self._prefetch.submit(self._load_target_window, bucket, windows[index + 1], image_size) if index + 1 < len(windows) else None
            if pixels:
                chunks.append(self._embed(model_name, version, np.stack(pixels), PURPOSE_BANK, reload_if_lost=False))
                kept.extend(window_keys)
        if not chunks:
            return np.zeros((0, 0), dtype=np.float32)
        bank = l2_normalise(np.concatenate(chunks, axis=0))
        bank.setflags(write=False)
        if self.config.persist_banks:
            self.embeddings.put_bank(model_name, version, digest, kept, bank)
        return bank

    def _load_target_window(self, bucket: str, keys: Sequence[str], image_size: int) -> tuple[list[str], list[np.ndarray]]:
        """Reads and decodes target images in parallel; skips (and counts) missing or broken ones."""

        def load(key: str) -> np.ndarray | None:
            data = self.store.get_or_none(bucket, key)
            if data is None:  # listed, then deleted
                self.metrics.target_images_skipped.labels(reason="missing").inc()
                return None
            try:
                return decode_image(data, image_size, max_pixels=self.config.max_image_pixels)
            except ImageDecodeError as exc:
                self.metrics.target_images_skipped.labels(reason="undecodable").inc()
                log.warning("target image skipped", extra={"key": key, "error": str(exc)[:200]})
                return None

        kept_keys: list[str] = []
        pixels: list[np.ndarray] = []
        for key, loaded in zip(keys, self.map_io(load, list(keys))):
            if loaded is not None:
                kept_keys.append(key)
                pixels.append(loaded)
        return kept_keys, pixels

    def _embed(self, model_name: str, version: int, pixels: np.ndarray, purpose: str, *, reload_if_lost: bool) -> np.ndarray:
        try:
            return self._embed_batches(model_name, version, pixels, purpose)
        except ServerUnavailableError as exc:
            raise DependencyUnavailable(f"triton unavailable: {exc}") from exc
        except InferenceError:
            self._require_server()
            if not reload_if_lost or self.encoder.is_ready(model_name, version):
                raise
        # Triton answers but no longer serves the version: under explicit model control a
        # restarted Triton starts empty. Load it again once, then retry.
        log.warning("serving version not loaded in triton, reloading", extra={"model": model_name, "version": version})
        with self._model_lock(model_name):
            if not self.encoder.is_ready(model_name, version):
                try:
                    self.encoder.load(model_name, version)
                    self._wait_ready(model_name, version)
                except ModelLoadError as exc:
                    self._require_server()
                    raise DependencyUnavailable(f"cannot reload {model_name!r} version {version}: {exc}") from exc
        try:
            return self._embed_batches(model_name, version, pixels, purpose)
        except ServerUnavailableError as exc:
            raise DependencyUnavailable(f"triton unavailable: {exc}") from exc

    def _embed_batches(self, model_name: str, version: int, pixels: np.ndarray, purpose: str) -> np.ndarray:
        """One call for all the pixels: the client sends requests of batch_size concurrently, with
        at most max_inflight_batches in flight for the whole replica (gRPC and Kafka work alike)."""
        latency = self.metrics.inference_seconds.labels(purpose=purpose)
        sizes = self.metrics.batch_images.labels(purpose=purpose)

        def observe(images: int, seconds: float) -> None:
            latency.observe(seconds)
            sizes.observe(images)

        embeddings = self.encoder.embed(model_name, version, pixels, batch_size=self.config.batch_size, on_response=observe)
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != pixels.shape[0]:
            raise InferenceError(f"{model_name} v{version} returned embeddings of shape {embeddings.shape} for {pixels.shape[0]} images")
        return embeddings


def _train_prefix_uri(target_uri: str) -> str:
    return target_uri.rstrip("/") + "/train/"
