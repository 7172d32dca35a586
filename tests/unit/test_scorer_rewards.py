"""Rewards against an independent brute-force reference (full sort, float64, one image at a time)."""

import numpy as np
import pytest

from services.scorer.rewards import concept_reward, knn_rewards


def reference_knn_rewards(images: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    out = []
    for image in images.astype(np.float64):
        sims = []
        for target in bank.astype(np.float64):
            denom = np.linalg.norm(image) * np.linalg.norm(target)
            sims.append(float(image @ target) / denom)
        nearest = sorted(sims, reverse=True)[: min(k, len(sims))]
        out.append(sum(nearest) / len(nearest))
    return np.array(out)


@pytest.mark.parametrize(
    "n, m, d, k, chunk_rows",
    [
        (40, 60, 16, 15, None),  # the paper's k
        (33, 50, 8, 15, 7),  # several chunks, a ragged last one
        (10, 5, 8, 15, None),  # k > M: every target image counts
        (10, 15, 8, 15, 3),  # k == M
        (5, 20, 4, 1, None),  # k = 1: nearest neighbour only
        (1, 1, 3, 15, None),  # one target image
    ],
)
def test_knn_rewards_match_brute_force(n, m, d, k, chunk_rows):
    rng = np.random.default_rng(n * 1000 + m)
    images = rng.normal(size=(n, d)).astype(np.float32)
    bank = rng.normal(size=(m, d)).astype(np.float32)
    got = knn_rewards(images, bank, k, chunk_rows=chunk_rows)
    assert got.shape == (n,) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_knn_rewards(images, bank, k), atol=1e-5, rtol=0)


def test_knn_rewards_are_scale_invariant_and_bounded():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(20, 12)).astype(np.float32)
    bank = rng.normal(size=(30, 12)).astype(np.float32)
    base = knn_rewards(images, bank, 15)
    np.testing.assert_allclose(knn_rewards(images * 7.5, bank * 0.01, 15), base, atol=1e-5)
    assert np.all(base <= 1.0 + 1e-6) and np.all(base >= -1.0 - 1e-6)


def test_image_in_the_bank_scores_one_with_k_1():
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(10, 6)).astype(np.float32)
    np.testing.assert_allclose(knn_rewards(bank[3:5], bank, 1), [1.0, 1.0], atol=1e-6)


def test_knn_rewards_edge_cases():
    bank = np.eye(3, dtype=np.float32)
    assert knn_rewards(np.zeros((0, 3), np.float32), bank).shape == (0,)
    with pytest.raises(ValueError, match="empty"):
        knn_rewards(np.ones((1, 3), np.float32), np.zeros((0, 3), np.float32))
    with pytest.raises(ValueError, match="dimensions"):
        knn_rewards(np.ones((1, 4), np.float32), bank)
    with pytest.raises(ValueError):
        knn_rewards(np.ones((1, 3), np.float32), bank, k=0)


def test_concept_reward_is_mean_of_top_rewards():
    rng = np.random.default_rng(3)
    rewards = rng.uniform(-1, 1, size=57)
    assert concept_reward(rewards, top=10) == pytest.approx(float(np.mean(sorted(rewards, reverse=True)[:10])), abs=1e-12)
    assert concept_reward(list(rewards[:4]), top=10) == pytest.approx(float(np.mean(rewards[:4])))
    assert concept_reward(iter([0.5, 0.1]), top=1) == pytest.approx(0.5)


def test_concept_reward_of_nothing_is_zero():
    assert concept_reward([], top=10) == 0.0
    assert concept_reward(np.array([]), top=10) == 0.0
    with pytest.raises(ValueError):
        concept_reward([1.0], top=0)
