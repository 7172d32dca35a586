"""Gaussian-process regression of concept rewards over concept text embeddings (the paper's section 3.3).

Prior: f ~ GP(0, k) with the RBF kernel k(a, b) = exp(-|a - b|^2 / (2 l^2)) (length-scale l = 1 in the
paper); each observed concept reward is f(x) plus Gaussian noise of variance `noise`. Rewards are
optionally standardised first (scikit-learn's `normalize_y`), and predictions mapped back.

Two ways to get the posterior over every concept of the vocabulary, chosen by `RewardModel`:

- `exact_posterior`: the textbook Cholesky solution, in chunks of candidates, in torch (CUDA when
  present). Cost O(n^3 + N n (d + n)) for n distinct observed concepts and N candidates: it equals
  scikit-learn's GaussianProcessRegressor (unit tests check 1e-4) but grows as N n^2.
- `feature_posterior`: the FIC approximation (Snelson & Ghahramani 2006) on fixed vocabulary
  features. `VocabularyFeatures` factors the vocabulary kernel once, K ~ G G^T (rank r, randomly
  pivoted Cholesky, then rotated to principal axes), and keeps the exact diagonal by adding the
  residual r(x) = k(x, x) - |g(x)|^2 as an independent per-concept term. The posterior is then
  Bayesian linear regression in r dimensions plus a closed-form correction at observed concepts;
  cost O(n r^2 + N r^2) per step, independent of how many observations accumulate. With r = N
  it is the exact GP (tested); docs/planner.md gives the measured error at the default rank.

Repeated observations of one concept are reduced to their mean with noise `noise / count`, which is
the same posterior as feeding every observation (a sufficient statistic; tested against
scikit-learn with the raw repeats).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

DEFAULT_CHUNK = 16384
PAPER_LENGTH_SCALE = 1.0
# The project's default. The marginal likelihood of the concept rewards peaks at 0.5 (13 cases) or
# 0.6 (7) of 20 (5 targets, 256 and 1,024 observations, encoder rewards and ground truth); 0.6 lies
# 0-14 log units below the best, 1.0 lies 23-374 below (bench/results/exploration-length-scale.json,
# bench/README.md "The project's length-scale (0.6)"). 0.6 is the value run through the planner.
# At 1.0 unrelated MiniLM concepts correlate at 0.4-0.5, so one reward moves the whole vocabulary.
PROJECT_LENGTH_SCALE = 0.6


@dataclass(frozen=True)
class Observations:
    """Distinct observed concepts: row indices into the candidate set, mean reward, number of rewards."""

    index: np.ndarray  # int64 [n]
    mean: np.ndarray  # float64 [n]
    count: np.ndarray  # int64 [n]
    # Over the raw rewards (every repeat), as scikit-learn's normalize_y computes them.
    raw_mean: float
    raw_std: float

    @classmethod
    def from_rewards(cls, by_index: dict[int, list[float]]) -> "Observations":
        items = sorted((i, v) for i, v in by_index.items() if v)
        index = np.array([i for i, _ in items], dtype=np.int64)
        mean = np.array([float(np.mean(v)) for _, v in items], dtype=np.float64)
        count = np.array([len(v) for _, v in items], dtype=np.int64)
        raw = np.concatenate([np.asarray(v, dtype=np.float64) for _, v in items]) if items else np.zeros(0)
        return cls(index, mean, count, float(raw.mean()) if raw.size else 0.0, float(raw.std()) if raw.size else 0.0)

    def __len__(self) -> int:
        return int(self.index.size)

    @property
    def total(self) -> int:
        return int(self.count.sum())


@dataclass(frozen=True)
class Posterior:
    """Posterior mean and standard deviation of every candidate, in reward units."""

    mean: np.ndarray  # float32 [N]
    std: np.ndarray  # float32 [N]
    method: str  # "prior", "exact", "fic" or "pic"

    @property
    def optimistic(self) -> np.ndarray:
        """The paper's acquisition score: mu + sigma."""
        return self.mean + self.std


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def rbf(a: torch.Tensor, b: torch.Tensor, length_scale: float) -> torch.Tensor:
    """exp(-|a - b|^2 / (2 l^2)) for every pair of rows; exact for any vectors, not only unit ones."""
    sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return torch.exp(sq.clamp_(min=0.0) * (-0.5 / (length_scale * length_scale)))


def cholesky(M: torch.Tensor, attempts: int = 6) -> torch.Tensor:
    """Cholesky factor, adding a growing jitter to the diagonal if rounding made M slightly indefinite.

    The matrices here are PSD plus noise in exact arithmetic; tiny noise (many repeats of a concept)
    and float rounding can still tip a pivot below zero.
    """
    L, info = torch.linalg.cholesky_ex(M)
    if not bool((info != 0).any()):
        return L
    scale = float(torch.diagonal(M, dim1=-2, dim2=-1).abs().mean()) or 1.0
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    for k in range(attempts):
        L, info = torch.linalg.cholesky_ex(M + eye * scale * 10.0 ** (k - 9))
        if not bool((info != 0).any()):
            return L
    raise RuntimeError("matrix is not positive definite even with jitter")


def _standardise(obs: Observations, normalize: bool) -> tuple[np.ndarray, float, float]:
    if not normalize:
        return obs.mean, 0.0, 1.0
    std = obs.raw_std if obs.raw_std > 0 else 1.0
    return (obs.mean - obs.raw_mean) / std, obs.raw_mean, std


def prior(n_candidates: int, obs: Observations | None = None, normalize: bool = True) -> Posterior:
    """No observation yet: mean 0 (or the reward mean), prior standard deviation everywhere."""
    offset, scale = (0.0, 1.0)
    if obs is not None and len(obs) and normalize:
        offset, scale = obs.raw_mean, (obs.raw_std or 1.0)
    return Posterior(np.full(n_candidates, offset, np.float32), np.full(n_candidates, scale, np.float32), "prior")


def _fit(Xo: torch.Tensor, obs: Observations, y: np.ndarray, length_scale: float, noise: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The n x n system of the observed concepts, in float64: Cholesky factor L of K + noise / count,
    the standardised rewards y and alpha = (K + noise / count)^-1 y."""
    K = rbf(Xo, Xo, length_scale)
    K.diagonal().add_(torch.as_tensor(noise / obs.count, dtype=torch.float64, device=Xo.device))
    L = cholesky(K)
    yt = torch.as_tensor(y, dtype=torch.float64, device=Xo.device)
    return L, yt, torch.cholesky_solve(yt[:, None], L)[:, 0]


def exact_posterior(
    candidates: np.ndarray | torch.Tensor,
    obs: Observations,
    *,
    length_scale: float = 1.0,
    noise: float = 0.1,
    normalize: bool = True,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    chunk: int = DEFAULT_CHUNK,
) -> Posterior:
    """The exact GP posterior at every candidate row; observations index into `candidates`.

    The n x n system is solved in float64; candidate blocks run in `dtype` (float32 by default: the
    kernel's values lie in (0, 1] and the noise keeps the system well conditioned).
    """
    device = device or pick_device()
    X = torch.as_tensor(np.asarray(candidates), device=device)
    if len(obs) == 0:
        return prior(X.shape[0], obs, normalize)
    y, offset, scale = _standardise(obs, normalize)
    idx = torch.as_tensor(obs.index, device=device)
    Xo = X[idx].to(torch.float64)
    L, _, alpha = _fit(Xo, obs, y, length_scale, noise)
    # A candidate's variance is k(x, x) - |L^-1 k(X, x)|^2; multiplying by L^-1 (one triangular
    # inversion) is much faster than a triangular solve per chunk on CPU.
    L_inv = torch.linalg.solve_triangular(L, torch.eye(L.shape[0], dtype=torch.float64, device=device), upper=False).to(dtype)
    Xo_c, alpha_c = Xo.to(dtype), alpha.to(dtype)
    means, variances = [], []
    for start in range(0, X.shape[0], chunk):
        block = X[start : start + chunk].to(dtype)
        Ks = rbf(block, Xo_c, length_scale)  # [c, n]
        means.append(Ks @ alpha_c)
        V = Ks @ L_inv.T  # rows are (L^-1 k(X, x))^T
        variances.append((1.0 - (V * V).sum(1)).clamp_(min=0.0))
    mean = torch.cat(means).double().cpu().numpy()
    var = torch.cat(variances).double().cpu().numpy()
    return Posterior((mean * scale + offset).astype(np.float32), (np.sqrt(var) * scale).astype(np.float32), "exact")


def log_marginal_likelihood(
    candidates: np.ndarray,
    obs: Observations,
    *,
    length_scale: float,
    noise: float,
    normalize: bool = True,
) -> float:
    """log p(y | X, length_scale, noise) of the observations under the model `exact_posterior` fits.

    The evidence a length-scale or a noise is chosen by (scikit-learn's GaussianProcessRegressor
    maximises it when its kernel is not fixed). Each concept enters once, with its mean reward and
    noise / count, as in the posterior; with one reward per concept it equals scikit-learn's value
    on the standardised rewards (tested).
    """
    if len(obs) == 0:
        return 0.0
    y, _, _ = _standardise(obs, normalize)
    Xo = torch.as_tensor(np.asarray(candidates)[obs.index], dtype=torch.float64)
    L, yt, alpha = _fit(Xo, obs, y, length_scale, noise)
    return float(-0.5 * (yt @ alpha) - torch.log(torch.diagonal(L)).sum() - 0.5 * len(y) * math.log(2 * math.pi))


# ------------------------------------------------------------------------------------------------
# Vocabulary features: K ~ G G^T once per vocabulary, so each planning step is O(N r^2).


@dataclass
class VocabularyFeatures:
    """A rank-r factor of the vocabulary's kernel matrix, K[i, j] ~ g_i . g_j, plus what it misses.

    Built by randomly pivoted Cholesky (Chen, Epperly, Tropp & Webber 2023): pivots drawn in
    proportion to the residual diagonal, which is near-optimal for Nyström approximation and,
    unlike a greedy choice, not derailed by outliers. The factor is then rotated to principal
    axes so that its leading columns carry the most kernel energy.
    """

    G: torch.Tensor  # [N, r], rows = feature vectors of the vocabulary concepts
    residual: torch.Tensor  # [N], k(x, x) - |g_x|^2 >= 0
    length_scale: float
    # Out-of-vocabulary points (labels) get g(x) = k(P, x)^T T with P the pivot embeddings.
    pivots: torch.Tensor  # [m, d]
    transform: torch.Tensor  # [m, r]

    @property
    def rank(self) -> int:
        return int(self.G.shape[1])

    def captured(self) -> float:
        """Share of the kernel's trace the factor captures (1 - mean residual since k(x, x) = 1)."""
        return float(1.0 - self.residual.double().mean())

    def extend(self, points: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and residuals of new points (Nyström extension through the same pivots)."""
        P = torch.as_tensor(np.asarray(points), device=self.G.device, dtype=self.G.dtype)
        g = rbf(P, self.pivots, self.length_scale) @ self.transform
        return g, (1.0 - (g * g).sum(1)).clamp_(min=0.0)

    def with_rows(self, rows: np.ndarray, extra_points: np.ndarray | None = None) -> "VocabularyFeatures":
        """The factor restricted to some vocabulary rows, with new points appended (label-guided pools)."""
        index = torch.as_tensor(rows, device=self.G.device, dtype=torch.long)
        G, residual = self.G[index], self.residual[index]
        if extra_points is not None and len(extra_points):
            g, r = self.extend(extra_points)
            G, residual = torch.cat([G, g]), torch.cat([residual, r])
        return VocabularyFeatures(G, residual, self.length_scale, self.pivots, self.transform)


def build_features(
    embeddings: np.ndarray | torch.Tensor,
    rank: int = 512,
    *,
    length_scale: float = 1.0,
    oversample: float = 2.0,
    block: int = 128,
    seed: int = 0,
    device: torch.device | None = None,
    progress: Callable[[float], None] | None = None,
) -> VocabularyFeatures:
    """Factors the kernel of `embeddings`: `oversample * rank` RPCholesky pivots, then the top `rank` principal axes."""
    device = device or pick_device()
    X = torch.as_tensor(np.asarray(embeddings), device=device, dtype=torch.float32)
    n = X.shape[0]
    m = min(n, int(math.ceil(rank * oversample)))
    rank = min(rank, m)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    F = torch.zeros(n, m, device=device, dtype=torch.float32)
    diag = torch.ones(n, device=device, dtype=torch.float64)  # k(x, x) = 1 for the RBF kernel
    pivots: list[int] = []
    filled = 0
    while filled < m:
        b = min(block, m - filled)
        weights = diag.clamp(min=0.0).cpu()
        if float(weights.sum()) <= 1e-9:
            break
        chosen = torch.multinomial(weights, b, replacement=False, generator=generator).to(device)
        C = rbf(X, X[chosen], length_scale)  # [n, b]
        if filled:
            C -= F[:, :filled] @ F[chosen, :filled].T
        # Inside the block, a greedy pivoted Cholesky on the residual drops near-duplicate pivots.
        S = C[chosen].double()
        accepted, L_cols = _pivoted_block(S, tolerance=1e-6)
        if not accepted:
            diag[chosen] = 0.0
            continue
        keep = torch.as_tensor(accepted, device=device)
        L = L_cols  # lower-triangular Cholesky factor of S[keep][:, keep]
        cols = torch.linalg.solve_triangular(L, C[:, keep].double().T, upper=False).T.float()  # [n, k]
        F[:, filled : filled + len(accepted)] = cols
        pivots.extend(chosen[keep].tolist())
        filled += len(accepted)
        diag -= (cols.double() ** 2).sum(1)
        diag[chosen[keep]] = 0.0
        if progress:
            progress(filled / m)
    F = F[:, :filled]
    # Principal axes: F = U S W^T; G = F W keeps G G^T = F F^T, columns sorted by energy. The Gram
    # matrix is accumulated in float32 (its eigenvectors only need to be orthonormal to ~1e-6).
    gram = (F.T @ F).double().cpu()
    energy, W = torch.linalg.eigh(gram)
    order = torch.argsort(energy, descending=True)[:rank]
    W = W[:, order].float().to(device)
    G = F @ W
    del F
    residual = (1.0 - (G * G).sum(1, dtype=torch.float64)).clamp(min=0.0).float()
    # g(x) = F-row of x rotated: the F-row is L_P^-1 k(P, x) for the pivot set P in pivot order.
    P = X[torch.as_tensor(pivots, device=device)]
    K_pp = rbf(P.double(), P.double(), length_scale)
    K_pp.diagonal().add_(1e-8)
    L_pp = cholesky(K_pp)
    transform = torch.linalg.solve_triangular(L_pp.T, W.double(), upper=True).float()  # k^T L^-T W
    return VocabularyFeatures(G=G.contiguous(), residual=residual, length_scale=length_scale, pivots=P.contiguous(), transform=transform)


def _pivoted_block(S: torch.Tensor, tolerance: float) -> tuple[list[int], torch.Tensor]:
    """Greedy pivoted Cholesky of a small PSD block: kept indices and the factor of that sub-block.

    Rows of the factor at the kept pivots form a lower-triangular matrix (each pivot's residual
    vanishes once it is conditioned on), which is the Cholesky factor of S[kept][:, kept].
    """
    A = S.detach().cpu().double().numpy()
    b = A.shape[0]
    d = np.diag(A).copy()
    L = np.zeros((b, b))
    kept: list[int] = []
    for k in range(b):
        j = int(np.argmax(d))
        if d[j] <= tolerance:
            break
        kept.append(j)
        column = (A[:, j] - L[:, :k] @ L[j, :k]) / math.sqrt(d[j])
        L[:, k] = column
        d -= column * column
        d[kept] = 0.0
    factor = np.tril(L[kept][:, : len(kept)])
    return kept, torch.as_tensor(factor, dtype=S.dtype, device=S.device)


MAX_BLOCK = 64


def feature_posterior(
    features: VocabularyFeatures,
    obs: Observations,
    *,
    noise: float = 0.1,
    normalize: bool = True,
    chunk: int = DEFAULT_CHUNK,
    blocks: np.ndarray | None = None,
    embeddings: np.ndarray | torch.Tensor | None = None,
) -> Posterior:
    """FIC (or, with `blocks`, PIC) posterior over the rows of `features`; observations index those rows.

    Model: f(x) = g(x) . w + e(x), w ~ N(0, I_r). FIC: e(x) ~ N(0, residual(x)) independent per
    concept, so the prior covariance is G G^T + diag(residual): exact on the diagonal, low rank off
    it. PIC (Snelson & Ghahramani 2007): concepts grouped in blocks (`blocks[i]` = block id of row i,
    e.g. the WordNet synset, so that the lemmas of one synset stay as correlated as the exact kernel
    makes them) keep the exact residual covariance inside their block, K - G G^T, computed from
    `embeddings`. Blocks above MAX_BLOCK members are split.
    """
    G, residual = features.G, features.residual
    N, r = G.shape
    device = G.device
    if len(obs) == 0:
        return prior(N, obs, normalize)
    y, offset, scale = _standardise(obs, normalize)
    idx = torch.as_tensor(obs.index, device=device)
    noise_o = torch.as_tensor(noise / obs.count, dtype=torch.float64, device=device)
    yo = torch.as_tensor(y, dtype=torch.float64, device=device)
    if blocks is None:
        groups = []
        singles = idx
    else:
        groups, singles = _observed_blocks(blocks, obs.index, device)
    # Singleton blocks (every observed concept in FIC): the residual is a scalar per concept.
    single_pos = _positions(idx, singles)
    Gs = G[singles].double()
    res_s = residual[singles].double()
    total = res_s + noise_o[single_pos]
    A = torch.eye(r, dtype=torch.float64, device=device) + Gs.T @ (Gs / total[:, None])
    b = Gs.T @ (yo[single_pos] / total)
    bucket_terms = []
    if groups:
        X = torch.as_tensor(np.asarray(embeddings), device=device)
        row_noise = torch.full((N,), float("nan"), dtype=torch.float64, device=device)
        row_y = torch.zeros(N, dtype=torch.float64, device=device)
        row_noise[idx], row_y[idx] = noise_o, yo
        for rows, valid in groups:
            terms = _block_terms(G, X, rows, valid, row_noise, row_y, features.length_scale)
            A += terms["A"]
            b += terms["b"]
            bucket_terms.append(terms)
    L = cholesky(A)
    w = torch.cholesky_solve(b[:, None], L)[:, 0]
    # Var(g . w | y) = g^T A^-1 g = |L^-1 g|^2: one r x r triangular inverse, then chunked matmuls.
    L_inv_T = torch.linalg.solve_triangular(L, torch.eye(r, dtype=torch.float64, device=device), upper=False).T
    L_inv_T32, w32 = L_inv_T.float(), w.float()
    means, variances = [], []
    for start in range(0, N, chunk):
        block = G[start : start + chunk]
        means.append(block @ w32)
        V = block @ L_inv_T32
        variances.append((V * V).sum(1))
    mean = torch.cat(means).double()
    var_w = torch.cat(variances).double()
    var = var_w + residual.double()
    # At an observed singleton its own residual e(x) is informed by its mean reward (closed form given w).
    rho = res_s / total
    gap = yo[single_pos] - mean[singles]
    mean[singles] = mean[singles] + rho * gap
    var[singles] = rho * noise_o[single_pos] + (1.0 - rho) ** 2 * var_w[singles]
    # Members of blocks with observations: their residuals are informed through the block's covariance.
    for terms in bucket_terms:
        _apply_block(terms, w, L_inv_T, mean, var)
    mean_np = mean.cpu().numpy()
    std_np = np.sqrt(var.clamp(min=0.0).cpu().numpy())
    return Posterior((mean_np * scale + offset).astype(np.float32), (std_np * scale).astype(np.float32), "fic" if blocks is None else "pic")


def _positions(all_rows: torch.Tensor, subset: torch.Tensor) -> torch.Tensor:
    """Index of each of `subset` in `all_rows` (both sorted, subset contained in all_rows)."""
    return torch.searchsorted(all_rows, subset)


def _observed_blocks(blocks: np.ndarray, observed: np.ndarray, device) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Blocks holding an observed concept: lone observed concepts, and padded member tables by size.

    Returns ([(rows [nb, S], valid [nb, S]) per power-of-two size S], singleton observed rows).
    """
    blocks = np.asarray(blocks)
    order = np.argsort(blocks, kind="stable")
    sorted_ids = blocks[order]
    touched = np.unique(blocks[observed])
    starts = np.searchsorted(sorted_ids, touched, side="left")
    ends = np.searchsorted(sorted_ids, touched, side="right")
    singles, tables = [], {}
    for start, end in zip(starts, ends):
        members = order[start:end]
        if len(members) == 1:
            singles.append(int(members[0]))
            continue
        for part in range(0, len(members), MAX_BLOCK):
            chunk = members[part : part + MAX_BLOCK]
            size = 1 << int(np.ceil(np.log2(max(2, len(chunk)))))
            tables.setdefault(size, []).append(chunk)
    groups = []
    for size, chunks in sorted(tables.items()):
        rows = np.zeros((len(chunks), size), dtype=np.int64)
        valid = np.zeros((len(chunks), size), dtype=bool)
        for i, chunk in enumerate(chunks):
            rows[i, : len(chunk)] = chunk
            valid[i, : len(chunk)] = True
        groups.append((torch.as_tensor(rows, device=device), torch.as_tensor(valid, device=device)))
    return groups, torch.as_tensor(np.array(sorted(singles), dtype=np.int64), device=device)


def _block_terms(G, X, rows, valid, row_noise, row_y, length_scale) -> dict:
    """One size class of blocks: residual covariances, whitened observations, their share of A and b.

    Blocks are small (S <= MAX_BLOCK), so S x S matrices are inverted explicitly (float64) and every
    product with the r-wide features is a batched matmul (float32).
    """
    Gb32 = G[rows] * valid[..., None]  # [nb, S, r]
    Gb = Gb32.double()
    E = X[rows].double()
    sq = (E * E).sum(-1)
    K = torch.exp((sq[:, :, None] + sq[:, None, :] - 2.0 * E @ E.transpose(1, 2)).clamp(min=0.0) * (-0.5 / length_scale**2))
    pair = (valid[:, :, None] & valid[:, None, :]).double()
    R = (K - Gb @ Gb.transpose(1, 2)) * pair  # exact residual covariance inside the block
    noise = row_noise[rows]
    observed = valid & ~torch.isnan(noise)
    Mo = observed.double()
    # Sigma: residual among observed members plus their noise; identity elsewhere so that padding and
    # unobserved members drop out of every product below.
    Sigma = R * (Mo[:, :, None] * Mo[:, None, :])
    Sigma = Sigma + torch.diag_embed(torch.where(observed, torch.nan_to_num(noise), torch.ones_like(noise)))
    L = cholesky(Sigma)
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
    L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
    Go32 = Gb32 * observed[..., None]
    yo = row_y[rows] * Mo
    G_hat = torch.bmm(L_inv.float(), Go32)[observed].double()  # rows of unobserved members are zero
    y_hat = torch.bmm(L_inv, yo[..., None])[..., 0][observed]
    return {
        "A": G_hat.T @ G_hat,
        "b": G_hat.T @ y_hat,
        "rows": rows, "valid": valid, "Gb": Gb32, "Go": Go32, "yo": yo, "R": R, "Mo": Mo,
        "Sigma_inv": L_inv.transpose(1, 2) @ L_inv,
    }


def _apply_block(t: dict, w: torch.Tensor, L_inv_T: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Posterior of every member of the blocks: mean g.w + c.(y - G_o w), variance R_xx - R_xo c + |L^-1 h|^2."""
    valid = t["valid"]
    cross = t["R"] * t["Mo"][:, :, None]  # [nb, S(obs), S(x)]: residual covariance observed -> member
    C = t["Sigma_inv"] @ cross  # Sigma^-1 R_ox for every member x (columns)
    w32 = w.float()
    gap = (t["yo"] - (t["Go"] @ w32).double()) * t["Mo"]  # [nb, S]
    m = (t["Gb"] @ w32).double() + (C.transpose(1, 2) @ gap[..., None])[..., 0]
    H = t["Gb"] - torch.bmm(C.transpose(1, 2).float(), t["Go"])  # effective features of the members
    Hv = H[valid] @ L_inv_T.float()
    v = (torch.diagonal(t["R"], dim1=1, dim2=2) - (cross * C).sum(1))[valid] + (Hv * Hv).sum(1).double()
    rows = t["rows"][valid]
    mean[rows] = m[valid]
    var[rows] = v
