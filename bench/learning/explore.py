"""The exploration loop of the paper in one process, for the learning benchmark.

The services run this loop across processes (planner -> crawler -> dedup -> scorer -> trainer);
here the same library code runs it in a loop so that every arm of the benchmark gets exactly the
same training compute and nothing but the choice of web images differs:

- planning: `services.planner.planning.make_plan` over the WordNet vocabulary (or the label-guided
  pool), the Gaussian process and the paper's sampling;
- search: the search service's caption index over the offline web (MiniLM + exact cosine), top-K
  images per query;
- dedup: an image already collected by this exploration is not a new candidate (ids of the corpus);
- reward: the scorer's rule (mean cosine similarity to the k = 15 nearest target train images) with
  the current encoder; concept reward = mean of a query's top-10 image rewards;
- replay: the top half of each round's new images by reward;
- training: `services.trainer.training.train` on the round's candidates plus twice as many images
  from the replay buffer and the target's train split.

Labels never enter the loop except in the label-guided mode (`labels`), where the class names
guide the vocabulary as the paper's label-set variant does; the evaluation split never enters it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from services.common.rewards import concept_reward
from services.planner import planning
from services.scorer.rewards import knn_rewards
from services.trainer.evaluation import Interval


# The offline web as the loop sees it: query texts, k -> the corpus rows each query found.
Search = Callable[[list[str], int], list[list[int]]]


@dataclass
class RoundLog:
    round: int
    queries: int
    hits: int
    new_images: int
    mean_concept_reward: float
    top_concepts: list[str]


@dataclass
class Explorer:
    """State of one in-process exploration (one arm, one seed)."""

    mode: str  # "ie" | "labels" | "uniform"
    pool: planning.Pool
    search: Search
    queries_per_round: int
    images_per_query: int
    seed: int
    reward_model: planning.RewardModel
    rewards: dict[str, list[float]] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)
    replay: list[int] = field(default_factory=list)
    log: list[RoundLog] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def plan(self) -> planning.Plan:
        return planning.make_plan(self.pool, self.rewards, mode=self.mode, queries=self.queries_per_round, rng=self.rng, reward_model=self.reward_model)

    def collect(self, embed_rows: Callable[[list[int]], np.ndarray], target_bank: np.ndarray) -> list[int]:
        """One round of plan -> search -> dedup -> reward; returns the new candidate rows."""
        plan = self.plan()
        concepts = [self.pool.keys[i] for i in plan.picks]
        texts = [self.pool.names[i] for i in plan.picks]
        results = self.search(texts, self.images_per_query)
        rows = sorted({r for hits in results for r in hits})
        reward_of = dict(zip(rows, knn_rewards(embed_rows(rows), target_bank).tolist())) if rows else {}
        for concept, hits in zip(concepts, results):
            self.rewards.setdefault(concept, []).append(concept_reward(reward_of[r] for r in hits))
        new = [r for r in rows if r not in self.seen]
        self.seen.update(new)
        ranked = sorted(new, key=lambda r: -reward_of[r])
        self.replay.extend(ranked[: len(ranked) // 2])
        by_concept = sorted(((np.mean(v), k) for k, v in self.rewards.items()), reverse=True)[:5]
        self.log.append(
            RoundLog(
                round=len(self.log) + 1,
                queries=len(concepts),
                hits=sum(len(h) for h in results),
                new_images=len(new),
                mean_concept_reward=float(np.mean([self.rewards[c][-1] for c in concepts])) if concepts else 0.0,
                top_concepts=[self.pool.names[self.pool.index[k]] for _, k in by_concept],
            )
        )
        return new


def training_rows(candidates: Sequence[int], replay_and_target: Sequence[int], ratio: float, rng: random.Random) -> list[int]:
    """The paper's training set of an iteration: the candidates plus `ratio` x as many images
    drawn (without replacement while the pool lasts) from the replay buffer and the target."""
    want = int(round(ratio * len(candidates)))
    pool = list(replay_and_target)
    drawn: list[int] = []
    while want > 0 and pool:
        take = min(want, len(pool))
        drawn.extend(rng.sample(pool, take))
        want -= take
    return list(candidates) + drawn


def reward_auc(rewards: np.ndarray, relevant: np.ndarray) -> float:
    """ROC AUC of `rewards` against boolean `relevant` (Mann-Whitney, ties counted half)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    positives, negatives = int(relevant.sum()), int((~relevant).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    values, inverse, counts = np.unique(rewards, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0  # 1-based mean rank of each distinct value
    ranks = average_rank[inverse]
    return float((ranks[relevant].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def auc_difference(before: np.ndarray, after: Sequence[np.ndarray], relevant: np.ndarray, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> Interval:
    """Paired bootstrap interval of mean_s AUC(after_s) - AUC(before) over the same sampled web
    images (resampled together, so the interval covers the sample; the runs are averaged)."""
    relevant = np.asarray(relevant, dtype=bool)
    rng = np.random.default_rng(seed)
    n = len(relevant)

    def stat(index: np.ndarray) -> float:
        base = reward_auc(before[index], relevant[index])
        return float(np.mean([reward_auc(a[index], relevant[index]) for a in after]) - base)

    observed = stat(np.arange(n))
    draws = np.array([stat(rng.integers(0, n, n)) for _ in range(resamples)])
    draws = draws[np.isfinite(draws)]
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(draws, [alpha, 1.0 - alpha])
    return Interval(observed, float(low), float(high), level)


def to_tensor(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
