"""The in-process exploration loop of bench.learning: training sets, reward AUC, one round of
plan -> search -> reward -> replay on a small pool, and the summary's intervals and goal."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from bench.learning import explore
from bench.learning.__main__ import ArmRun, summarise_target, TargetData, PROFILES
from services.planner import planning
from services.trainer import evaluation


def test_training_rows_are_the_candidates_plus_twice_as_many_from_replay_and_target():
    rng = random.Random(0)
    rows = explore.training_rows([1, 2, 3], [10, 11, 12, 13, 14, 15, 16], 2.0, rng)
    assert rows[:3] == [1, 2, 3] and len(rows) == 9
    assert len(set(rows[3:])) == 6 and set(rows[3:]) <= {10, 11, 12, 13, 14, 15, 16}  # without replacement
    # A pool smaller than asked for is used whole, then again.
    assert sorted(explore.training_rows([1], [7], 3.0, rng)) == [1, 7, 7, 7]
    assert explore.training_rows([], [7, 8], 2.0, rng) == []


def test_reward_auc_is_the_mann_whitney_statistic():
    assert explore.reward_auc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0])) == 1.0
    assert explore.reward_auc(np.array([0.1, 0.2, 0.9, 0.8]), np.array([1, 1, 0, 0])) == 0.0
    assert explore.reward_auc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([1, 0, 1, 0])) == 0.5  # ties count half
    # One of the four (positive, negative) pairs is ordered wrongly.
    assert explore.reward_auc(np.array([0.9, 0.3, 0.4, 0.1]), np.array([1, 1, 0, 0])) == pytest.approx(0.75)
    assert np.isnan(explore.reward_auc(np.array([0.1, 0.2]), np.array([1, 1])))


def _pool(names: list[str], dim: int = 8) -> planning.Pool:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(names), dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return planning.Pool(names, names, names, [], np.zeros(len(names), dtype=bool), emb, planning.pool_digest(*names))


def test_one_round_plans_searches_rewards_and_keeps_the_better_half_for_replay():
    names = [f"concept{i}" for i in range(12)]
    # concept i finds images 3i .. 3i+2; image r's embedding makes images of even concepts close to the target.
    search = lambda texts, k: [[3 * int(t[7:]) + j for j in range(min(k, 3))] for t in texts]  # noqa: E731
    target = np.array([[1.0, 0.0]], dtype=np.float32)

    def embed(rows):
        return np.array([[1.0, 0.0] if (r // 3) % 2 == 0 else [0.0, 1.0] for r in rows], dtype=np.float32)

    explorer = explore.Explorer("ie", _pool(names), search, queries_per_round=4, images_per_query=3, seed=1, reward_model=planning.RewardModel(device="cpu"))
    new = explorer.collect(embed, target)
    assert new and len(new) == len(set(new)) and set(new) == explorer.seen
    assert len(explorer.rewards) >= 1 and all(v in (0.0, 1.0) for vs in explorer.rewards.values() for v in vs)
    assert len(explorer.replay) == len(new) // 2
    reward = {r: float(embed([r])[0, 0]) for r in new}  # cosine to the one target image
    rest = [r for r in new if r not in explorer.replay]
    assert min(reward[r] for r in explorer.replay) >= max(reward[r] for r in rest)  # the better half
    again = explorer.collect(embed, target)
    assert not set(again) & set(new)  # an image already collected is not a new candidate
    assert [log.round for log in explorer.log] == [1, 2]


def test_summary_pairs_each_arm_with_the_initial_encoder_and_states_the_goal():
    data = TargetData("t", None, None, [], [], ["a"] * 3 + ["b"] * 3, [], ["a"] * 20 + ["b"] * 20, ["a", "b"])
    initial = evaluation.SplitScores(torch.tensor([False] * 20 + [True] * 20), torch.tensor([False] * 20 + [True] * 20))
    better = evaluation.SplitScores(torch.tensor([True] * 40), torch.tensor([True] * 40))

    def run(arm, seed, scores):
        return ArmRun(arm, seed, scores, [], 40, 1280, 100, 1.0, [])

    runs = {"random": [run("random", s, initial) for s in (0, 1)], "ie": [run("ie", s, better) for s in (0, 1)]}
    summary = summarise_target(data, runs, initial, {"init": 0.5}, PROFILES["smoke"])
    assert summary["measurable"] and summary["arms"]["ie"]["knn_minus_init"]["low"] > 0
    assert summary["arms"]["random"]["knn_minus_init"]["mean"] == 0.0
    assert summary["goal"] == {"ie_beats_init_knn": True, "ie_beats_init_probe": True, "ie_at_least_random_knn": True, "ie_at_least_random_probe": True}
    assert summary["ie_minus_random_knn"]["mean"] == pytest.approx(0.5)
    # A split that cannot measure says so instead of a goal.
    tiny = TargetData("t", None, None, [], [], ["a"], [], ["a"], ["a"])
    one = evaluation.SplitScores(torch.tensor([True]), torch.tensor([True]))
    summary = summarise_target(tiny, {"ie": [run("ie", 0, one)]}, one, {}, PROFILES["smoke"])
    assert summary["goal"] == "not measurable" and not summary["measurable"] and summary["not_measurable_reason"]


def test_auc_difference_is_paired_and_its_interval_separates_a_real_gain_from_none():
    rng = np.random.default_rng(0)
    relevant = rng.random(600) < 0.3
    before = rng.random(600) + 0.2 * relevant
    better = before + 0.5 * relevant  # every relevant image rewarded higher
    gain = explore.auc_difference(before, [better, better], relevant, resamples=300)
    assert gain.mean > 0 and gain.low > 0 and gain.excludes_zero
    same = explore.auc_difference(before, [before.copy()], relevant, resamples=300)
    assert same.mean == 0.0 and not same.excludes_zero
