"""The distribution an iteration's queries were drawn from, kept for TopConcepts and for analysis.

Each iteration stores `explorations/<id>/iterations/<n>/distribution.npz` in S3: the posterior mean and
standard deviation and the sampling probability of every concept of the pool (float arrays, for
analysis of how the exploration's beliefs moved), plus the best rows with their keys, names and
embedded texts so that TopConcepts can answer after a restart without rebuilding the pool.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from services.planner.planning import Plan, Pool


@dataclass
class Distribution:
    """Rows of a pool (all of them in memory, the best ones once read back) with their scores."""

    iteration: int
    keys: list[str]
    names: list[str]
    texts: list[str]
    is_label: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    probabilities: np.ndarray
    method: str
    observations: int
    size: int  # concepts in the pool, even when only the best rows are held

    def ranked(self, limit: int) -> np.ndarray:
        """Row indices by sampling probability, then predicted reward."""
        return np.lexsort((-self.mean, -self.probabilities))[:limit]


def from_plan(iteration: int, pool: Pool, plan: Plan) -> Distribution:
    P = len(pool)
    posterior = plan.posterior
    return Distribution(
        iteration=iteration,
        keys=pool.keys,
        names=pool.names,
        texts=pool.texts,
        is_label=pool.is_label,
        mean=posterior.mean if posterior is not None else np.zeros(P, np.float32),
        std=posterior.std if posterior is not None else np.zeros(P, np.float32),
        probabilities=np.asarray(plan.probabilities, dtype=np.float64),
        method=plan.method,
        observations=plan.observations_used,
        size=P,
    )


def encode(d: Distribution, rows: int) -> bytes:
    top = d.ranked(rows)
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        mean=d.mean.astype(np.float32),
        std=d.std.astype(np.float32),
        probabilities=d.probabilities.astype(np.float64),
        is_label=np.asarray(d.is_label, dtype=bool),
        top_rows=top.astype(np.int64),
        top_keys=np.array([d.keys[i] for i in top], dtype=str),
        top_names=np.array([d.names[i] for i in top], dtype=str),
        top_texts=np.array([d.texts[i] for i in top], dtype=str),
        meta=np.array([d.iteration, d.observations, d.size], dtype=np.int64),
        method=np.array(d.method),
    )
    return buffer.getvalue()


def decode(data: bytes) -> Distribution:
    """The stored best rows (in rank order) as a Distribution."""
    z = np.load(io.BytesIO(data), allow_pickle=False)
    top = z["top_rows"]
    iteration, observations, size = (int(v) for v in z["meta"])
    return Distribution(
        iteration=iteration,
        keys=[str(k) for k in z["top_keys"]],
        names=[str(k) for k in z["top_names"]],
        texts=[str(k) for k in z["top_texts"]],
        is_label=z["is_label"][top],
        mean=z["mean"][top],
        std=z["std"][top],
        probabilities=z["probabilities"][top],
        method=str(z["method"]),
        observations=observations,
        size=size,
    )
