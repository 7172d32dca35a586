"""The reference: a minimal plain-PyTorch MoCo-v3 loop, the way one writes it in a notebook.

Base encoder (timm backbone + 2-layer projector) with a 2-layer predictor, a deep-copied momentum
encoder updated parameter by parameter, the symmetric InfoNCE loss scaled by 2T, torch's SGD with
momentum, and every image decoded into memory before the clock starts. It shares only the batched
two-view augmentation with the trainer (both pay the same for it), so the comparison isolates
what the trainer adds: streaming from storage with decode workers, LARS, schedules, metrics and
checkpoint bookkeeping.
"""

from __future__ import annotations

import copy
import time

import timm
import torch
import torch.nn.functional as F
from torch import nn

from services.trainer.moco import TwoViewAugment


def mlp(layers: int, dim_in: int, hidden: int, dim_out: int, last_bn: bool = True) -> nn.Sequential:
    blocks: list[nn.Module] = []
    for i in range(layers):
        a = dim_in if i == 0 else hidden
        b = dim_out if i == layers - 1 else hidden
        blocks.append(nn.Linear(a, b, bias=False))
        if i < layers - 1:
            blocks += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        elif last_bn:
            blocks.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*blocks)


class PlainMoCoV3(nn.Module):
    def __init__(self, backbone: str, image_size: int, mlp_dim: int, dim: int, temperature: float) -> None:
        super().__init__()
        self.base = timm.create_model(backbone, pretrained=False, num_classes=0)
        with torch.no_grad():
            width = self.base.eval()(torch.zeros(1, 3, image_size, image_size)).shape[1]
        self.base.train()
        self.base_head = mlp(2, width, mlp_dim, dim)
        self.predictor = mlp(2, dim, mlp_dim, dim, last_bn=False)
        self.momentum = copy.deepcopy(self.base)
        self.momentum_head = copy.deepcopy(self.base_head)
        for p in [*self.momentum.parameters(), *self.momentum_head.parameters()]:
            p.requires_grad = False
        self.temperature = temperature

    def contrastive(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        logits = q @ k.t() / self.temperature
        return F.cross_entropy(logits, torch.arange(q.shape[0])) * 2 * self.temperature

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> torch.Tensor:
        q1 = self.predictor(self.base_head(self.base(x1)))
        q2 = self.predictor(self.base_head(self.base(x2)))
        with torch.no_grad():
            for p, pm in zip([*self.base.parameters(), *self.base_head.parameters()], [*self.momentum.parameters(), *self.momentum_head.parameters()]):
                pm.mul_(m).add_(p.detach(), alpha=1 - m)
            k1 = self.momentum_head(self.momentum(x1))
            k2 = self.momentum_head(self.momentum(x2))
        return self.contrastive(q1, k2) + self.contrastive(q2, k1)


def run(images: torch.Tensor, backbone: str, image_size: int, batch: int, steps: int, mean, std, seed: int = 0) -> dict:
    """`steps` steps on uint8 images already in memory; returns images/s and the losses."""
    torch.manual_seed(seed)
    model = PlainMoCoV3(backbone, image_size, mlp_dim=1024, dim=256, temperature=0.2)
    params = [*model.base.parameters(), *model.base_head.parameters(), *model.predictor.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.6 * batch / 256, momentum=0.9, weight_decay=1e-6)
    augment = TwoViewAugment(image_size, mean, std)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    started = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(0, images.shape[0], (batch,), generator=generator)
        x1, x2 = augment(images[index], generator)
        loss = model(x1, x2, 0.99)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - started
    return {"steps": steps, "seconds": seconds, "images_per_second": steps * batch / seconds, "losses": losses}
