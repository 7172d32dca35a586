"""Rewards of the paper (section 3.3): image reward = mean cosine similarity to the k nearest
target embeddings; concept reward = mean of a query's top image rewards.

Pure numpy on purpose: the scorer never imports torch (the encoder runs in Triton), and a
[chunk, M] similarity matrix followed by a partial sort is all the work there is.
"""

from __future__ import annotations

import numpy as np

# The concept reward is shared with the planner, which aggregates ImageScored events into it;
# re-exported here so that both rewards of the paper can be found in one place.
from services.common.rewards import PAPER_CONCEPT_TOP as DEFAULT_CONCEPT_TOP
from services.common.rewards import concept_reward

DEFAULT_K = 15
# Largest similarity block computed at once (float32 elements, 64 MiB): bounds memory whatever
# the number of images or the size of the target bank.
_MAX_BLOCK_ELEMENTS = 16 * 1024 * 1024
_EPS = 1e-12


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, _EPS)


def knn_rewards(
    image_emb: np.ndarray,
    target_bank: np.ndarray,
    k: int = DEFAULT_K,
    *,
    chunk_rows: int | None = None,
) -> np.ndarray:
    """Reward of each image: mean cosine similarity to its k nearest target embeddings.

    image_emb [N, D], target_bank [M, D] -> float32 [N]. Both sides are normalised here, so the
    result is a cosine similarity even if a caller passes raw features; k is clipped to M (a
    target smaller than k rewards against all of it). Rows are processed in chunks so the
    [chunk, M] similarity block stays under a fixed memory budget.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    images = np.asarray(image_emb)
    bank = np.asarray(target_bank)
    if images.ndim != 2 or bank.ndim != 2:
        raise ValueError(f"expected 2-D arrays, got image_emb {images.shape} and target_bank {bank.shape}")
    if bank.shape[0] == 0:
        raise ValueError("target bank is empty")
    if images.shape[1] != bank.shape[1]:
        raise ValueError(f"embedding dimensions differ: images {images.shape[1]}, target bank {bank.shape[1]}")
    n, m = images.shape[0], bank.shape[0]
    k = min(k, m)
    out = np.empty(n, dtype=np.float32)
    if n == 0:
        return out
    images = l2_normalise(images)
    bank_t = np.ascontiguousarray(l2_normalise(bank).T)
    rows = chunk_rows if chunk_rows is not None else max(1, _MAX_BLOCK_ELEMENTS // m)
    if rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    for start in range(0, n, rows):
        sims = images[start : start + rows] @ bank_t  # [c, M]
        if k < m:
            # A partial sort suffices: the mean needs the k largest values, not their order.
            nearest = np.partition(sims, m - k, axis=1)[:, m - k :]
        else:
            nearest = sims
        # Accumulate in float64: k similarities of similar size, but cheap insurance.
        out[start : start + rows] = nearest.mean(axis=1, dtype=np.float64)
    return out


__all__ = ["DEFAULT_CONCEPT_TOP", "DEFAULT_K", "concept_reward", "knn_rewards", "l2_normalise"]
