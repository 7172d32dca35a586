"""Planning steps on synthetic worlds: the GP-driven sampler against the random baseline, label guidance, tiers."""

from __future__ import annotations

import numpy as np
import pytest

from services.planner import planning
from services.planner.descriptors import CuratedDescriptors


def clustered_world(seed: int, size: int = 8000, dimension: int = 64, clusters: int = 150):
    """Unit vectors in clusters (like sentence embeddings of related concepts) and a hidden target concept.

    The true reward of a concept is its cosine similarity to the target, the paper's situation where
    concepts near the target's content pay off.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dimension))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(clusters, size=size)] + 0.2 * rng.normal(size=(size, dimension))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    target = x[rng.integers(size)]
    keys = [f"concept-{i}" for i in range(size)]
    pool = planning.Pool(keys, keys, keys, [], np.zeros(size, dtype=bool), x.astype(np.float32), f"world-{seed}")
    return pool, x @ target, rng


def explore(pool, true_reward, mode: str, iterations: int, rng, model=None, queries: int = 256, params=planning.ModelParams(), scoring="optimistic"):
    """Runs the loop with rewards drawn from the truth; returns the plans."""
    rewards: dict[str, list[float]] = {}
    plans = []
    for iteration in range(1, iterations + 1):
        plan = planning.make_plan(
            pool, rewards, mode=mode, queries=queries, rng=np.random.default_rng([9, iteration]), reward_model=model, model_params=params, scoring=scoring
        )
        plans.append(plan)
        for row in plan.picks:
            rewards.setdefault(pool.keys[row], []).append(float(true_reward[row] + 0.02 * rng.normal()))
    return plans


def test_ablation_scorings_are_what_they_say():
    pool, truth, rng = clustered_world(seed=3, size=3000)
    model = planning.RewardModel(device="cpu")
    rewards = {pool.keys[row]: [float(truth[row])] for row in range(0, 3000, 25)}
    kwargs = dict(mode="ie", queries=64, reward_model=model, model_params=planning.ModelParams(exact_max=600))
    optimistic = planning.make_plan(pool, rewards, rng=np.random.default_rng(0), **kwargs)
    mean = planning.make_plan(pool, rewards, rng=np.random.default_rng(0), scoring="mean", **kwargs)
    observed = planning.make_plan(pool, rewards, rng=np.random.default_rng(0), scoring="observed", **kwargs)
    assert optimistic.method == mean.method == "exact" and observed.method == "observed" and observed.posterior is None
    # Without sigma the distribution follows mu alone; without the GP only observed concepts stand out.
    assert not np.allclose(optimistic.probabilities, mean.probabilities)
    scores, used = planning.observed_scores(pool, rewards)
    observed_rows = [pool.index[k] for k in rewards]
    assert used == len(rewards) and np.isclose(scores[observed_rows], truth[observed_rows]).all()
    assert np.allclose(np.delete(scores, observed_rows), np.mean(truth[observed_rows]))
    best = int(np.argmax(truth[observed_rows]))
    assert observed.probabilities[observed_rows[best]] == observed.probabilities.max()
    with pytest.raises(ValueError, match="scoring"):
        planning.make_plan(pool, rewards, rng=np.random.default_rng(0), scoring="greedy", **kwargs)


def test_excluded_concepts_are_never_drawn_and_the_tiers_fill_with_the_rest():
    pool, truth, _rng = clustered_world(seed=4, size=3000)
    model = planning.RewardModel(device="cpu")
    queried = np.argsort(-truth)[:300]  # the best concepts, already queried
    rewards = {pool.keys[row]: [float(truth[row])] for row in queried}
    kwargs = dict(mode="ie", queries=200, reward_model=model, model_params=planning.ModelParams(exact_max=600))
    fresh = planning.make_plan(pool, rewards, rng=np.random.default_rng(0), exclude=queried, **kwargs)
    again = planning.make_plan(pool, rewards, rng=np.random.default_rng(0), **kwargs)
    assert not set(fresh.picks) & set(queried.tolist()) and len(set(fresh.picks)) == 200
    assert np.isclose(fresh.probabilities.sum(), 1.0) and (fresh.probabilities[queried] == 0).all()
    assert set(again.picks) & set(queried.tolist())  # the paper's draw queries the known best again
    # The rest is still drawn by the model: the fresh picks lean to the queried concepts' neighbours.
    assert float(np.mean(truth[fresh.picks])) > float(np.mean(np.delete(truth, queried))) + 0.1


def test_a_name_asked_once_is_asked_for_no_sense_again_and_each_query_once_per_plan():
    # Six concepts, three names: "apple" the fruit and the tree are one query to a search engine.
    names = ["apple", "apple", "pear", "pear", "brick", "kettle"]
    keys = [f"{n}.{i}" for i, n in enumerate(names)]
    embeddings = np.eye(6, 8, dtype=np.float32)
    pool = planning.Pool(keys, names, names, [], np.zeros(6, dtype=bool), embeddings, "senses")
    assert pool.query_ids[0] == pool.query_ids[1] != pool.query_ids[2] == pool.query_ids[3]
    rewards = {keys[0]: [1.0]}
    assert planning.queried_rows(pool, rewards).tolist() == [0, 1]
    assert planning.queried_rows(pool, {}).size == 0
    scores = np.array([0.0, 0.0, 0.2, 0.9, 0.5, 0.1])
    # Of the two pears the better-scored one (row 3) stays; the apples are both excluded.
    allowed = planning.one_row_per_query(pool, scores, np.array([False, False, True, True, True, True]))
    assert allowed.tolist() == [False, False, False, True, True, True]
    kwargs = dict(mode="ie", queries=3, reward_model=planning.RewardModel(device="cpu"))
    for seed in range(5):
        plan = planning.make_plan(pool, rewards, rng=np.random.default_rng(seed), exclude=planning.queried_rows(pool, rewards), **kwargs)
        asked = [names[row] for row in plan.picks]
        assert sorted(asked) == ["brick", "kettle", "pear"] and plan.probabilities[[0, 1]].sum() == 0


def test_gp_sampler_queries_far_more_high_reward_concepts_than_random():
    pool, truth, rng = clustered_world(seed=1, size=6000)
    best = set(np.argsort(-truth)[: len(pool) // 100].tolist())  # the top 1% of concepts
    model = planning.RewardModel(device="cpu")
    # Exact for the first rewards, the approximation from 600 on (a small factor keeps the test quick).
    params = planning.ModelParams(rank=256, exact_max=600)

    def share(plans):
        picks = [row for plan in plans for row in plan.picks]
        return float(np.mean([row in best for row in picks]))

    gp_plans = explore(pool, truth, "ie", 5, rng, model, params=params)
    random_plans = explore(pool, truth, "uniform", 5, np.random.default_rng(2))
    gp_share, random_share = share(gp_plans), share(random_plans)
    print(f"share of top-1% concepts over 5 iterations x 256 queries: GP {gp_share:.3f}, random {random_share:.3f}")
    assert [p.method for p in gp_plans] == ["prior", "exact", "exact", "fic", "fic"]
    assert random_share < 0.03  # what uniform sampling gives: about 1%
    assert gp_share > 0.10 and gp_share > 5 * random_share
    # It learns: after the first (prior) iteration every iteration beats random by far.
    assert all(share([p]) > 0.08 for p in gp_plans[1:])


def test_first_iteration_is_uniform_and_later_ones_follow_the_paper_tiers():
    pool, truth, rng = clustered_world(seed=3, size=3000)
    plans = explore(pool, truth, "ie", 2, rng, planning.RewardModel(device="cpu"))
    assert np.allclose(plans[0].probabilities, 1.0 / len(pool))
    second = plans[1]
    scores = second.posterior.optimistic
    order = np.argsort(-scores, kind="stable")
    probs = second.probabilities
    assert probs.sum() == pytest.approx(1.0)
    assert probs[order[:250]].sum() == pytest.approx(0.8)
    assert probs[order[250:1000]].sum() == pytest.approx(0.1)
    assert probs[order[1000:]].sum() == pytest.approx(0.1)
    assert len(set(second.picks)) == 256  # one query per concept per iteration


def test_reward_model_is_exact_up_to_its_limit_then_switches_to_the_factor():
    keys = [str(i) for i in range(20_000)]
    pool = planning.Pool(keys, keys, keys, [], np.zeros(20_000, dtype=bool), np.zeros((20_000, 384), np.float32), "sizes")
    model = planning.RewardModel(device="cpu")
    params = planning.ModelParams(rank=512)
    assert model.method(pool, 0, params) == "prior"
    assert model.method(pool, planning.CPU_EXACT_MAX, params) == "exact"
    assert model.method(pool, planning.CPU_EXACT_MAX + 1, params) == "fic"
    assert model.method(pool, 3000, planning.ModelParams(rank=512, exact_max=5000)) == "exact"
    assert model.method(pool, 600, planning.ModelParams(rank=512, exact_max=500)) == "fic"
    pool.blocks = np.arange(20_000) // 3  # synsets: PIC
    assert model.method(pool, 5000, params) == "pic"
    assert model.method(pool, 5000, planning.ModelParams(rank=512, blocks=False)) == "fic"
    small, _, _ = clustered_world(seed=4, size=400)
    assert model.method(small, 5000, params) == "exact"  # a pool below the rank is always exact


def test_pruning_keeps_the_tenth_closest_to_the_labels():
    rng = np.random.default_rng(5)
    concepts = rng.normal(size=(5000, 32)).astype(np.float32)
    concepts /= np.linalg.norm(concepts, axis=1, keepdims=True)
    labels = concepts[rng.choice(5000, 9, replace=False)] + 0.01
    rows = planning.prune_around_labels(concepts, labels, fraction=0.1)
    # Reference: mean similarity to the 3 (= 9 / 3) most similar labels, top 10%.
    sims = concepts @ labels.T
    score = np.sort(sims, axis=1)[:, -3:].mean(1)
    expected = np.argsort(-score, kind="stable")[:500]
    assert len(rows) == 500
    assert set(rows.tolist()) == set(expected.tolist())
    assert np.all(np.diff(score[rows]) <= 1e-6)  # closest first


class _Vocab:
    def __init__(self, keys, synsets=()):
        self.keys = keys
        self.names = keys
        self.texts = keys
        self.synsets = list(synsets)
        self.index = {k: i for i, k in enumerate(keys)}
        self.digest = "v"


def test_label_guided_pool_and_half_of_the_queries_are_labels():
    pool, truth, rng = clustered_world(seed=6, size=4000)
    vocab = _Vocab(pool.keys)
    labels = ["label-a", "label-b", "label-c", pool.keys[7]]  # the last one is also a vocabulary concept
    label_vectors = pool.embeddings[[10, 20, 30, 7]] * 0.9 + 0.1 * pool.embeddings[[11, 21, 31, 8]]
    guided = planning.label_guided_pool(vocab, pool.embeddings, labels, label_vectors.astype(np.float32), fraction=0.1)
    assert len(guided) == 400 + 3  # 10% of the vocabulary, plus the labels not already in it
    assert guided.keys[-3:] == labels[:3]
    assert guided.is_label.sum() == (4 if pool.keys[7] in guided.keys else 3)
    rewards = {k: [0.5] for k in guided.keys[:50]}
    rewards.update({"label-a": [0.9]})
    plan = planning.make_plan(guided, rewards, mode="labels", queries=2000, rng=np.random.default_rng(1), reward_model=planning.RewardModel(device="cpu"))
    label_share = float(np.mean(guided.is_label[plan.picks]))
    # 2000 Bernoulli(0.5) draws: 0.5 +- 4 standard deviations (0.045).
    assert abs(label_share - 0.5) < 0.045
    assert plan.probabilities.sum() == pytest.approx(1.0)
    assert plan.probabilities[guided.is_label].sum() == pytest.approx(0.5)


def test_labels_fraction_is_configurable():
    pool, _, _ = clustered_world(seed=8, size=1000)
    vocab = _Vocab(pool.keys)
    guided = planning.label_guided_pool(vocab, pool.embeddings, ["x", "y"], pool.embeddings[:2], fraction=0.2)
    plan = planning.make_plan(
        guided, {}, mode="labels", queries=500, rng=np.random.default_rng(0), sampling_params=planning.SamplingParams(label_fraction=0.0)
    )
    assert not guided.is_label[plan.picks].any()


def test_descriptors_are_recorded_with_each_pick():
    pool, _, _ = clustered_world(seed=9, size=500)
    plan = planning.make_plan(pool, {}, mode="uniform", queries=40, rng=np.random.default_rng(0), descriptors=CuratedDescriptors())
    assert len(plan.descriptors) == len(plan.picks) == 40
    assert all(d.text and d.source == "curated" for d in plan.descriptors)
