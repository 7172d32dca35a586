"""A training job: what one iteration trains, and running it on this process's rank.

The service (rank 0) decides the job from the iteration's manifest; under torchrun the same job is
sent to every other rank (followers.py) and each runs `JobRunner.run` on its rows of every batch.
A job starts from the previous version's checkpoint, or from the mid-run checkpoint of the same job
(same run id) when an earlier attempt wrote one: a crash costs the steps since that checkpoint.
Only rank 0 writes mid-run checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from services.common.objectstore import ObjectStore
from services.trainer import distributed
from services.trainer.encoder import CheckpointError, EncoderState
from services.trainer.loader import StoreSource, StreamingLoader
from services.trainer.training import RunProgress, StepReport, TrainConfig, TrainResult, plan_run, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderConfig:
    workers: int = 8
    prefetch_batches: int = 4
    cache_bytes: int = 0


@dataclass(frozen=True)
class TrainingJob:
    exploration_id: str
    version: int  # the version this job produces
    base_checkpoint_key: str  # the version it starts from
    running_checkpoint_key: str  # where its mid-run checkpoints go
    references: tuple[str, ...]
    decode_size: int
    seed: int
    config: TrainConfig
    loader: LoaderConfig = LoaderConfig()
    compile: bool = False

    @property
    def run_id(self) -> str:
        """Identity of the run: a mid-run checkpoint continues only the run it was written in."""
        doc = {
            "exploration": self.exploration_id,
            "version": self.version,
            "base": self.base_checkpoint_key,
            "references": hashlib.sha256("\n".join(self.references).encode()).hexdigest(),
            "decode_size": self.decode_size,
            "seed": self.seed,
            "config": dataclasses.asdict(self.config),
        }
        # Checkpoint cadence does not change the run.
        for name in ("checkpoint_every_steps", "checkpoint_every_seconds"):
            doc["config"].pop(name)
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class JobOutcome:
    state: EncoderState
    result: TrainResult
    loader_stats: object


class JobRunner:
    """Runs jobs against the object store on this process's device and rank."""

    def __init__(self, store: ObjectStore, bucket: str, device: torch.device, weight_decay: float) -> None:
        self.store = store
        self.bucket = bucket
        self.device = device
        self.weight_decay = weight_decay

    def load(self, key: str) -> EncoderState | None:
        blob = self.store.get_or_none(self.bucket, key)
        if blob is None:
            return None
        return EncoderState.from_bytes(blob, self.device, self.weight_decay)

    def starting_state(self, job: TrainingJob, total_steps: int, base: EncoderState | None = None) -> tuple[EncoderState, RunProgress | None]:
        """The mid-run checkpoint of this very run when there is one, else the base version
        (`base` when the caller has it loaded already)."""
        try:
            running = self.load(job.running_checkpoint_key)
        except CheckpointError as exc:
            log.warning("unreadable mid-run checkpoint ignored", extra={"key": job.running_checkpoint_key, "error": str(exc)[:200]})
            running = None
        if running is not None and running.run is not None:
            progress = RunProgress.from_dict(running.run)
            if progress.run_id == job.run_id and progress.total_steps == total_steps:
                return running, progress
            log.info("mid-run checkpoint of another run ignored", extra={"key": job.running_checkpoint_key})
        if base is None:
            base = self.load(job.base_checkpoint_key)
        if base is None:
            raise CheckpointError(f"base checkpoint {job.base_checkpoint_key} is missing")
        return base, None

    def run(
        self,
        job: TrainingJob,
        on_step: Callable[[StepReport], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_checkpoint_written: Callable[[RunProgress], None] | None = None,
        base: EncoderState | None = None,
    ) -> JobOutcome:
        info = distributed.process_info()
        plan = plan_run(len(job.references), job.config, info.world_size)
        state, progress = self.starting_state(job, plan.total_steps, base)
        if job.config.precision == "fp16":
            state.enable_loss_scaling()
        if job.compile:
            state.compile()
        if progress is not None:
            log.info("resuming run", extra={"exploration": job.exploration_id, "version": job.version, "step": progress.step, "total_steps": progress.total_steps})

        def write_checkpoint(current: RunProgress) -> None:
            self.store.put_bytes(self.bucket, job.running_checkpoint_key, state.to_bytes(run=current.to_dict()), metadata={"run-id": job.run_id, "step": str(current.step)})
            if on_checkpoint_written is not None:
                on_checkpoint_written(current)

        loader = StreamingLoader(
            StoreSource(self.store, self.bucket),
            job.references,
            job.decode_size,
            max(plan.global_batch, info.world_size),
            job.seed,
            rank=info.rank,
            world_size=info.world_size,
            workers=job.loader.workers,
            prefetch_batches=job.loader.prefetch_batches,
            cache_bytes=job.loader.cache_bytes,
            pin_memory=self.device.type == "cuda",
        )
        try:
            result = train(
                state,
                loader,
                job.config,
                job.seed,
                run_id=job.run_id,
                resume=progress,
                on_step=on_step,
                should_stop=should_stop,
                on_checkpoint=write_checkpoint,
            )
        finally:
            loader.close()
        return JobOutcome(state, result, loader.stats)
