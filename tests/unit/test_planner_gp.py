"""The planner's Gaussian process against independent references: scikit-learn and dense linear algebra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF

from services.planner import gp

CPU = torch.device("cpu")


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_problem(seed: int, n_candidates: int = 400, d: int = 24, n_obs: int = 120, repeats: bool = True):
    """Random candidates (unit rows, like MiniLM) and rewards on some of them, with repeated concepts."""
    rng = np.random.default_rng(seed)
    X = unit_rows(rng, n_candidates, d)
    picks = rng.choice(n_candidates, n_obs, replace=repeats)
    by_index: dict[int, list[float]] = {}
    for i in picks:
        by_index.setdefault(int(i), []).append(float(0.3 + 0.2 * np.sin(4 * X[i, 0]) + 0.05 * rng.normal()))
    return X, by_index


def sklearn_reference(X: np.ndarray, by_index: dict[int, list[float]], noise: float, length_scale: float, normalize: bool):
    """scikit-learn on every raw reward (repeats as separate samples), fixed kernel, no optimiser."""
    rows = [i for i, values in sorted(by_index.items()) for _ in values]
    y = np.array([v for _, values in sorted(by_index.items()) for v in values])
    model = GaussianProcessRegressor(kernel=RBF(length_scale), alpha=noise, optimizer=None, normalize_y=normalize)
    model.fit(X[rows], y)
    return model.predict(X, return_std=True)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("noise, length_scale", [(0.1, 1.0), (0.01, 1.0), (0.05, 0.7)])
def test_exact_posterior_equals_scikit_learn(normalize, noise, length_scale):
    X, by_index = random_problem(seed=int(noise * 1000 + length_scale * 10))
    mean_ref, std_ref = sklearn_reference(X, by_index, noise, length_scale, normalize)
    post = gp.exact_posterior(X, gp.Observations.from_rewards(by_index), length_scale=length_scale, noise=noise, normalize=normalize, device=CPU)
    assert post.method == "exact"
    np.testing.assert_allclose(post.mean, mean_ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(post.std, std_ref, atol=1e-4, rtol=0)


def test_exact_posterior_in_float32_chunks_matches_float64():
    X, by_index = random_problem(seed=3, n_candidates=1500, n_obs=300)
    obs = gp.Observations.from_rewards(by_index)
    wide = gp.exact_posterior(X, obs, device=CPU, dtype=torch.float64, chunk=100_000)
    narrow = gp.exact_posterior(X, obs, device=CPU, dtype=torch.float32, chunk=256)
    np.testing.assert_allclose(narrow.mean, wide.mean, atol=1e-4)
    np.testing.assert_allclose(narrow.std, wide.std, atol=1e-4)


def test_repeated_rewards_reduce_to_their_mean_with_smaller_noise():
    X, by_index = random_problem(seed=5, n_obs=200, repeats=True)
    assert any(len(v) > 1 for v in by_index.values())
    obs = gp.Observations.from_rewards(by_index)
    assert obs.total == 200 and len(obs) < 200
    mean_ref, std_ref = sklearn_reference(X, by_index, 0.1, 1.0, True)
    post = gp.exact_posterior(X, obs, noise=0.1, device=CPU, dtype=torch.float64)
    np.testing.assert_allclose(post.mean, mean_ref, atol=1e-6)
    np.testing.assert_allclose(post.std, std_ref, atol=1e-6)


def test_untried_concepts_are_uncertain_and_observed_ones_are_not():
    X, by_index = random_problem(seed=7, n_obs=60, repeats=False)
    post = gp.exact_posterior(X, gp.Observations.from_rewards(by_index), noise=0.01, device=CPU)
    observed = np.array(sorted(by_index))
    untried = np.setdiff1d(np.arange(len(X)), observed)
    assert post.std[observed].mean() < 0.5 * post.std[untried].mean()
    np.testing.assert_allclose(post.optimistic, post.mean + post.std)


def test_no_observation_is_the_prior():
    post = gp.exact_posterior(np.eye(4, dtype=np.float32), gp.Observations.from_rewards({}), device=CPU)
    assert post.method == "prior"
    assert np.all(post.mean == 0) and np.all(post.std == 1)


# -- the vocabulary factor and the FIC posterior -------------------------------------------------


def test_full_rank_factor_reproduces_the_kernel_and_the_exact_posterior():
    X, by_index = random_problem(seed=11, n_candidates=300, d=16, n_obs=90)
    features = gp.build_features(X, rank=300, oversample=1.0, block=64, device=CPU)
    K = np.exp(-0.5 * np.sum((X[:, None, :] - X[None, :, :]) ** 2, axis=-1))
    G = features.G.double().numpy()
    assert np.abs(G @ G.T - K).max() < 1e-4
    assert features.captured() > 0.9999
    mean_ref, std_ref = sklearn_reference(X, by_index, 0.1, 1.0, True)
    post = gp.feature_posterior(features, gp.Observations.from_rewards(by_index), noise=0.1)
    np.testing.assert_allclose(post.mean, mean_ref, atol=1e-4)
    np.testing.assert_allclose(post.std, std_ref, atol=1e-4)


def test_fic_posterior_is_the_exact_posterior_of_its_own_kernel():
    """At low rank, FIC is a GP with kernel G G^T + diag(residual): check against dense algebra."""
    X, by_index = random_problem(seed=13, n_candidates=500, d=32, n_obs=150)
    features = gp.build_features(X, rank=40, device=CPU)
    assert features.rank == 40 and features.captured() < 0.99  # a real approximation
    obs = gp.Observations.from_rewards(by_index)
    post = gp.feature_posterior(features, obs, noise=0.1, normalize=True)
    G = features.G.double().numpy()
    K = G @ G.T + np.diag(features.residual.double().numpy())
    y = (obs.mean - obs.raw_mean) / obs.raw_std
    K_oo = K[np.ix_(obs.index, obs.index)] + np.diag(0.1 / obs.count)
    mean = K[:, obs.index] @ np.linalg.solve(K_oo, y)
    var = np.diag(K) - np.einsum("ij,ji->i", K[:, obs.index], np.linalg.solve(K_oo, K[obs.index, :]))
    np.testing.assert_allclose(post.mean, mean * obs.raw_std + obs.raw_mean, atol=1e-4)
    np.testing.assert_allclose(post.std, np.sqrt(var) * obs.raw_std, atol=1e-4)


def test_factor_extends_to_new_points_consistently():
    X, _ = random_problem(seed=17, n_candidates=400, d=16)
    features = gp.build_features(X, rank=64, device=CPU)
    g, residual = features.extend(X[:10])
    np.testing.assert_allclose(g.numpy(), features.G[:10].numpy(), atol=1e-4)
    np.testing.assert_allclose(residual.numpy(), features.residual[:10].numpy(), atol=1e-4)
    subset = features.with_rows(np.array([5, 7]), extra_points=X[:1])
    assert subset.G.shape == (3, 64)
    np.testing.assert_allclose(subset.G[2].numpy(), features.G[0].numpy(), atol=1e-4)


def synonym_problem(seed: int = 19, groups: int = 150, size: int = 4, d: int = 24):
    """Groups of near-duplicate concepts (the lemmas of one WordNet synset) plus some loners."""
    rng = np.random.default_rng(seed)
    base = unit_rows(rng, groups, d)
    X = np.repeat(base, size, axis=0) + 0.15 * rng.normal(size=(groups * size, d)) / np.sqrt(d)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    blocks = np.repeat(np.arange(groups), size)
    blocks[::7] = 10_000 + np.arange(blocks[::7].size)  # concepts alone in their block
    by_index: dict[int, list[float]] = {}
    for i in rng.choice(len(X), 150):
        by_index.setdefault(int(i), []).append(float(np.sin(3 * X[i, 0]) + 0.05 * rng.normal()))
    return X, blocks, gp.Observations.from_rewards(by_index)


def dense_posterior(K: np.ndarray, obs: gp.Observations, noise: float):
    y = (obs.mean - obs.raw_mean) / obs.raw_std
    K_oo = K[np.ix_(obs.index, obs.index)] + np.diag(noise / obs.count)
    mean = K[:, obs.index] @ np.linalg.solve(K_oo, y)
    var = np.diag(K) - np.einsum("ij,ji->i", K[:, obs.index], np.linalg.solve(K_oo, K[obs.index, :]))
    return mean * obs.raw_std + obs.raw_mean, np.sqrt(var) * obs.raw_std


def test_pic_posterior_is_the_exact_posterior_of_its_block_kernel():
    """PIC keeps the exact residual inside blocks: a GP with kernel G G^T + blockdiag(K - G G^T)."""
    X, blocks, obs = synonym_problem()
    features = gp.build_features(X, rank=40, device=CPU)
    post = gp.feature_posterior(features, obs, noise=0.1, blocks=blocks, embeddings=X)
    assert post.method == "pic"
    K = np.exp(-0.5 * np.sum((X[:, None, :] - X[None, :, :]) ** 2, axis=-1))
    G = features.G.double().numpy()
    same_block = blocks[:, None] == blocks[None, :]
    mean, std = dense_posterior(G @ G.T + (K - G @ G.T) * same_block, obs, 0.1)
    np.testing.assert_allclose(post.mean, mean, atol=1e-4)
    np.testing.assert_allclose(post.std, std, atol=1e-4)
    # One block per concept is FIC.
    singletons = gp.feature_posterior(features, obs, noise=0.1, blocks=np.arange(len(X)), embeddings=X)
    fic = gp.feature_posterior(features, obs, noise=0.1)
    np.testing.assert_allclose(singletons.mean, fic.mean, atol=1e-5)
    np.testing.assert_allclose(singletons.std, fic.std, atol=1e-5)


def test_pic_is_closer_to_the_exact_gp_than_fic_when_blocks_hold_near_duplicates():
    X, blocks, obs = synonym_problem(seed=23)
    features = gp.build_features(X, rank=40, device=CPU)
    exact = gp.exact_posterior(X, obs, noise=0.1, device=CPU, dtype=torch.float64)

    def rms(p):
        return float(np.sqrt(np.mean((p.mean - exact.mean) ** 2) + np.mean((p.std - exact.std) ** 2)))

    pic = gp.feature_posterior(features, obs, noise=0.1, blocks=blocks, embeddings=X)
    fic = gp.feature_posterior(features, obs, noise=0.1)
    assert rms(pic) < 0.8 * rms(fic)


@pytest.mark.parametrize("noise, length_scale", [(0.1, 1.0), (0.1, 0.6), (0.3, 0.4)])
def test_log_marginal_likelihood_equals_scikit_learn_on_standardised_rewards(noise, length_scale):
    X, by_index = random_problem(seed=7, repeats=False)
    obs = gp.Observations.from_rewards(by_index)
    y = (obs.mean - obs.mean.mean()) / obs.mean.std()
    reference = GaussianProcessRegressor(kernel=RBF(length_scale), alpha=noise, optimizer=None, normalize_y=False).fit(X[obs.index], y)
    ours = gp.log_marginal_likelihood(X, obs, length_scale=length_scale, noise=noise)
    assert ours == pytest.approx(reference.log_marginal_likelihood_value_, rel=1e-9, abs=1e-6)
    # A smooth function of the inputs: the evidence prefers a length-scale near its own over a far shorter one.
    assert gp.log_marginal_likelihood(X, obs, length_scale=1.0, noise=0.1) > gp.log_marginal_likelihood(X, obs, length_scale=0.05, noise=0.1)
