"""Representation quality on the target's labelled split: embeddings, k-NN accuracy, linear probe.

Labels exist only for the evaluation split (they are never used for training), so both
classifiers are fitted and tested within it:
- k-NN is leave-one-out: each image is classified by its k nearest other images, votes weighted
  by exp(cosine / 0.07), the usual protocol of self-supervised papers (InstDisc, DINO);
- the linear probe is a multinomial logistic regression on frozen, standardised features
  (L-BFGS, L2 penalty), scored by stratified k-fold cross-validation: every image is predicted by
  a probe that never saw it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

KNN_TEMPERATURE = 0.07
PROBE_FOLDS = 5
PROBE_L2 = 1e-3


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


def stratified_folds(labels: torch.Tensor, folds: int, seed: int = 0) -> torch.Tensor:
    """Fold index of every image: each class's images, shuffled with `seed`, dealt round-robin,
    so every fold holds a share of every class with at least `folds` images."""
    generator = torch.Generator().manual_seed(seed)
    fold_of = torch.empty_like(labels)
    start = 0
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        # Continue the deal where the previous class stopped, so small classes spread too.
        fold_of[members] = (torch.arange(members.numel()) + start) % folds
        start += members.numel()
    return fold_of


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, l2: float = PROBE_L2, max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [C, D], bias [C]) of a multinomial logistic regression: mean cross-entropy plus
    l2 / 2 * |W|^2, minimised by L-BFGS with a strong-Wolfe line search (deterministic)."""
    weight = torch.zeros(classes, features.shape[1], dtype=features.dtype, requires_grad=True)
    bias = torch.zeros(classes, dtype=features.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-6)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.t() + bias, labels) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def linear_probe_top1(features: torch.Tensor, labels: torch.Tensor, folds: int = PROBE_FOLDS, l2: float = PROBE_L2, seed: int = 0) -> float:
    """Cross-validated top-1 accuracy of a linear probe on `features` [N, D] with integer
    `labels` [N] (needs at least 2 images and 2 folds' worth of data)."""
    n = features.shape[0]
    if n < 2:
        raise ValueError("a linear probe needs at least 2 labelled images")
    if labels.shape[0] != n:
        raise ValueError("features and labels differ in length")
    folds = max(2, min(folds, n))
    classes = int(labels.max()) + 1
    fold_of = stratified_folds(labels, folds, seed)
    x = features.float()
    correct = 0
    for fold in range(folds):
        test = fold_of == fold
        train = ~test
        if not bool(test.any()) or not bool(train.any()):
            continue
        mean = x[train].mean(dim=0, keepdim=True)
        std = x[train].std(dim=0, keepdim=True, unbiased=False).clamp_min(1e-6)
        weight, bias = fit_linear_probe((x[train] - mean) / std, labels[train], classes, l2)
        predicted = (((x[test] - mean) / std) @ weight.t() + bias).argmax(dim=1)
        correct += int((predicted == labels[test]).sum())
    return correct / n
