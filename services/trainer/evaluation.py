"""Representation quality on the target's labelled images: embeddings, k-NN accuracy, linear probe.

The paper's protocol (`score_splits`): the classifier is fitted on the target's labelled **train**
split and scored on its **test** split (the `eval/` images, which are never trained on); the labels
of the train split come from a file that self-supervised training never reads. k-NN uses the train
features as its memory bank; the linear probe is fitted on the train features. Before/after
comparisons are paired on the same test images (`paired_bootstrap`), and `measurability` says
whether a split pair can show a change at all and how small a change it can show.

A target with labels on its test split only falls back to estimates within that split:
- k-NN is leave-one-out: each image is classified by its k nearest other images, votes weighted
  by exp(cosine / 0.07), the usual protocol of self-supervised papers (InstDisc, DINO);
- the linear probe is a multinomial logistic regression on frozen, standardised features
  (L-BFGS, L2 penalty), scored by stratified k-fold cross-validation: every image is predicted by
  a probe that never saw it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

KNN_TEMPERATURE = 0.07
PROBE_FOLDS = 5
PROBE_L2 = 1e-3
BOOTSTRAP_RESAMPLES = 10_000
# A class needs this many images in each split to be learnt and tested.
MIN_IMAGES_PER_CLASS = 3


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
        predicted = _weighted_vote(similarity, labels, k, temperature, classes)
        correct += int((predicted == labels[start : start + chunk]).sum())
    return correct / n


def _weighted_vote(similarity: torch.Tensor, bank_labels: torch.Tensor, k: int, temperature: float, classes: int) -> torch.Tensor:
    """Label of each row of `similarity` [M, N] (to the N images of `bank_labels`): the vote of its
    k most similar images, each weighted by exp(cos / temperature)."""
    top, index = similarity.topk(k, dim=1)
    weights = torch.exp(top / temperature)
    votes = torch.zeros(similarity.shape[0], classes, dtype=weights.dtype).scatter_add_(1, bank_labels[index], weights)
    return votes.argmax(dim=1)


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
        predicted = _probe(x[train], labels[train], x[test], l2, classes)
        correct += int((predicted == labels[test]).sum())
    return correct / n


# ---------------------------------------------------------------------------------------------
# The paper's protocol: fitted on the target's labelled train split, scored on its test split.


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int = 20, temperature: float = KNN_TEMPERATURE, classes: int = 0) -> torch.Tensor:
    """Weighted k-NN labels of `queries` [M, D] against the memory bank `bank` [N, D] (both
    L2-normalised) with integer `bank_labels` [N]; votes weighted by exp(cos / temperature)."""
    if bank.shape[0] == 0:
        raise ValueError("k-NN needs a non-empty memory bank")
    if bank_labels.shape[0] != bank.shape[0]:
        raise ValueError("bank and bank_labels differ in length")
    k = max(1, min(k, bank.shape[0]))
    classes = max(classes, int(bank_labels.max()) + 1)
    return _weighted_vote(queries @ bank.t(), bank_labels, k, temperature, classes)


def probe_predict(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, l2: float = PROBE_L2, classes: int = 0) -> torch.Tensor:
    """Labels of `test` from a linear probe (multinomial logistic regression on features
    standardised with the train split's statistics) fitted on `train` / `train_labels`."""
    if train.shape[0] < 2:
        raise ValueError("a linear probe needs at least 2 training images")
    classes = max(classes, int(train_labels.max()) + 1)
    return _probe(train.float(), train_labels, test.float(), l2, classes)


def _probe(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, l2: float, classes: int) -> torch.Tensor:
    """Standardise with the train rows' statistics, fit the probe on them, label the test rows."""
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, keepdim=True, unbiased=False).clamp_min(1e-6)
    weight, bias = fit_linear_probe((train - mean) / std, train_labels, classes, l2)
    return (((test - mean) / std) @ weight.t() + bias).argmax(dim=1)


@dataclass(frozen=True)
class SplitScores:
    """Per test image: was it classified right (k-NN; linear probe, None when not run)."""

    knn_correct: torch.Tensor  # bool [M]
    probe_correct: torch.Tensor | None = None

    @property
    def knn_top1(self) -> float:
        return float(self.knn_correct.float().mean()) if self.knn_correct.numel() else float("nan")

    @property
    def probe_top1(self) -> float:
        if self.probe_correct is None or not self.probe_correct.numel():
            return float("nan")
        return float(self.probe_correct.float().mean())


def score_splits(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    probe: bool = True,
) -> SplitScores:
    """k-NN (the train split's features are the memory bank) and linear probe (fitted on the
    train split), both scored on the test split: the paper's protocol."""
    classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    knn = knn_predict(train_features, train_labels, test_features, k=k, classes=classes) == test_labels
    probed = probe_predict(train_features, train_labels, test_features, classes=classes) == test_labels if probe else None
    return SplitScores(knn, probed)


@dataclass(frozen=True)
class Measurability:
    measurable: bool
    reason: str  # why not, or "" when measurable
    classes: int  # classes present in both splits
    test_images: int
    # Smallest before/after difference whose paired 95% interval can exclude 0 on this test split
    # (every changed image changing the same way); 1.0 or more: nothing can be shown.
    detectable_difference: float


def measurability(train_labels: Sequence[str], test_labels: Sequence[str], min_per_class: int = MIN_IMAGES_PER_CLASS) -> Measurability:
    """Can accuracy on this split pair move at all, and by how little can a change be shown?
    Needs at least two classes with `min_per_class` images in each split, and every test image's
    class present in the train split (otherwise it can never be classified right)."""
    train_counts, test_counts = Counter(train_labels), Counter(test_labels)
    both = [c for c in test_counts if train_counts.get(c, 0) >= min_per_class and test_counts[c] >= min_per_class]
    n = len(test_labels)
    detectable = detectable_difference(n) if n else float("inf")
    if len(both) < 2:
        reason = f"fewer than 2 classes with >= {min_per_class} images in both the train and the test split ({len(both)})"
        return Measurability(False, reason, len(both), n, detectable)
    orphans = sum(count for c, count in test_counts.items() if c not in train_counts)
    if orphans:
        return Measurability(False, f"{orphans} test images belong to classes absent from the train split", len(both), n, detectable)
    if detectable >= 1.0:
        return Measurability(False, f"{n} test images cannot show any difference at 95%", len(both), n, detectable)
    return Measurability(True, "", len(both), n, detectable)


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "level": self.level}


def paired_bootstrap(before: torch.Tensor, after: torch.Tensor, resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of mean(after) - mean(before) over the same test images.

    `before` and `after` are per-image scores (correct = 1) of shape [M] or [S, M] (S runs, e.g.
    seeds, on the same M test images): images are resampled, the S runs are averaged, so the
    interval covers both the test split's sampling and the runs' spread."""
    a = after.float().reshape(-1, after.shape[-1]) if after.dim() > 1 else after.float().unsqueeze(0)
    b = before.float().reshape(-1, before.shape[-1]) if before.dim() > 1 else before.float().unsqueeze(0)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError("before and after are not scored on the same test images")
    if a.shape[-1] == 0:
        raise ValueError("no test images")
    per_image = (a.mean(dim=0) - b.mean(dim=0)).double()  # [M]
    m = per_image.numel()
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, m, (resamples, m), generator=generator)
    stats = per_image[index].mean(dim=1)
    alpha = (1.0 - level) / 2.0
    low, high = torch.quantile(stats, torch.tensor([alpha, 1.0 - alpha], dtype=stats.dtype)).tolist()
    return Interval(float(per_image.mean()), float(low), float(high), level)


def detectable_difference(test_images: int, level: float = 0.95) -> float:
    """The smallest accuracy difference a paired bootstrap interval on `test_images` images can
    separate from 0: c images changing from wrong to right (none the other way) give a difference
    of c / n whose interval excludes 0 once a resample misses all c with probability below
    (1 - level) / 2, i.e. (1 - c/n)^n < (1 - level) / 2."""
    n = int(test_images)
    if n <= 0:
        return float("inf")
    alpha = (1.0 - level) / 2.0
    for changed in range(1, n + 1):
        if (1.0 - changed / n) ** n < alpha:
            return changed / n
    return 1.0
