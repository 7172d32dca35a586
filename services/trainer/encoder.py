"""An exploration's encoder: its fixed architecture, its trainable state, and its checkpoint format.

The architecture (`ModelConfig`) is decided once, when the exploration is created, and travels in
every checkpoint, so later iterations rebuild the same network whatever the trainer's current
settings say. A checkpoint is one `torch.save` blob of plain containers and tensors, loaded with
`weights_only=True`: a checkpoint read from the object store can never run code.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import Any

import torch

from services.trainer import moco

CHECKPOINT_FORMAT = 1
SUPPORTED_INITS = ("random",)


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
    # Filled in by `EncoderState.create` from the backbone: input normalisation and feature width.
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    embedding_dim: int = 0

    def __post_init__(self) -> None:
        if self.init not in SUPPORTED_INITS:
            # Never fall back to a random start: an exploration asked for something else.
            raise ValueError(f"unsupported encoder init {self.init!r} (supported: {', '.join(SUPPORTED_INITS)})")
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

    @classmethod
    def create(cls, config: ModelConfig, device: torch.device, weight_decay: float = 1e-6) -> "EncoderState":
        """A fresh encoder, initialised deterministically from `config.seed`."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            backbone = moco.create_backbone(config.backbone)
            dim = moco.feature_dim(backbone, config.image_size)
            mean, std = moco.backbone_normalisation(backbone)
            model = moco.MoCoV3(backbone, dim, mlp_dim=config.mlp_dim, dim=config.projection_dim, projector_layers=config.projector_layers)
        config = dataclasses.replace(config, embedding_dim=dim, mean=mean, std=std)
        model.to(device)
        optimizer = moco.build_optimizer(config.optimizer, model.trainable_parameters(), weight_decay)
        return cls(config=config, model=model, optimizer=optimizer, device=device)

    @property
    def backbone(self) -> torch.nn.Module:
        return self.model.backbone

    def to_bytes(self, extra: dict[str, Any] | None = None) -> bytes:
        blob = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "global_step": int(self.global_step),
            "iteration": int(self.iteration),
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
        if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"unsupported checkpoint format {blob.get('format') if isinstance(blob, dict) else type(blob)!r}")
        try:
            config = ModelConfig.from_dict(blob["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"bad model config in checkpoint: {exc}") from exc
        # Build the same architecture (the seed does not matter: every tensor is overwritten).
        backbone = moco.create_backbone(config.backbone)
        model = moco.MoCoV3(backbone, config.embedding_dim, mlp_dim=config.mlp_dim, dim=config.projection_dim, projector_layers=config.projector_layers)
        try:
            model.load_state_dict(blob["model"])
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint weights do not fit {config.backbone}: {exc}") from exc
        model.to(device)
        optimizer = moco.build_optimizer(config.optimizer, model.trainable_parameters(), weight_decay)
        optimizer.load_state_dict(blob["optimizer"])
        return cls(
            config=config,
            model=model,
            optimizer=optimizer,
            device=device,
            global_step=int(blob.get("global_step", 0)),
            iteration=int(blob.get("iteration", 0)),
        )


def checkpoint_extra(data: bytes) -> dict[str, Any]:
    """The `extra` dict stored with a checkpoint (training summary), without building the model."""
    blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return dict(blob.get("extra", {})) if isinstance(blob, dict) else {}
