"""Reward aggregation shared by the scorer (which publishes it) and the planner (which learns from it)."""

from __future__ import annotations

from typing import Iterable

import numpy as np

PAPER_CONCEPT_TOP = 10


def concept_reward(image_rewards: Iterable[float], top: int = PAPER_CONCEPT_TOP) -> float:
    """Mean of the `top` best image rewards of a query (the paper's concept reward).

    A query that produced no scored image gets 0.0: it found nothing usable, which is itself a
    (poor) outcome the reward model should learn from.
    """
    values = np.fromiter(image_rewards, dtype=np.float64)
    if values.size == 0:
        return 0.0
    if values.size > top:
        values = np.partition(values, values.size - top)[-top:]
    return float(values.mean())
