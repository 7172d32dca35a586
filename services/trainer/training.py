"""The training run of one iteration: epochs over an in-memory image set, schedules, early stopping."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from services.trainer import moco
from services.trainer.encoder import EncoderState


class TrainingInterrupted(Exception):
    """The service is stopping; the run was abandoned before its checkpoint was written."""


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64
    base_lr: float = 0.6
    weight_decay: float = 1e-6
    warmup_fraction: float = 0.1
    epochs: int = 10
    # 0: no cap. CPU runs cap the steps of an iteration; the schedules span the capped run.
    max_steps: int = 0
    temperature: float = 0.2
    base_momentum: float = 0.99
    min_crop_scale: float = 0.2
    # Epochs without a lower mean loss before the run stops (the paper stops early on the SSL
    # loss); 0 disables.
    early_stop_patience: int = 2
    early_stop_min_delta: float = 1e-3


@dataclass(frozen=True)
class StepReport:
    step: int
    total_steps: int
    loss: float
    lr: float
    momentum: float
    seconds: float
    images: int


@dataclass(frozen=True)
class TrainResult:
    steps: int
    final_loss: float
    epochs: int
    images_per_second: float
    stopped_early: bool


def planned_steps(num_images: int, config: TrainConfig) -> tuple[int, int]:
    """(batch size, total steps) of a run over `num_images`: full batches only (BatchNorm needs
    at least 2 samples and a ragged last batch would weigh its images more)."""
    batch = min(config.batch_size, num_images)
    if batch < 2:
        return batch, 0
    total = (num_images // batch) * config.epochs
    if config.max_steps > 0:
        total = min(total, config.max_steps)
    return batch, total


def autocast_for(device: torch.device):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(state: EncoderState, view1: torch.Tensor, view2: torch.Tensor, lr: float, momentum: float, temperature: float) -> float:
    """One MoCo-v3 step: momentum update, symmetric loss, backward, optimiser step. Returns the loss."""
    state.model.train()
    moco.set_learning_rate(state.optimizer, lr)
    state.optimizer.zero_grad(set_to_none=True)
    with autocast_for(state.device):
        loss = state.model(view1, view2, momentum, temperature)
    loss.backward()
    state.optimizer.step()
    state.global_step += 1
    return float(loss.detach())


def train(
    state: EncoderState,
    images: torch.Tensor,
    config: TrainConfig,
    seed: int,
    on_step: Callable[[StepReport], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Trains `state` in place on uint8 images [N, 3, H, W] for `config.epochs` (capped by max_steps).

    Learning rate and momentum follow their schedules over this run; shuffling and augmentations
    draw from a generator seeded with `seed`, so the same inputs give the same run.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    n = images.shape[0]
    batch, total = planned_steps(n, config)
    if total == 0:
        return TrainResult(steps=0, final_loss=float("nan"), epochs=0, images_per_second=0.0, stopped_early=False)
    for group in state.optimizer.param_groups:
        group["weight_decay"] = config.weight_decay
    _, world = moco.rank_and_world_size()
    peak_lr = moco.scaled_learning_rate(config.base_lr, batch, world)
    augment = moco.TwoViewAugment(state.config.image_size, state.config.mean, state.config.std, config.min_crop_scale)
    generator = torch.Generator().manual_seed(seed)

    step = 0
    epochs_run = 0
    best = math.inf
    stale_epochs = 0
    stopped_early = False
    losses: list[float] = []
    seconds = 0.0
    steps_per_epoch = n // batch
    while step < total:
        order = torch.randperm(n, generator=generator)
        epoch_losses: list[float] = []
        for index in range(steps_per_epoch):
            if step >= total:
                break
            if should_stop is not None and should_stop():
                raise TrainingInterrupted(f"stopped at step {step} of {total}")
            started = time.perf_counter()
            chosen = order[index * batch : (index + 1) * batch]
            x = images[chosen].to(state.device, non_blocking=True)
            view1, view2 = augment(x, generator)
            progress = step / total
            lr = moco.learning_rate_at(progress, peak_lr, config.warmup_fraction)
            momentum = moco.momentum_at(progress, config.base_momentum)
            loss = train_step(state, view1, view2, lr, momentum, config.temperature)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}; lower the learning rate")
            elapsed = time.perf_counter() - started
            seconds += elapsed
            step += 1
            epoch_losses.append(loss)
            losses.append(loss)
            if on_step is not None:
                on_step(StepReport(step, total, loss, lr, momentum, elapsed, batch))
        epochs_run += 1
        mean_loss = sum(epoch_losses) / max(1, len(epoch_losses))
        if mean_loss < best - config.early_stop_min_delta:
            best = mean_loss
            stale_epochs = 0
        else:
            stale_epochs += 1
            if config.early_stop_patience > 0 and stale_epochs >= config.early_stop_patience and step < total:
                stopped_early = True
                break
    # The last steps' mean: one step's loss is noisy at small batch sizes.
    tail = losses[-min(len(losses), max(1, steps_per_epoch)) :]
    return TrainResult(
        steps=step,
        final_loss=float(sum(tail) / len(tail)),
        epochs=epochs_run,
        images_per_second=step * batch / seconds if seconds > 0 else 0.0,
        stopped_early=stopped_early,
    )
