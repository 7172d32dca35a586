import numpy as np
import pytest

from services.common.rewards import concept_reward
from services.planner import sampling


def test_temperature_gives_the_papers_spread():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=500)
    tau = sampling.temperature(scores)
    assert (scores.max() - scores.min()) / tau == pytest.approx(3.0)
    p = sampling.softmax(scores, tau)
    # The best concept is exp(3) times likelier than the worst, as the rule intends.
    assert p.max() / p.min() == pytest.approx(np.exp(3.0))


def test_tier_masses_are_08_01_01():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=5000)
    probs = sampling.next_distribution(scores)
    order = np.argsort(-scores)
    assert probs.sum() == pytest.approx(1.0)
    assert probs[order[:250]].sum() == pytest.approx(0.8)
    assert probs[order[250:1000]].sum() == pytest.approx(0.1)
    assert probs[order[1000:]].sum() == pytest.approx(0.1)
    # Inside a tier the softmax order is kept.
    assert np.all(np.diff(probs[order[:250]]) <= 1e-15)


def test_small_vocabularies_renormalise_existing_tiers():
    scores = np.arange(300, dtype=float)
    probs = sampling.next_distribution(scores)
    order = np.argsort(-scores)
    assert probs.sum() == pytest.approx(1.0)
    assert probs[order[:250]].sum() == pytest.approx(0.8 / 0.9)


def test_constant_scores_are_uniform_within_tiers():
    probs = sampling.next_distribution(np.zeros(10))
    assert probs == pytest.approx(np.full(10, 0.1))


def test_sample_draws_distinct_concepts_when_possible():
    rng = np.random.default_rng(2)
    picks = sampling.sample(sampling.uniform(20), 20, rng)
    assert sorted(picks.tolist()) == list(range(20))
    more = sampling.sample(sampling.uniform(5), 12, rng)
    assert len(more) == 12 and set(more.tolist()) == set(range(5))


def test_concept_reward_is_mean_of_top_k():
    rewards = [0.1, 0.9, 0.5, 0.7, 0.3]
    assert concept_reward(rewards, top=2) == pytest.approx(0.8)
    assert concept_reward(rewards, top=10) == pytest.approx(np.mean(rewards))
    assert concept_reward([], top=10) == 0.0
