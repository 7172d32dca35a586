"""Representation quality on the target's labelled split: embeddings and k-NN accuracy.

Labels exist only for the evaluation split, so the k-NN classifier is leave-one-out over that
split: each image is classified by its k nearest other images. Votes are weighted by
exp(cosine / 0.07), the usual k-NN protocol of self-supervised papers (InstDisc, DINO).
The linear probe comes later.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

KNN_TEMPERATURE = 0.07


@torch.no_grad()
def embed(
    backbone: torch.nn.Module,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int = 128,
) -> torch.Tensor:
    """uint8 images [N, 3, S, S] -> L2-normalised features [N, D] on the CPU, computed exactly as
    the exported graph does (scale, normalise, eval-mode backbone, L2)."""
    was_training = backbone.training
    backbone.eval()
    mean_t = torch.tensor([float(m) for m in mean], device=device).view(1, 3, 1, 1)
    std_t = torch.tensor([float(s) for s in std], device=device).view(1, 3, 1, 1)
    out = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device).float() / 255.0
            features = backbone((x - mean_t) / std_t).float()
            out.append(F.normalize(features, dim=1).cpu())
    finally:
        backbone.train(was_training)
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)


def knn_top1(features: torch.Tensor, labels: torch.Tensor, k: int = 20, temperature: float = KNN_TEMPERATURE, chunk: int = 1024) -> float:
    """Leave-one-out weighted k-NN top-1 accuracy of L2-normalised `features` [N, D] with integer
    `labels` [N]. Needs at least 2 images."""
    n = features.shape[0]
    if n < 2:
        raise ValueError("k-NN accuracy needs at least 2 labelled images")
    if labels.shape[0] != n:
        raise ValueError("features and labels differ in length")
    k = max(1, min(k, n - 1))
    classes = int(labels.max()) + 1
    correct = 0
    for start in range(0, n, chunk):
        block = features[start : start + chunk]
        similarity = block @ features.t()
        rows = torch.arange(block.shape[0])
        similarity[rows, rows + start] = -float("inf")  # leave the image itself out
        top, index = similarity.topk(k, dim=1)
        weights = torch.exp(top / temperature)
        votes = torch.zeros(block.shape[0], classes).scatter_add_(1, labels[index], weights)
        correct += int((votes.argmax(dim=1) == labels[start : start + chunk]).sum())
    return correct / n
