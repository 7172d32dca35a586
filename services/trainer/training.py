"""One iteration's training run: epochs over a batch loader, schedules, early stopping, resume.

A run is reproducible from (encoder state, training set, config, seed): the epoch orders come from
the loader, the augmentations from one generator seeded with `seed`. Its position (`RunProgress`:
step, loader position, early-stopping bookkeeping, generator state) is saved with the mid-run
checkpoints, so a run resumed after a crash takes exactly the steps the uninterrupted run would
have taken. Every rank of a data-parallel run executes this same loop on its rows of each batch;
the per-step loss and the stop request are agreed across ranks, so all ranks stop together.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from services.trainer import distributed, moco
from services.trainer.encoder import EncoderState
from services.trainer.loader import BatchLoader, Position

PRECISIONS = ("fp32", "bf16", "fp16")
# "exploration": the paper's (warm-up over the exploration's first steps, then constant lr and
# momentum, carried across iterations); "cosine": MoCo-v3's schedule within one run (standalone
# runs and benchmarks of one job).
SCHEDULES = ("exploration", "cosine")
# "train": BatchNorm layers of the backbones normalise with batch statistics and update their running
# statistics (MoCo-v3 from scratch); "frozen": they keep the initial weights' running statistics
# (eval mode; their affine parameters still train). Fine-tuning pretrained weights on small batches
# of augmented views otherwise replaces ImageNet's statistics with those of blurred, solarised,
# colour-jittered crops, which the clean images the exported encoder embeds never have: on the
# animals target, 20 steps at lr 0 (statistics alone) took k-NN from 0.56 to 0.45.
BATCHNORM_MODES = ("train", "frozen")


class TrainingInterrupted(Exception):
    """The run was asked to stop (service shutdown); progress up to the last step was handed to
    `on_checkpoint` when one is set."""


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64  # global: split over the ranks of a data-parallel run
    base_lr: float = 0.6  # per 256 images
    weight_decay: float = 1e-6
    schedule: str = "exploration"
    # "exploration": warm-up steps counted from the exploration's first step.
    warmup_steps: int = 20
    # "cosine": share of the run spent warming up.
    warmup_fraction: float = 0.1
    epochs: int = 10
    # 0: no cap. CPU runs cap the steps of an iteration; the schedules span the capped run.
    max_steps: int = 0
    temperature: float = 0.2
    base_momentum: float = 0.99
    min_crop_scale: float = 0.2
    batchnorm: str = "train"
    # The exploration's first steps train the heads only (projector, predictor: new and random on
    # top of pretrained weights), so their first, random gradients never reach the backbone.
    head_warmup_steps: int = 0
    # Epochs without a lower mean loss before the run stops (the paper stops early on the SSL
    # loss); 0 disables.
    early_stop_patience: int = 2
    early_stop_min_delta: float = 1e-3
    precision: str = "fp32"
    channels_last: bool = False
    # Mid-run checkpoints (0 disables either trigger).
    checkpoint_every_steps: int = 0
    checkpoint_every_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (BatchNorm)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        if self.batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm must be one of {', '.join(BATCHNORM_MODES)}, got {self.batchnorm!r}")


@dataclass(frozen=True)
class RunPlan:
    global_batch: int
    steps_per_epoch: int
    total_steps: int


def plan_run(num_images: int, config: TrainConfig, world_size: int = 1) -> RunPlan:
    """Batch and steps of a run over `num_images`: full batches only (BatchNorm needs at least 2
    samples per rank, and a ragged last batch would weigh its images more). A set smaller than
    the configured batch trains on one batch of (nearly) all of it."""
    batch = min(config.batch_size, num_images)
    batch -= batch % world_size
    if batch < 2 * world_size:
        return RunPlan(max(batch, 0), 0, 0)
    steps_per_epoch = num_images // batch
    return RunPlan(batch, steps_per_epoch, run_steps(steps_per_epoch, config))


@dataclass
class RunProgress:
    """Where a run stands after `step` steps: enough to continue it exactly."""

    run_id: str
    total_steps: int
    step: int = 0
    position: Position = Position()
    best_loss: float = math.inf
    stale_epochs: int = 0
    epochs_done: int = 0
    epoch_loss_sum: float = 0.0
    epoch_steps: int = 0
    recent_losses: list[float] = field(default_factory=list)
    generator_state: torch.Tensor | None = None
    train_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "total_steps": self.total_steps,
            "step": self.step,
            "epoch": self.position.epoch,
            "batch": self.position.batch,
            "best_loss": self.best_loss,
            "stale_epochs": self.stale_epochs,
            "epochs_done": self.epochs_done,
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_steps": self.epoch_steps,
            "recent_losses": list(self.recent_losses),
            "generator_state": self.generator_state,
            "train_seconds": self.train_seconds,
        }

    @classmethod
    def from_dict(cls, blob: dict[str, Any]) -> "RunProgress":
        return cls(
            run_id=str(blob["run_id"]),
            total_steps=int(blob["total_steps"]),
            step=int(blob["step"]),
            position=Position(int(blob["epoch"]), int(blob["batch"])),
            best_loss=float(blob["best_loss"]),
            stale_epochs=int(blob["stale_epochs"]),
            epochs_done=int(blob["epochs_done"]),
            epoch_loss_sum=float(blob["epoch_loss_sum"]),
            epoch_steps=int(blob["epoch_steps"]),
            recent_losses=[float(v) for v in blob["recent_losses"]],
            generator_state=blob.get("generator_state"),
            train_seconds=float(blob.get("train_seconds", 0.0)),
        )


@dataclass(frozen=True)
class StepReport:
    step: int
    total_steps: int
    loss: float
    lr: float
    momentum: float
    seconds: float  # the step, data wait included
    images: int  # images of the global batch (each seen as two views)
    data_wait_seconds: float = 0.0


@dataclass(frozen=True)
class TrainResult:
    steps: int
    final_loss: float
    epochs: int
    images_per_second: float
    stopped_early: bool
    resumed_from_step: int = 0


def autocast_for(device: torch.device, precision: str = "bf16"):
    """Mixed precision on GPUs (bf16 by default, fp16 with loss scaling on GPUs without bf16);
    plain fp32 on CPUs unless asked."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(
    state: EncoderState,
    view1: torch.Tensor,
    view2: torch.Tensor,
    lr: float,
    momentum: float,
    temperature: float,
    module: torch.nn.Module | None = None,
    precision: str = "fp32",
    stop: bool = False,
) -> float:
    """One MoCo-v3 step: momentum update, symmetric loss, backward, optimiser step (through
    `module`, the data-parallel wrapper, when given). Returns the loss (mean over ranks)."""
    loss_value, _ = _step(state, view1, view2, lr, momentum, temperature, module or state.model, precision, stop)
    return loss_value


def set_training_mode(model: moco.MoCoV3, batchnorm: str = "train") -> None:
    """Train mode for the MoCo model; with batchnorm="frozen" the backbones' BatchNorm layers stay
    in eval mode (running statistics used and kept). The heads' BatchNorms always train: they start
    from scratch."""
    model.train()
    if batchnorm == "frozen":
        for backbone in (model.backbone, model.momentum_backbone):
            for layer in backbone.modules():
                if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
                    layer.eval()


def _step(state, view1, view2, lr, momentum, temperature, module, precision, stop, batchnorm="train", freeze_backbone=False) -> tuple[float, bool]:
    set_training_mode(state.model, batchnorm)
    moco.set_learning_rate(state.optimizer, lr)
    state.optimizer.zero_grad(set_to_none=True)
    with autocast_for(state.device, precision):
        loss = module(view1, view2, momentum, temperature)
    if state.scaler is not None:
        state.scaler.scale(loss).backward()
        _drop_backbone_gradients(state, freeze_backbone)
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        loss.backward()
        _drop_backbone_gradients(state, freeze_backbone)
        state.optimizer.step()
    state.global_step += 1
    return distributed.agree(loss, stop)


def _drop_backbone_gradients(state: EncoderState, freeze: bool) -> None:
    """Head warm-up: the optimiser skips parameters without a gradient, so the backbone keeps its
    weights (and its optimiser state stays untouched) while the new heads learn."""
    if freeze:
        for parameter in state.model.backbone.parameters():
            parameter.grad = None


def train(
    state: EncoderState,
    loader: BatchLoader,
    config: TrainConfig,
    seed: int,
    *,
    run_id: str = "",
    resume: RunProgress | None = None,
    on_step: Callable[[StepReport], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_checkpoint: Callable[[RunProgress], None] | None = None,
) -> TrainResult:
    """Trains `state` in place on `loader`'s batches for `config.epochs` (capped by max_steps,
    cut short by early stopping), from the start or from `resume`.

    `on_checkpoint` receives the progress every `checkpoint_every_steps` / `_seconds` and when
    the run is interrupted; it is called on rank 0 only (only rank 0 writes)."""
    total = run_steps(loader.steps_per_epoch, config)
    if total == 0 or loader.local_batch < 2:  # BatchNorm needs two images per rank
        return TrainResult(steps=0, final_loss=float("nan"), epochs=0, images_per_second=0.0, stopped_early=False)
    if resume is not None and (resume.run_id != run_id or resume.total_steps != total):
        raise ValueError(f"progress of run {resume.run_id!r} ({resume.total_steps} steps) does not continue run {run_id!r} ({total} steps)")
    progress = resume or RunProgress(run_id=run_id, total_steps=total)
    resumed_from = progress.step
    for group in state.optimizer.param_groups:
        group["weight_decay"] = config.weight_decay
    peak_lr = moco.scaled_learning_rate(config.base_lr, loader.global_batch)
    augment = moco.TwoViewAugment(state.config.image_size, state.config.mean, state.config.std, config.min_crop_scale)
    generator = torch.Generator()
    if progress.generator_state is not None:
        generator.set_state(progress.generator_state)
    else:
        generator.manual_seed(seed)
    leader = distributed.process_info().is_leader
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    if config.channels_last:
        state.model.to(memory_format=torch.channels_last)
    last_checkpoint = time.monotonic()
    stopped_early = False

    def snapshot() -> RunProgress:
        progress.generator_state = generator.get_state()
        return progress

    with distributed.synchronised_batchnorm(state.model, state.device):
        module = distributed.data_parallel(state.model, state.device)
        batches = loader.batches(progress.position)
        try:
            while progress.step < total:
                started = time.perf_counter()
                batch = next(batches)
                x = batch.pixels.to(state.device, non_blocking=True)
                view1, view2 = augment(x, generator, offset=loader.offset, total=loader.global_batch)
                view1 = view1.contiguous(memory_format=memory_format)
                view2 = view2.contiguous(memory_format=memory_format)
                lr, momentum = schedule_at(config, state.global_step, progress.step, total, peak_lr)
                wants_stop = should_stop is not None and should_stop()
                frozen = state.global_step < config.head_warmup_steps
                loss, stop = _step(state, view1, view2, lr, momentum, config.temperature, module, config.precision, wants_stop, config.batchnorm, frozen)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {progress.step}; lower the learning rate")
                elapsed = time.perf_counter() - started
                progress.step += 1
                progress.train_seconds += elapsed
                progress.epoch_loss_sum += loss
                progress.epoch_steps += 1
                progress.recent_losses = (progress.recent_losses + [loss])[-max(1, loader.steps_per_epoch) :]
                next_batch = batch.position.batch + 1
                end_of_epoch = next_batch >= loader.steps_per_epoch
                progress.position = Position(batch.position.epoch + 1, 0) if end_of_epoch else Position(batch.position.epoch, next_batch)
                if on_step is not None:
                    on_step(StepReport(progress.step, total, loss, lr, momentum, elapsed, loader.global_batch, batch.wait_seconds))
                if end_of_epoch and _epoch_ended(progress, config) and progress.step < total:
                    stopped_early = True
                    break
                if stop and progress.step < total:
                    if on_checkpoint is not None and leader:
                        on_checkpoint(snapshot())
                    raise TrainingInterrupted(f"stopped at step {progress.step} of {total}")
                if on_checkpoint is not None and leader and progress.step < total and _checkpoint_due(progress.step, last_checkpoint, config):
                    on_checkpoint(snapshot())
                    last_checkpoint = time.monotonic()
        finally:
            batches.close()
    if progress.epoch_steps and not stopped_early:
        progress.epochs_done += 1  # a run cut by max_steps ends inside an epoch
    tail = progress.recent_losses
    return TrainResult(
        steps=progress.step,
        final_loss=float(sum(tail) / len(tail)) if tail else float("nan"),
        epochs=progress.epochs_done,
        images_per_second=progress.step * loader.global_batch / progress.train_seconds if progress.train_seconds > 0 else 0.0,
        stopped_early=stopped_early,
        resumed_from_step=resumed_from,
    )


def schedule_at(config: TrainConfig, exploration_step: int, run_step: int, run_total: int, peak_lr: float) -> tuple[float, float]:
    """(learning rate, key-encoder momentum) of the next step. No step runs at lr 0: the warm-up's
    first step is at peak / warmup, and the cosine is read at the middle of each step's interval."""
    if config.schedule == "exploration":
        return moco.exploration_learning_rate(exploration_step, peak_lr, config.warmup_steps), config.base_momentum
    fraction = (run_step + 0.5) / run_total
    return moco.learning_rate_at(fraction, peak_lr, config.warmup_fraction), moco.momentum_at(fraction, config.base_momentum)


def run_steps(steps_per_epoch: int, config: TrainConfig) -> int:
    total = steps_per_epoch * config.epochs
    return min(total, config.max_steps) if config.max_steps > 0 else total


def _epoch_ended(progress: RunProgress, config: TrainConfig) -> bool:
    """Early-stopping bookkeeping at the end of an epoch; True when the run should stop."""
    mean_loss = progress.epoch_loss_sum / max(1, progress.epoch_steps)
    progress.epochs_done += 1
    progress.epoch_loss_sum, progress.epoch_steps = 0.0, 0
    if mean_loss < progress.best_loss - config.early_stop_min_delta:
        progress.best_loss = mean_loss
        progress.stale_epochs = 0
        return False
    progress.stale_epochs += 1
    return config.early_stop_patience > 0 and progress.stale_epochs >= config.early_stop_patience


def _checkpoint_due(step: int, last_checkpoint: float, config: TrainConfig) -> bool:
    if config.checkpoint_every_steps > 0 and step % config.checkpoint_every_steps == 0:
        return True
    return config.checkpoint_every_seconds > 0 and time.monotonic() - last_checkpoint >= config.checkpoint_every_seconds
