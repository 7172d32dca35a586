"""MoCo-v3 (Chen, Xie and He, 2021) for CNN backbones from timm.

The pieces the trainer composes: a base encoder (backbone + projection MLP) with a prediction MLP,
a momentum encoder (backbone + projection MLP) updated by EMA, the symmetric InfoNCE loss, the
cosine schedules of learning rate and momentum, LARS, and two-view augmentations applied to a
whole batch at once.

Distributed data parallel: keys are gathered across ranks by `gather_across_ranks` and the labels
of the InfoNCE loss are offset by the rank, exactly as in the reference implementation; with one
process both are no-ops, so the same code runs on a CPU and under torchrun. The augmentations run
on the batch tensor (on the GPU when training there) because per-image torchvision pipelines cost
several times the model's step on small images.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# Schedules: pure functions of training progress in [0, 1].


def _clamp_progress(progress: float) -> float:
    if math.isnan(progress):
        raise ValueError("progress is NaN")
    return min(1.0, max(0.0, float(progress)))


def momentum_at(progress: float, base_momentum: float) -> float:
    """EMA momentum of the key encoder: `base_momentum` at the start, rising along a half cosine
    to 1.0 at the end of training (MoCo-v3's `--moco-m-cos`)."""
    if not 0.0 <= base_momentum <= 1.0:
        raise ValueError(f"base_momentum must be in [0, 1], got {base_momentum}")
    p = _clamp_progress(progress)
    return 1.0 - (1.0 - base_momentum) * 0.5 * (1.0 + math.cos(math.pi * p))


def learning_rate_at(progress: float, peak_lr: float, warmup_fraction: float) -> float:
    """Linear warm-up to `peak_lr` over the first `warmup_fraction` of training, then a half
    cosine down to 0 at the end."""
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
    p = _clamp_progress(progress)
    if warmup_fraction > 0.0 and p < warmup_fraction:
        return peak_lr * p / warmup_fraction
    decay = (p - warmup_fraction) / (1.0 - warmup_fraction)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * decay))


def exploration_learning_rate(step: int, peak_lr: float, warmup_steps: int) -> float:
    """The paper's schedule, over a whole exploration rather than one iteration: a linear warm-up
    whose first step already trains (step 0 of `warmup_steps` runs at peak / warmup_steps), then a
    constant `peak_lr`. `step` counts the exploration's steps so far, so an iteration continues the
    schedule where the previous one stopped instead of warming up from 0 again."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step >= warmup_steps:
        return peak_lr
    return peak_lr * (step + 1) / warmup_steps


def scaled_learning_rate(base_lr: float, batch_size: int, world_size: int = 1) -> float:
    """The linear scaling rule of MoCo-v3: lr = base_lr * global batch / 256."""
    return base_lr * batch_size * world_size / 256.0


# ---------------------------------------------------------------------------------------------
# Distributed helpers: identities when torch.distributed is not initialised.


def rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def gather_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates `tensor` from every rank along dim 0 (rank order). Gradients do not flow
    through the gathered copies, which is what MoCo needs: only keys are gathered."""
    _, world = rank_and_world_size()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


# ---------------------------------------------------------------------------------------------
# Loss


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of MoCo-v3: each query's positive is the key at the same global batch index; every
    other key of the global batch is a negative. Scaled by 2T as in the reference code, so the
    gradient magnitude does not depend on the temperature."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    q = F.normalize(queries.float(), dim=1)
    k = F.normalize(gather_across_ranks(keys.float()), dim=1)
    logits = q @ k.t() / temperature
    rank, _ = rank_and_world_size()
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
    return F.cross_entropy(logits, labels) * (2.0 * temperature)


def symmetric_loss(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Each view's query predicts the other view's momentum key."""
    return info_nce(q1, k2, temperature) + info_nce(q2, k1, temperature)


# ---------------------------------------------------------------------------------------------
# Model


def build_mlp(num_layers: int, input_dim: int, hidden_dim: int, output_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo-v3's heads: Linear-BN-ReLU blocks, the last Linear followed by a BN without affine."""
    layers: list[nn.Module] = []
    for index in range(num_layers):
        dim_in = input_dim if index == 0 else hidden_dim
        dim_out = output_dim if index == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(dim_in, dim_out, bias=False))
        if index < num_layers - 1:
            layers.append(nn.BatchNorm1d(dim_out))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            # No affine parameters after the last layer: they would only rescale the embedding.
            layers.append(nn.BatchNorm1d(dim_out, affine=False))
    return nn.Sequential(*layers)


def create_backbone(name: str) -> nn.Module:
    """A timm backbone returning pooled features (no classifier), randomly initialised."""
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}")
    return timm.create_model(name, pretrained=False, num_classes=0)


def backbone_normalisation(backbone: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input mean and std the backbone family expects (ImageNet's unless timm says otherwise)."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
    return mean, std


@torch.no_grad()
def feature_dim(backbone: nn.Module, image_size: int) -> int:
    """Width of the backbone's pooled features at `image_size` (timm's num_features is not always
    the output width, e.g. MobileNetV3's conv head)."""
    was_training = backbone.training
    backbone.eval()
    try:
        device = next((p.device for p in backbone.parameters()), torch.device("cpu"))
        out = backbone(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        backbone.train(was_training)
    if out.dim() != 2:
        raise ValueError(f"backbone returns features of shape {tuple(out.shape)}, expected [batch, D]")
    return int(out.shape[1])


class MoCoV3(nn.Module):
    """Base encoder (backbone, projector), predictor, and the momentum copies of backbone and projector.

    The representation that is exported and evaluated is `backbone`'s pooled features.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, mlp_dim: int = 4096, dim: int = 256, projector_layers: int = 2) -> None:
        super().__init__()
        self.backbone = backbone
        # The reference code: 2-layer projector for ResNets (3 for ViTs), 2-layer predictor
        # ending without BN.
        self.projector = build_mlp(projector_layers, feature_dim, mlp_dim, dim)
        self.predictor = build_mlp(2, dim, mlp_dim, dim, last_bn=False)
        self.momentum_backbone = copy.deepcopy(backbone)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in self._momentum_parameters():
            p.requires_grad_(False)

    def _momentum_parameters(self):
        yield from self.momentum_backbone.parameters()
        yield from self.momentum_projector.parameters()

    def _paired_parameters(self):
        yield from zip(self.backbone.parameters(), self.momentum_backbone.parameters())
        yield from zip(self.projector.parameters(), self.momentum_projector.parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.projector.parameters(), *self.predictor.parameters()]

    @torch.no_grad()
    def update_momentum_encoder(self, momentum: float) -> None:
        base, ema = zip(*self._paired_parameters())
        # Fused over all tensors: one kernel launch per group instead of one per parameter.
        torch._foreach_mul_(ema, momentum)
        torch._foreach_add_(ema, base, alpha=1.0 - momentum)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, momentum: float, temperature: float) -> torch.Tensor:
        q1 = self.predictor(self.projector(self.backbone(view1)))
        q2 = self.predictor(self.projector(self.backbone(view2)))
        with torch.no_grad():
            self.update_momentum_encoder(momentum)
            k1 = self.momentum_projector(self.momentum_backbone(view1))
            k2 = self.momentum_projector(self.momentum_backbone(view2))
        return symmetric_loss(q1, q2, k1, k2, temperature)


# ---------------------------------------------------------------------------------------------
# Optimiser


class LARS(torch.optim.Optimizer):
    """LARS as in MoCo-v3's reference code: weight decay and the trust ratio apply to weight
    matrices and kernels only; biases and normalisation parameters (1-d) take plain momentum SGD.

    The update runs as multi-tensor (foreach) kernels: a ResNet-50 has 161 parameter tensors, and
    one launch per tensor and operation would cost several milliseconds per step on a GPU."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9, trust_coefficient: float = 0.001) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch's contract
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates: list[torch.Tensor] = [p.grad for p in params]
            scaled = [i for i, p in enumerate(params) if p.ndim > 1]
            if scaled:
                weights = [params[i] for i in scaled]
                grads = torch._foreach_add([updates[i] for i in scaled], weights, alpha=group["weight_decay"])
                param_norm = torch.stack(torch._foreach_norm(weights))
                update_norm = torch.stack(torch._foreach_norm(grads))
                one = torch.ones_like(param_norm)
                trust = torch.where(
                    param_norm > 0.0,
                    torch.where(update_norm > 0.0, group["trust_coefficient"] * param_norm / update_norm, one),
                    one,
                )
                torch._foreach_mul_(grads, list(trust.unbind()))
                for i, grad in zip(scaled, grads):
                    updates[i] = grad
            mus = []
            for p in params:
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mus.append(state["mu"])
            torch._foreach_mul_(mus, group["momentum"])
            torch._foreach_add_(mus, updates)
            torch._foreach_add_(params, mus, alpha=-group["lr"])
        return loss


# MoCo-v3's base learning rates (per 256 images) and weight decays: ResNet recipe with LARS,
# ViT recipe with AdamW.
OPTIMIZER_DEFAULTS = {"lars": {"base_lr": 0.6, "weight_decay": 1e-6}, "adamw": {"base_lr": 1.5e-4, "weight_decay": 0.1}}


def build_optimizer(name: str, parameters: Sequence[nn.Parameter], weight_decay: float) -> torch.optim.Optimizer:
    """"lars" for CNNs (MoCo-v3 and the paper), "adamw" for ViTs; the lr is set every step."""
    if name == "lars":
        return LARS(parameters, lr=0.0, weight_decay=weight_decay, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=0.0, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (lars, adamw)")


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------------------------------
# Augmentations


# RGB -> YIQ; a hue shift is a rotation of the chroma plane (I, Q).
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_GRAY = torch.tensor([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class ViewRecipe:
    """Probabilities of one view's stochastic transforms (BYOL's asymmetric pair, as in MoCo-v3)."""

    blur_p: float
    solarize_p: float


FIRST_VIEW = ViewRecipe(blur_p=1.0, solarize_p=0.0)
SECOND_VIEW = ViewRecipe(blur_p=0.1, solarize_p=0.2)


class _Draws:
    """Random draws for the rows [offset, offset + count) of a global batch of `total` images.

    Every rank of a data-parallel run draws the whole global batch from identically seeded
    generators and keeps its own rows, so an image at global position i is augmented the same way
    whether the run has one process or eight."""

    def __init__(self, generator: torch.Generator, total: int, offset: int, count: int) -> None:
        if offset < 0 or count < 1 or offset + count > total:
            raise ValueError(f"rows [{offset}, {offset + count}) outside a batch of {total}")
        self.generator, self.total, self.offset, self.count = generator, total, offset, count

    def rand(self, k: int = 1) -> torch.Tensor:
        values = torch.rand(self.total * k, generator=self.generator).view(self.total, k)
        rows = values[self.offset : self.offset + self.count]
        return rows[:, 0] if k == 1 else rows

    def uniform(self, low: float, high: float, k: int = 1) -> torch.Tensor:
        return low + (high - low) * self.rand(k)

    def coin(self, p: float, device: torch.device) -> torch.Tensor:
        return (self.rand() < p).to(device)

    def permutation(self, n: int) -> list[int]:
        """One order for the whole batch (torchvision's ColorJitter also draws one per call)."""
        return torch.randperm(n, generator=self.generator).tolist()


class TwoViewAugment:
    """MoCo-v3's two augmentation pipelines, sampled per image but applied to the whole batch.

    Per view: RandomResizedCrop(scale=(min_scale, 1), ratio 3/4-4/3), horizontal flip (0.5),
    colour jitter (0.4, 0.4, 0.2, 0.1) with probability 0.8, grayscale (0.2), Gaussian blur
    (view 1 always, view 2 with 0.1) and solarisation (view 2 with 0.2), then normalisation.
    Each operation matches torchvision.transforms.v2's functional op for the same parameters
    (tests/unit/test_trainer_augment.py checks it), except hue: torchvision shifts the HSV hue,
    here the YIQ chroma plane is rotated, its batched equivalent. The blur's sigma range (0.1-2.0
    at 224 px) scales with the output size so small images are blurred as much, relatively, as
    the reference ones. Randomness comes from `generator`, so a seeded generator reproduces a run;
    per-image torchvision pipelines in loader workers cost several times the model's step on small
    images, which is why the batch is augmented as one tensor (on the GPU when training there).
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], min_scale: float = 0.2) -> None:
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        self.image_size = image_size
        self.min_scale = min_scale
        self.mean = torch.tensor([float(m) for m in mean]).view(1, 3, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(1, 3, 1, 1)
        kernel = max(3, int(round(0.1 * image_size)))
        self.blur_kernel = kernel if kernel % 2 == 1 else kernel + 1
        scale = image_size / 224.0
        self.blur_sigma = (0.1 * scale, 2.0 * scale)

    def __call__(
        self,
        images: torch.Tensor,
        generator: torch.Generator,
        offset: int = 0,
        total: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (or [0, 1] float) images [B, 3, H, W] -> two normalised float views [B, 3, S, S].

        `images` are rows [offset, offset + B) of a global batch of `total` (default B) images."""
        b = images.shape[0]
        total = b if total is None else total
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        first = self.view(x, FIRST_VIEW, _Draws(generator, total, offset, b))
        second = self.view(x, SECOND_VIEW, _Draws(generator, total, offset, b))
        return first, second

    def view(self, x: torch.Tensor, recipe: ViewRecipe, draws: _Draws) -> torch.Tensor:
        b = x.shape[0]
        out = self._resized_crop(x, self._crop_boxes(draws, x.shape[2], x.shape[3]))
        flip = draws.coin(0.5, out.device)
        out = torch.where(flip.view(b, 1, 1, 1), out.flip(-1), out)
        out = self._colour_jitter(out, draws)
        gray = draws.coin(0.2, out.device)
        out = torch.where(gray.view(b, 1, 1, 1), _grayscale(out).expand_as(out), out)
        out = self._blur(out, recipe.blur_p, draws)
        if recipe.solarize_p > 0:
            solarize = draws.coin(recipe.solarize_p, out.device).view(b, 1, 1, 1)
            out = torch.where(solarize & (out >= 0.5), 1.0 - out, out)
        return (out - self.mean.to(out.device)) / self.std.to(out.device)

    def _crop_boxes(self, draws: _Draws, height: int, width: int) -> torch.Tensor:
        """torchvision's RandomResizedCrop.get_params, vectorised: 10 tries, else the whole image.
        Rows: (index, left, top, right, bottom) in pixels."""
        tries = 10
        b = draws.count
        area = float(height * width)
        target = area * draws.uniform(self.min_scale, 1.0, tries)
        log_ratio = draws.uniform(math.log(3 / 4), math.log(4 / 3), tries)
        ratio = torch.exp(log_ratio)
        w = torch.sqrt(target * ratio).round()
        h = torch.sqrt(target / ratio).round()
        ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
        first = torch.where(ok.any(dim=1), ok.float().argmax(dim=1), torch.full((b,), -1))
        rows = torch.arange(b)
        pick = first.clamp(min=0)
        w = torch.where(first >= 0, w[rows, pick], torch.full((b,), float(width)))
        h = torch.where(first >= 0, h[rows, pick], torch.full((b,), float(height)))
        top = torch.floor(draws.rand() * (height - h + 1))
        left = torch.floor(draws.rand() * (width - w + 1))
        return torch.stack([rows.float(), left, top, left + w, top + h], dim=1)

    def _resized_crop(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        b, _, height, width = x.shape
        left, top, right, bottom = boxes[:, 1], boxes[:, 2], boxes[:, 3], boxes[:, 4]
        # Box -> affine map of the output grid onto the crop (normalised coordinates, pixel
        # edges at -1 and 1); bilinear sampling, 3x cheaper than roi_align on a CPU.
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = (right - left) / width
        theta[:, 0, 2] = (left + right) / width - 1.0
        theta[:, 1, 1] = (bottom - top) / height
        theta[:, 1, 2] = (top + bottom) / height - 1.0
        grid = F.affine_grid(theta.to(x.device, x.dtype), [b, 3, self.image_size, self.image_size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _colour_jitter(self, x: torch.Tensor, draws: _Draws) -> torch.Tensor:
        b = x.shape[0]
        apply = draws.coin(0.8, torch.device("cpu"))
        ones = torch.ones(b)
        brightness = torch.where(apply, draws.uniform(0.6, 1.4), ones)
        contrast = torch.where(apply, draws.uniform(0.6, 1.4), ones)
        saturation = torch.where(apply, draws.uniform(0.8, 1.2), ones)
        hue = torch.where(apply, draws.uniform(-0.1, 0.1), torch.zeros(b))
        dev = x.device
        for op in draws.permutation(4):
            if op == 0:
                x = adjust_brightness(x, brightness.to(dev))
            elif op == 1:
                x = adjust_contrast(x, contrast.to(dev))
            elif op == 2:
                x = adjust_saturation(x, saturation.to(dev))
            else:
                x = _rotate_hue(x, hue.to(dev)).clamp(0, 1)
        return x

    def _blur(self, x: torch.Tensor, p: float, draws: _Draws) -> torch.Tensor:
        if p <= 0:
            return x
        apply = draws.coin(p, x.device)
        sigma = draws.uniform(*self.blur_sigma).to(x.device)
        blurred = gaussian_blur(x, self.blur_kernel, sigma)
        return torch.where(apply.view(-1, 1, 1, 1), blurred, x)


# Per-image colour and blur operations on [B, 3, H, W] floats in [0, 1], one factor per image.


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    c = factor.view(-1, 1, 1, 1)
    return (c * x + (1 - c) * mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    s = factor.view(-1, 1, 1, 1)
    return (s * x + (1 - s) * _grayscale(x)).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding, one sigma per image (torchvision's
    gaussian_blur, batched)."""
    b, c, h, w = x.shape
    k = kernel_size
    offsets = torch.arange(k, device=x.device, dtype=x.dtype) - (k - 1) / 2
    kernel = torch.exp(-(offsets.view(1, k) ** 2) / (2 * sigma.to(x.dtype).view(b, 1) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = kernel.repeat_interleave(c, dim=0)  # one kernel per (image, channel) group
    pad = k // 2
    flat = x.reshape(1, b * c, h, w)
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kernel.view(b * c, 1, 1, k), groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), kernel.view(b * c, 1, k, 1), groups=b * c)
    return flat.view(b, c, h, w)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    return (x * _GRAY.to(x.device, x.dtype).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


def _rotate_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Shifts hue by `hue` turns (per image) by rotating the YIQ chroma plane."""
    b = x.shape[0]
    to_yiq = _RGB_TO_YIQ.to(x.device, x.dtype)
    from_yiq = torch.linalg.inv(to_yiq)
    angle = hue.to(x.dtype) * 2 * math.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(b, 3, 3, device=x.device, dtype=x.dtype)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1] = cos
    rotation[:, 1, 2] = -sin
    rotation[:, 2, 1] = sin
    rotation[:, 2, 2] = cos
    matrix = from_yiq @ rotation @ to_yiq
    return torch.einsum("bij,bjhw->bihw", matrix, x)
