"""Trainer service: an exploration's encoder versions, one per iteration.

ExplorationCreated -> the initial encoder (version 1, iteration 0). IterationFinished(n) -> the
latest checkpoint trained on the iteration's images -> version n + 1. Each version is a checkpoint
in S3 (`checkpoints/<exploration>/v<version>.pt`, its summary in the object's metadata), an ONNX
export in the Triton model repository (model `enc_<exploration id>`) and a ModelPublished event,
in that order. The checkpoint is the idempotence record: once it exists the version is never
trained again; a redelivered event re-exports the version if the repository lacks it and
republishes the same events. Training runs in the handler (the consumer's poll interval is long
enough for it); a SIGTERM abandons the run in hand, uncommitted, for the next replica.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import random
import re
import tempfile
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import grpc
import torch
from minio.error import S3Error

from iex.v1 import common_pb2, events_pb2, trainer_pb2, trainer_pb2_grpc
from services.common import modelrepo, topics
from services.common.errors import DependencyUnavailable, PermanentError
from services.common.kafka import EventContext, Handler, now_timestamp
from services.common.service import Check, Service
from services.common.settings import ServiceSettings, SettingsError, setting
from services.trainer import data, evaluation
from services.trainer.encoder import SUPPORTED_INITS, CheckpointError, EncoderState, ModelConfig, checkpoint_extra
from services.trainer.training import StepReport, TrainConfig, TrainingInterrupted, TrainResult, train

log = logging.getLogger(__name__)

SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name
CHECKPOINT_RE = re.compile(r"/v(\d+)\.pt$")
INITIAL_VERSION = 1


@dataclass(frozen=True)
class TrainerSettings(ServiceSettings):
    trainer_backbone: str = setting("mobilenetv3_small_050", help="timm backbone of new explorations when ExplorationCreated names none (production: resnet50)")
    trainer_image_size: int = setting(64, help="input size of new explorations when ExplorationCreated names none (production: 224)", minimum=16, maximum=1024)
    trainer_init: str = setting("random", help="encoder initialisation when ExplorationCreated names none; an unsupported one is an error, never a random start", choices=SUPPORTED_INITS)
    trainer_mlp_dim: int = setting(1024, help="hidden width of the projection and prediction MLPs (MoCo-v3: 4096)", minimum=16)
    trainer_projection_dim: int = setting(256, help="output width of the projection and prediction MLPs", minimum=8)
    trainer_optimizer: str = setting("lars", help="optimiser of new explorations (LARS for CNNs, AdamW for ViTs)", choices=("lars", "adamw"))
    trainer_batch_size: int = setting(64, help="images per step (two views each); paper: 224", minimum=2)
    trainer_base_lr: float = setting(0.6, help="learning rate per 256 images (scaled by batch / 256); MoCo-v3 ResNet: 0.6", minimum=0.0)
    trainer_weight_decay: float = setting(1e-6, help="weight decay", minimum=0.0)
    trainer_warmup_fraction: float = setting(0.1, help="share of each iteration's steps spent warming the learning rate up", minimum=0.0, maximum=0.9)
    trainer_epochs: int = setting(10, help="epochs over each iteration's training set (paper: 10)", minimum=1)
    trainer_max_steps: int = setting(0, help="cap on steps per iteration, for CPU runs; 0 means no cap", minimum=0)
    trainer_temperature: float = setting(0.2, help="InfoNCE temperature", minimum=0.01, maximum=10.0)
    trainer_momentum: float = setting(0.99, help="base EMA momentum of the key encoder, raised to 1 along a cosine over each run (paper, from MoCo-v3 ImageNet weights: 0.9985)", minimum=0.0, maximum=1.0)
    trainer_min_crop_scale: float = setting(0.2, help="RandomResizedCrop minimum area share", minimum=0.01, maximum=1.0)
    trainer_replay_ratio: float = setting(2.0, help="images drawn from replay buffer + target train per candidate image", minimum=0.0)
    trainer_early_stop_patience: int = setting(2, help="epochs without a lower SSL loss before a run stops; 0 disables", minimum=0)
    trainer_seed: int = setting(0, help="seed of explorations whose ExplorationCreated.seed is 0 (unset)")
    trainer_device: str = setting("auto", help="torch device: auto (cuda when available), cpu or cuda", choices=("auto", "cpu", "cuda"))
    trainer_threads: int = setting(0, help="torch CPU threads; 0 keeps torch's default", minimum=0)
    trainer_fetch_workers: int = setting(8, help="concurrent image reads from S3", minimum=1, maximum=128)
    trainer_decode_size: int = setting(0, help="side of the stored square images crops are taken from; 0 means image_size * 8 / 7", minimum=0)
    trainer_max_train_images: int = setting(0, help="cap on an iteration's training set; 0 means batch * max_steps when steps are capped, else none", minimum=0)
    trainer_eval_max_images: int = setting(2000, help="cap on labelled target images used for k-NN evaluation; 0 disables evaluation", minimum=0)
    trainer_knn_k: int = setting(20, help="neighbours of the k-NN evaluation", minimum=1)
    trainer_max_batch_size: int = setting(64, help="max_batch_size of the Triton model config", minimum=1)

    def __post_init__(self) -> None:
        problems = []
        if not self.model_repository:
            problems.append("IEX_MODEL_REPOSITORY: required by the trainer (the Triton model repository directory)")
        if self.trainer_device == "cuda" and not torch.cuda.is_available():
            problems.append("IEX_TRAINER_DEVICE: cuda requested but no CUDA device is available")
        import timm

        if not timm.is_model(self.trainer_backbone):
            problems.append(f"IEX_TRAINER_BACKBONE: unknown timm model {self.trainer_backbone!r}")
        if problems:
            raise SettingsError("invalid configuration:\n  " + "\n  ".join(problems))

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            batch_size=self.trainer_batch_size,
            base_lr=self.trainer_base_lr,
            weight_decay=self.trainer_weight_decay,
            warmup_fraction=self.trainer_warmup_fraction,
            epochs=self.trainer_epochs,
            max_steps=self.trainer_max_steps,
            temperature=self.trainer_temperature,
            base_momentum=self.trainer_momentum,
            min_crop_scale=self.trainer_min_crop_scale,
            early_stop_patience=self.trainer_early_stop_patience,
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_name_for(exploration_id: str) -> str:
    return "enc_" + exploration_id.replace("-", "_")


def checkpoint_key(exploration_id: str, version: int) -> str:
    return f"checkpoints/{exploration_id}/v{version}.pt"


def run_seed(seed: int, iteration: int) -> int:
    """Independent, reproducible seed of one iteration's run."""
    digest = hashlib.sha256(f"{seed}:{iteration}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


@dataclass(frozen=True)
class VersionSummary:
    """What ModelPublished and EvaluationFinished say about a version; stored as the checkpoint's
    S3 metadata (and inside it), so a redelivery republishes it without loading the weights."""

    exploration_id: str
    version: int
    iteration: int
    train_steps: int
    final_loss: float
    global_step: int
    embedding_dim: int
    image_size: int
    knn_top1: float = -1.0  # -1: not evaluated
    eval_images: int = 0

    @property
    def model_name(self) -> str:
        return model_name_for(self.exploration_id)

    @property
    def evaluated(self) -> bool:
        return self.knn_top1 >= 0 and self.eval_images > 0

    def metadata(self) -> dict[str, str]:
        return {
            "iteration": str(self.iteration),
            "train-steps": str(self.train_steps),
            "final-loss": repr(float(self.final_loss)),
            "global-step": str(self.global_step),
            "embedding-dim": str(self.embedding_dim),
            "image-size": str(self.image_size),
            "knn-top1": repr(float(self.knn_top1)),
            "eval-images": str(self.eval_images),
        }

    @classmethod
    def from_metadata(cls, exploration_id: str, version: int, metadata: Mapping[str, str]) -> "VersionSummary | None":
        try:
            return cls(
                exploration_id=exploration_id,
                version=version,
                iteration=int(metadata["iteration"]),
                train_steps=int(metadata["train-steps"]),
                final_loss=float(metadata["final-loss"]),
                global_step=int(metadata["global-step"]),
                embedding_dim=int(metadata["embedding-dim"]),
                image_size=int(metadata["image-size"]),
                knn_top1=float(metadata["knn-top1"]),
                eval_images=int(metadata["eval-images"]),
            )
        except (KeyError, ValueError):
            return None


class TrainerService(Service):
    name = "trainer"
    settings_class = TrainerSettings
    # Training runs inside the handler: hours per record on a GPU for the paper's sizes.
    max_poll_interval_ms = 6 * 3600 * 1000
    max_poll_records = 1

    def __init__(self, settings: TrainerSettings) -> None:
        super().__init__(settings)
        self.settings: TrainerSettings = settings
        self.device = resolve_device(settings.trainer_device)
        self.repository = Path(settings.model_repository)
        self._lock = threading.Lock()
        self._busy_with: str | None = None
        self._summaries: dict[str, VersionSummary] = {}
        self._last_published: VersionSummary | None = None
        self._process_steps = 0
        self._last_loss = 0.0
        self._eval_cache: OrderedDict[str, tuple[tuple[str, ...], torch.Tensor, torch.Tensor]] = OrderedDict()

        m = self.metrics
        self.m_images_per_second = m.gauge("train_throughput_images_per_second", "Images per second of the last training step (each image is two views)")
        self.m_step_seconds = m.histogram("train_step_duration_seconds", "Time of one optimisation step, augmentation included")
        self.m_loss = m.gauge("train_loss", "MoCo loss of the last training step")
        self.m_lr = m.gauge("train_learning_rate", "Learning rate of the last training step")
        self.m_momentum = m.gauge("train_momentum", "EMA momentum of the key encoder at the last step")
        self.m_steps = m.counter("train_steps_total", "Optimisation steps taken")
        self.m_iterations = m.counter("iterations_trained_total", "Encoder versions produced", ["kind"])
        self.m_run_seconds = m.histogram("train_run_duration_seconds", "Time to produce one encoder version", buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400))
        self.m_images_skipped = m.counter("images_skipped_total", "Training or evaluation images that could not be used", ["reason"])
        self.m_train_images = m.gauge("train_set_images", "Images in the last iteration's training set")
        self.m_knn = m.gauge("eval_knn_top1_ratio", "k-NN top-1 accuracy of the last evaluated version")
        self.m_redeliveries = m.counter("redelivered_total", "Events whose version already existed (republished, not retrained)", ["topic"])
        self.m_busy = m.gauge("busy", "1 while a version is being produced")
        self.m_device = m.gauge("device_info", "Torch device of the trainer (value 1)", ["device"])
        self.m_device.labels(device=self.device.type).set(1)

    # ---- hooks -------------------------------------------------------------------------------
    def register(self, server: grpc.Server) -> list[str]:
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerStatusServicer(self), server)
        return [SERVICE_NAME]

    def handlers(self) -> Mapping[str, Handler]:
        return {
            topics.EXPLORATIONS.name: self.handle_exploration_created,
            topics.ITERATIONS.name: self.handle_iteration_finished,
        }

    def dependencies(self) -> dict[str, Check]:
        checks = super().dependencies()
        checks["model_repository"] = lambda: self.repository.is_dir() and os.access(self.repository, os.W_OK)
        return checks

    def on_start(self) -> None:
        super().on_start()
        self.repository.mkdir(parents=True, exist_ok=True)
        if self.settings.trainer_threads > 0:
            torch.set_num_threads(self.settings.trainer_threads)
        if self.device.type == "cuda":
            # Fixed input sizes: let cuDNN pick the fastest kernels; TF32 matmuls on Ampere+.
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    # ---- handlers ------------------------------------------------------------------------------
    def handle_exploration_created(self, event: events_pb2.ExplorationCreated, ctx: EventContext | None = None) -> None:
        exploration_id = _checked_exploration_id(event.exploration_id)
        with self._working_on(exploration_id):
            summary = self._existing_summary(exploration_id, INITIAL_VERSION)
            if summary is not None:
                self._republish(summary, topics.EXPLORATIONS.name)
                return
            started = time.monotonic()
            state = EncoderState.create(self._model_config(event), self.device, self.settings.trainer_weight_decay)
            labelled = self._initial_eval_set(event.target_uri)
            knn, eval_images = self._evaluate(exploration_id, state, labelled)
            summary = VersionSummary(
                exploration_id=exploration_id,
                version=INITIAL_VERSION,
                iteration=0,
                train_steps=0,
                final_loss=0.0,
                global_step=0,
                embedding_dim=state.config.embedding_dim,
                image_size=state.config.image_size,
                knn_top1=knn,
                eval_images=eval_images,
            )
            self._commit_version(state, summary)
            self.m_iterations.labels(kind="initial").inc()
            self.m_run_seconds.observe(time.monotonic() - started)
            log.info("initial encoder published", extra={"exploration": exploration_id, "backbone": state.config.backbone, "image_size": state.config.image_size, "embedding_dim": state.config.embedding_dim})

    def handle_iteration_finished(self, event: events_pb2.IterationFinished, ctx: EventContext | None = None) -> None:
        exploration_id = _checked_exploration_id(event.exploration_id)
        if event.iteration < 1:
            raise PermanentError("invalid_iteration", str(event.iteration))
        iteration = event.iteration
        version = iteration + 1
        with self._working_on(exploration_id):
            summary = self._existing_summary(exploration_id, version)
            if summary is not None:
                self._republish(summary, topics.ITERATIONS.name)
                return
            started = time.monotonic()
            manifest = data.read_manifest(self.store, self.settings.s3_bucket, event.manifest_key)
            if manifest.exploration_id != exploration_id or manifest.iteration != iteration:
                raise PermanentError("manifest_mismatch", f"{event.manifest_key} is for {manifest.exploration_id} iteration {manifest.iteration}")
            state = self._load_latest(exploration_id, before=version)

            replay = data.ReplayBuffer.load(self.store, self.settings.s3_bucket, exploration_id)
            pool = sorted(set(replay.pool_before(iteration)) | set(manifest.target_train))
            replay.record(self.store, self.settings.s3_bucket, iteration, manifest.replay)
            seed = run_seed(state.config.seed, iteration)
            train_config = self.settings.train_config()
            references = data.plan_training_set(manifest.candidates, pool, self.settings.trainer_replay_ratio, random.Random(seed), self._train_image_limit())
            images = data.fetch_images(self.store, self.settings.s3_bucket, references, self._decode_size(state.config.image_size), self.settings.trainer_fetch_workers)
            for reason, count in images.skipped.items():
                self.m_images_skipped.labels(reason=reason).inc(count)
            self.m_train_images.set(len(images.references))

            result = self._train(state, images.pixels, train_config, seed, exploration_id, iteration)
            state.iteration = iteration
            knn, eval_images = self._evaluate(exploration_id, state, list(manifest.target_eval))
            summary = VersionSummary(
                exploration_id=exploration_id,
                version=version,
                iteration=iteration,
                train_steps=result.steps,
                final_loss=result.final_loss if math.isfinite(result.final_loss) else 0.0,
                global_step=state.global_step,
                embedding_dim=state.config.embedding_dim,
                image_size=state.config.image_size,
                knn_top1=knn,
                eval_images=eval_images,
            )
            self._commit_version(state, summary)
            self.m_iterations.labels(kind="iteration").inc()
            self.m_run_seconds.observe(time.monotonic() - started)
            log.info(
                "iteration trained",
                extra={
                    "exploration": exploration_id,
                    "iteration": iteration,
                    "version": version,
                    "train_images": len(images.references),
                    "steps": result.steps,
                    "epochs": result.epochs,
                    "stopped_early": result.stopped_early,
                    "final_loss": round(summary.final_loss, 4),
                    "images_per_second": round(result.images_per_second, 1),
                    "knn_top1": round(knn, 4) if eval_images else None,
                },
            )

    # ---- versions ----------------------------------------------------------------------------
    def _existing_summary(self, exploration_id: str, version: int) -> VersionSummary | None:
        """The summary of a version whose checkpoint exists, else None."""
        key = checkpoint_key(exploration_id, version)
        metadata = self.store.stat_metadata(self.settings.s3_bucket, key)
        if metadata is None:
            return None
        summary = VersionSummary.from_metadata(exploration_id, version, metadata)
        if summary is None:
            # Metadata lost (copied object, another tool): the summary also lives in the checkpoint.
            blob = self.store.get_bytes(self.settings.s3_bucket, key)
            extra = _checkpoint_extra(blob)
            summary = VersionSummary.from_metadata(exploration_id, version, extra)
            if summary is None:
                raise PermanentError("checkpoint_without_summary", key)
        return summary

    def _republish(self, summary: VersionSummary, topic: str) -> None:
        """A redelivered event: the version exists. Re-export it if the repository lacks it and
        publish the same events again; an event older than the exploration's newest version is
        stale (its events were consumed, or the newer version could not exist) and is dropped."""
        self.m_redeliveries.labels(topic=topic).inc()
        newest = max(self._checkpoint_versions(summary.exploration_id), default=summary.version)
        if newest > summary.version:
            log.info("stale event ignored", extra={"exploration": summary.exploration_id, "version": summary.version, "newest": newest})
            return
        if summary.version not in modelrepo.list_versions(self.repository, summary.model_name):
            state = self._load(summary.exploration_id, summary.version)
            self._export(state, summary)
        self._publish(summary)
        log.info("version republished", extra={"exploration": summary.exploration_id, "version": summary.version})

    def _commit_version(self, state: EncoderState, summary: VersionSummary) -> None:
        """Checkpoint (the idempotence record) -> model repository -> events."""
        data_bytes = state.to_bytes(extra=summary.metadata())
        self.store.put_bytes(
            self.settings.s3_bucket,
            checkpoint_key(summary.exploration_id, summary.version),
            data_bytes,
            metadata=summary.metadata(),
        )
        self._export(state, summary)
        self._publish(summary)

    def _export(self, state: EncoderState, summary: VersionSummary) -> None:
        with tempfile.TemporaryDirectory(prefix="iex-export-") as tmp:
            onnx_path = Path(tmp) / modelrepo.ONNX_FILENAME
            # Exported from a CPU copy: the export is verified against onnxruntime on the CPU,
            # and GPU kernels (TF32, cuDNN) would differ from it by more than the tolerance.
            backbone = copy.deepcopy(state.backbone).cpu()
            try:
                modelrepo.export_encoder_onnx(backbone, state.config.image_size, onnx_path, state.config.mean, state.config.std)
            except modelrepo.ExportError as exc:
                raise PermanentError("export_failed", str(exc)[:300]) from exc
            try:
                modelrepo.write_model_version(
                    self.repository,
                    summary.model_name,
                    summary.version,
                    onnx_path,
                    summary.image_size,
                    summary.embedding_dim,
                    max_batch_size=self.settings.trainer_max_batch_size,
                    overwrite=True,  # only reached when the version is missing or never finished
                )
            except ValueError as exc:
                raise PermanentError("repository_conflict", str(exc)[:300]) from exc
            except OSError as exc:
                raise DependencyUnavailable(f"model repository {self.repository}: {exc}") from exc

    def _publish(self, summary: VersionSummary) -> None:
        assert self.publisher is not None, "publisher is set when the service starts"
        ref = common_pb2.ModelRef(name=summary.model_name, version=summary.version)
        self.publisher.publish(
            topics.MODELS,
            events_pb2.ModelPublished(
                exploration_id=summary.exploration_id,
                model=ref,
                iteration=summary.iteration,
                checkpoint_key=checkpoint_key(summary.exploration_id, summary.version),
                embedding_dim=summary.embedding_dim,
                image_size=summary.image_size,
                train_steps=summary.train_steps,
                final_loss=summary.final_loss,
                published_at=now_timestamp(),
            ),
            key=summary.exploration_id,
        )
        if summary.evaluated:
            self.publisher.publish(
                topics.EVALUATIONS,
                events_pb2.EvaluationFinished(
                    exploration_id=summary.exploration_id,
                    iteration=summary.iteration,
                    model=ref,
                    knn_top1=summary.knn_top1,
                    eval_images=summary.eval_images,
                    evaluated_at=now_timestamp(),
                ),
                key=summary.exploration_id,
            )
            self.m_knn.set(summary.knn_top1)
        with self._lock:
            self._summaries[summary.exploration_id] = summary
            self._last_published = summary

    # ---- checkpoints -------------------------------------------------------------------------
    def _checkpoint_versions(self, exploration_id: str) -> list[int]:
        versions = []
        for key in self.store.list_keys(self.settings.s3_bucket, f"checkpoints/{exploration_id}/"):
            match = CHECKPOINT_RE.search(key)
            if match:
                versions.append(int(match.group(1)))
        return sorted(versions)

    def _load(self, exploration_id: str, version: int) -> EncoderState:
        key = checkpoint_key(exploration_id, version)
        blob = self.store.get_or_none(self.settings.s3_bucket, key)
        if blob is None:
            raise PermanentError("checkpoint_missing", key)
        try:
            return EncoderState.from_bytes(blob, self.device, self.settings.trainer_weight_decay)
        except CheckpointError as exc:
            raise PermanentError("checkpoint_unreadable", f"{key}: {exc}") from exc

    def _load_latest(self, exploration_id: str, before: int) -> EncoderState:
        """The newest checkpoint older than `before` (normally `before - 1`; older ones when an
        iteration produced no version)."""
        candidates = [v for v in self._checkpoint_versions(exploration_id) if v < before]
        if not candidates:
            raise PermanentError("no_checkpoint", f"exploration {exploration_id} has no encoder before version {before}")
        return self._load(exploration_id, max(candidates))

    # ---- training and evaluation -------------------------------------------------------------
    def _model_config(self, event: events_pb2.ExplorationCreated) -> ModelConfig:
        s = self.settings
        init = event.init or s.trainer_init
        if init not in SUPPORTED_INITS:
            raise PermanentError("unsupported_init", f"{init!r} (supported: {', '.join(SUPPORTED_INITS)})")
        backbone = event.backbone or s.trainer_backbone
        import timm

        if not timm.is_model(backbone):
            raise PermanentError("unknown_backbone", backbone)
        image_size = event.image_size or s.trainer_image_size
        if not 16 <= image_size <= 1024:
            raise PermanentError("invalid_image_size", str(image_size))
        return ModelConfig(
            backbone=backbone,
            image_size=image_size,
            init=init,
            seed=int(event.seed) if event.seed else s.trainer_seed,
            mlp_dim=s.trainer_mlp_dim,
            projection_dim=s.trainer_projection_dim,
            optimizer=s.trainer_optimizer,
        )

    def _decode_size(self, image_size: int) -> int:
        return self.settings.trainer_decode_size or max(image_size, int(round(image_size * 8 / 7)))

    def _train_image_limit(self) -> int:
        s = self.settings
        if s.trainer_max_train_images:
            return s.trainer_max_train_images
        return s.trainer_max_steps * s.trainer_batch_size if s.trainer_max_steps else 0

    def _train(self, state: EncoderState, pixels: torch.Tensor, config: TrainConfig, seed: int, exploration_id: str, iteration: int) -> TrainResult:
        try:
            result = train(state, pixels, config, seed, on_step=self._observe_step, should_stop=self.stopping.is_set)
        except TrainingInterrupted as exc:
            # Not a failure of the record: leaving it uncommitted hands it to the next consumer.
            raise DependencyUnavailable(f"trainer stopping: {exc}") from exc
        except FloatingPointError as exc:
            raise PermanentError("loss_not_finite", str(exc)) from exc
        if result.steps == 0:
            log.warning("nothing to train on; the version repeats the previous weights", extra={"exploration": exploration_id, "iteration": iteration, "images": int(pixels.shape[0])})
        return result

    def _observe_step(self, report: StepReport) -> None:
        self.m_step_seconds.observe(report.seconds)
        if report.seconds > 0:
            self.m_images_per_second.set(report.images / report.seconds)
        self.m_loss.set(report.loss)
        self.m_lr.set(report.lr)
        self.m_momentum.set(report.momentum)
        self.m_steps.inc()
        with self._lock:
            self._process_steps += 1
            self._last_loss = report.loss

    def _initial_eval_set(self, target_uri: str) -> list[data.LabelledImage]:
        if not target_uri or not self.settings.trainer_eval_max_images:
            return []
        try:
            return data.list_target_eval(self.store, target_uri, self.settings.trainer_eval_max_images)
        except (ValueError, S3Error) as exc:
            # The initial encoder must not wait on an unreadable target: it is only evaluated.
            log.warning("target not evaluable", extra={"target_uri": target_uri, "error": str(exc)})
            return []

    def _evaluate(self, exploration_id: str, state: EncoderState, labelled: list[data.LabelledImage]) -> tuple[float, int]:
        """(k-NN top-1, images used); (-1, 0) when there is nothing to evaluate on."""
        limit = self.settings.trainer_eval_max_images
        labelled = data.spread(labelled, limit) if limit else []
        if len(labelled) < 2:
            return -1.0, 0
        pixels, labels = self._eval_images(exploration_id, state.config.image_size, labelled)
        if pixels.shape[0] < 2:
            return -1.0, 0
        features = evaluation.embed(state.backbone, pixels, state.config.mean, state.config.std, self.device)
        accuracy = evaluation.knn_top1(features, labels, k=self.settings.trainer_knn_k)
        return float(accuracy), int(pixels.shape[0])

    def _eval_images(self, exploration_id: str, image_size: int, labelled: list[data.LabelledImage]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded evaluation images and integer labels, cached per exploration: the labelled
        split does not change between iterations."""
        references = tuple(item.key for item in labelled)
        cached = self._eval_cache.get(exploration_id)
        if cached is not None and cached[0] == references:
            self._eval_cache.move_to_end(exploration_id)
            return cached[1], cached[2]
        batch = data.fetch_images(self.store, self.settings.s3_bucket, references, image_size, self.settings.trainer_fetch_workers)
        for reason, count in batch.skipped.items():
            self.m_images_skipped.labels(reason=reason).inc(count)
        label_of = {item.key: item.label for item in labelled}
        names = sorted({label_of[r] for r in batch.references})
        index = {name: i for i, name in enumerate(names)}
        labels = torch.tensor([index[label_of[r]] for r in batch.references], dtype=torch.long)
        self._eval_cache[exploration_id] = (references, batch.pixels, labels)
        while len(self._eval_cache) > 4:
            self._eval_cache.popitem(last=False)
        return batch.pixels, labels

    # ---- status ------------------------------------------------------------------------------
    @contextmanager
    def _working_on(self, exploration_id: str) -> Iterator[None]:
        with self._lock:
            self._busy_with = exploration_id
        self.m_busy.set(1)
        try:
            yield
        finally:
            with self._lock:
                self._busy_with = None
            self.m_busy.set(0)

    def status(self, exploration_id: str) -> trainer_pb2.GetTrainerStatusResponse | None:
        """Status of one exploration (None when it has no version), or of the process when
        `exploration_id` is empty."""
        with self._lock:
            busy_with = self._busy_with
            known = self._summaries.get(exploration_id) if exploration_id else self._last_published
            process_steps, last_loss = self._process_steps, self._last_loss
        device = str(self.device)
        if not exploration_id:
            ref = common_pb2.ModelRef(name=known.model_name, version=known.version) if known else None
            return trainer_pb2.GetTrainerStatusResponse(latest_model=ref, train_steps=process_steps, last_loss=last_loss, device=device, busy=busy_with is not None)
        summary = known
        versions = self._checkpoint_versions(exploration_id)
        if versions and (summary is None or versions[-1] > summary.version):
            summary = self._existing_summary(exploration_id, versions[-1])
        if summary is None:
            return None
        return trainer_pb2.GetTrainerStatusResponse(
            latest_model=common_pb2.ModelRef(name=summary.model_name, version=summary.version),
            train_steps=summary.global_step,
            last_loss=summary.final_loss,
            device=device,
            busy=busy_with == exploration_id,
        )


class TrainerStatusServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, service: TrainerService) -> None:
        self.service = service

    def GetTrainerStatus(self, request: trainer_pb2.GetTrainerStatusRequest, context: grpc.ServicerContext) -> trainer_pb2.GetTrainerStatusResponse:
        exploration_id = request.exploration_id
        if exploration_id and not data.EXPLORATION_ID_RE.match(exploration_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "exploration_id: expected letters, digits, '-' or '_' (at most 128)")
        try:
            response = self.service.status(exploration_id)
        except (DependencyUnavailable, PermanentError) as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"checkpoint store: {str(exc)[:200]}")
        if response is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"exploration_id: no encoder version for {exploration_id!r}")
        return response


def _checked_exploration_id(exploration_id: str) -> str:
    if not data.EXPLORATION_ID_RE.match(exploration_id or ""):
        raise PermanentError("invalid_exploration_id", repr(exploration_id)[:80])
    return exploration_id


def _checkpoint_extra(blob: bytes) -> dict[str, str]:
    try:
        return {str(k): str(v) for k, v in checkpoint_extra(blob).items()}
    except Exception:  # noqa: BLE001 - an unreadable checkpoint has no summary
        return {}
