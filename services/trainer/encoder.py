"""An exploration's encoder: its fixed architecture, its trainable state, and its checkpoint format.

The architecture (`ModelConfig`) is decided once, when the exploration is created, and travels in
every checkpoint, so later iterations rebuild the same network whatever the trainer's current
settings say. A checkpoint is one `torch.save` blob of plain containers and tensors, loaded with
`weights_only=True`: a checkpoint read from the object store can never run code. It holds the
model (base and momentum encoders, heads), the optimiser, the loss scaler (fp16 runs), the step
and iteration counters and, for a checkpoint written in the middle of a run, the run's progress.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from services.trainer import moco
from services.trainer.initialisation import InitError, InitialWeights, check_init

CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not describe a model this code can build."""


@dataclass(frozen=True)
class ModelConfig:
    backbone: str
    image_size: int
    init: str = "random"
    seed: int = 0
    mlp_dim: int = 1024
    projection_dim: int = 256
    # MoCo-v3: 2 for CNNs, 3 for ViTs.
    projector_layers: int = 2
    optimizer: str = "lars"
    # Filled in by `EncoderState.create` from the backbone (or the initial weights): input
    # normalisation and feature width.
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    embedding_dim: int = 0

    def __post_init__(self) -> None:
        # Never fall back to a random start: an exploration asked for something else.
        check_init(self.init)
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.mlp_dim < 1 or self.projection_dim < 1:
            raise ValueError("mlp_dim and projection_dim must be >= 1")
        if self.projector_layers < 1:
            raise ValueError("projector_layers must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)


def _build(config: ModelConfig, dim: int) -> moco.MoCoV3:
    backbone = moco.create_backbone(config.backbone)
    return moco.MoCoV3(backbone, dim, mlp_dim=config.mlp_dim, dim=config.projection_dim, projector_layers=config.projector_layers)


@dataclass
class EncoderState:
    """Everything that continues from one iteration to the next."""

    config: ModelConfig
    model: moco.MoCoV3
    optimizer: torch.optim.Optimizer
    device: torch.device
    # Optimisation steps over the whole exploration (the schedules restart every iteration).
    global_step: int = 0
    iteration: int = 0
    # Loss scaling of fp16 runs (bf16 and fp32 need none).
    scaler: torch.amp.GradScaler | None = None
    # Progress of the run a mid-run checkpoint was written in (training.RunProgress.to_dict()).
    run: dict[str, Any] | None = None
    # The scaler state of the checkpoint, applied when this process also trains in fp16.
    saved_scaler_state: dict[str, Any] | None = None

    @classmethod
    def create(cls, config: ModelConfig, device: torch.device, weight_decay: float = 1e-6, initial: InitialWeights | None = None) -> "EncoderState":
        """A fresh encoder: `initial`'s weights where given (heads without weights and the whole
        model of a random start are initialised deterministically from `config.seed`)."""
        if initial is not None and initial.backbone != config.backbone:
            raise ValueError(f"initial weights are for {initial.backbone}, the config asks for {config.backbone}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            backbone = moco.create_backbone(config.backbone)
            if initial is not None:
                backbone.load_state_dict(initial.backbone_state, strict=True)
            dim = moco.feature_dim(backbone, config.image_size)
            mean, std = moco.backbone_normalisation(backbone)
            if initial is not None and initial.mean is not None and initial.std is not None:
                mean, std = initial.mean, initial.std
            model = moco.MoCoV3(backbone, dim, mlp_dim=config.mlp_dim, dim=config.projection_dim, projector_layers=config.projector_layers)
        if initial is not None and initial.heads:
            _load_heads(model, initial)
        config = dataclasses.replace(config, embedding_dim=dim, mean=tuple(mean), std=tuple(std))
        model.to(device)
        optimizer = moco.build_optimizer(config.optimizer, model.trainable_parameters(), weight_decay)
        return cls(config=config, model=model, optimizer=optimizer, device=device)

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    def enable_loss_scaling(self) -> None:
        """fp16 training: a GradScaler (restored from the checkpoint when it had one)."""
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler(self.device.type)
            if self.saved_scaler_state:
                self.scaler.load_state_dict(self.saved_scaler_state)

    def compile(self) -> None:
        """torch.compile the two backbones in place (state dict names unchanged): worth it on
        GPUs, where the fused kernels outweigh the first steps' compilation."""
        self.model.backbone.compile()
        self.model.momentum_backbone.compile()

    def export_backbone(self) -> nn.Module:
        """A plain CPU copy of the backbone for export: no compiled wrapper, no device state."""
        backbone = moco.create_backbone(self.config.backbone)
        backbone.load_state_dict({k: v.detach().cpu() for k, v in self.model.backbone.state_dict().items()})
        return backbone.eval()

    def to_bytes(self, extra: dict[str, Any] | None = None, run: dict[str, Any] | None = None) -> bytes:
        blob = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "global_step": int(self.global_step),
            "iteration": int(self.iteration),
            "run": run,
            "extra": dict(extra or {}),
        }
        buffer = io.BytesIO()
        torch.save(blob, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, device: torch.device, weight_decay: float = 1e-6) -> "EncoderState":
        try:
            blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a corrupt or foreign file
            raise CheckpointError(f"unreadable checkpoint: {exc}") from exc
        if not isinstance(blob, dict) or blob.get("format") not in READABLE_FORMATS:
            raise CheckpointError(f"unsupported checkpoint format {blob.get('format') if isinstance(blob, dict) else type(blob)!r}")
        try:
            config = ModelConfig.from_dict(blob["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"bad model config in checkpoint: {exc}") from exc
        # Build the same architecture (the seed does not matter: every tensor is overwritten).
        model = _build(config, config.embedding_dim)
        try:
            model.load_state_dict(blob["model"])
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint weights do not fit {config.backbone}: {exc}") from exc
        model.to(device)
        optimizer = moco.build_optimizer(config.optimizer, model.trainable_parameters(), weight_decay)
        try:
            optimizer.load_state_dict(blob["optimizer"])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"optimizer state does not fit: {exc}") from exc
        return cls(
            config=config,
            model=model,
            optimizer=optimizer,
            device=device,
            global_step=int(blob.get("global_step", 0)),
            iteration=int(blob.get("iteration", 0)),
            run=blob.get("run"),
            saved_scaler_state=blob.get("scaler"),
        )


def _load_heads(model: moco.MoCoV3, initial: InitialWeights) -> None:
    """Projector, predictor and momentum encoder from `initial` (strict per part); a momentum
    part the source lacks starts as a copy of its base part, as MoCo does."""
    parts = {
        "projector": model.projector,
        "predictor": model.predictor,
        "momentum_backbone": model.momentum_backbone,
        "momentum_projector": model.momentum_projector,
    }
    for name, module in parts.items():
        state = initial.heads.get(name)
        if not state:
            continue
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise InitError("init_mismatch", f"{initial.source}: {name} does not fit: {str(exc)[:300]}") from exc
    if "momentum_backbone" not in initial.heads:
        model.momentum_backbone.load_state_dict(model.backbone.state_dict())
    if "momentum_projector" not in initial.heads:
        model.momentum_projector.load_state_dict(model.projector.state_dict())


def checkpoint_extra(data: bytes) -> dict[str, Any]:
    """The `extra` dict stored with a checkpoint (training summary), without building the model."""
    blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return dict(blob.get("extra", {})) if isinstance(blob, dict) else {}
