"""Turning concept scores into the next query distribution (the paper's section 3.4).

Pure functions of numpy arrays, so they are tested against the paper's rules directly:
softmax with a temperature chosen so that (max - min) / tau equals `spread` (3 in the paper), then
tiering: the best `tiers[0]` concepts share `masses[0]` of the probability, the next `tiers[1]`
share `masses[1]`, and the rest share the remainder.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PAPER_SPREAD = 3.0
PAPER_TIERS = (250, 750)
PAPER_MASSES = (0.8, 0.1, 0.1)


def masses_problem(masses: Sequence[float], tiers: Sequence[int] = PAPER_TIERS) -> str | None:
    """What is wrong with `masses` as the shares of `tiers` (one more than the tiers, each in [0, 1],
    summing to 1), or None."""
    if len(masses) != len(tiers) + 1 or any(not 0 <= m <= 1 for m in masses) or abs(sum(masses) - 1.0) > 1e-6:
        return f"{len(tiers) + 1} shares between 0 and 1 that sum to 1, got {','.join(map(str, masses))}"
    return None


def temperature(scores: np.ndarray, spread: float = PAPER_SPREAD) -> float:
    span = float(np.max(scores) - np.min(scores)) if scores.size else 0.0
    return span / spread if span > 0 else 1.0


def softmax(scores: np.ndarray, tau: float) -> np.ndarray:
    z = (scores - np.max(scores)) / tau
    p = np.exp(z)
    return p / p.sum()


def tiered(scores: np.ndarray, probs: np.ndarray, tiers: Sequence[int] = PAPER_TIERS, masses: Sequence[float] = PAPER_MASSES) -> np.ndarray:
    """Rescales `probs` so each tier of the ranking by `scores` holds its mass.

    Within a tier, concepts keep their softmax proportions. When the vocabulary is smaller than
    the tiers, the masses of the tiers that exist are renormalised.
    """
    if len(masses) != len(tiers) + 1:
        raise ValueError("masses must have one more entry than tiers")
    order = np.argsort(-scores, kind="stable")
    out = np.zeros_like(probs, dtype=np.float64)
    bounds = np.cumsum([0, *tiers, max(0, scores.size - sum(tiers))])
    used_mass = 0.0
    for i, mass in enumerate(masses):
        members = order[min(bounds[i], scores.size) : min(bounds[i + 1], scores.size)]
        if members.size == 0:
            continue
        tier_probs = probs[members].astype(np.float64)
        total = tier_probs.sum()
        out[members] = mass * (tier_probs / total if total > 0 else np.full(members.size, 1.0 / members.size))
        used_mass += mass
    return out / used_mass


def next_distribution(scores: np.ndarray, spread: float = PAPER_SPREAD, tiers: Sequence[int] = PAPER_TIERS, masses: Sequence[float] = PAPER_MASSES) -> np.ndarray:
    tau = temperature(scores, spread)
    return tiered(scores, softmax(scores, tau), tiers, masses)


def uniform(n: int) -> np.ndarray:
    return np.full(n, 1.0 / n)


def sample(probs: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draws n distinct concept indices when possible (a query per concept per iteration)."""
    support = int(np.count_nonzero(probs))
    if n <= support:
        return rng.choice(probs.size, size=n, replace=False, p=probs)
    # More queries than concepts: every concept once, the rest drawn again by probability.
    base = np.flatnonzero(probs)
    extra = rng.choice(probs.size, size=n - support, replace=True, p=probs)
    return np.concatenate([rng.permutation(base), extra])
