"""One planning step: which concepts to query next (the paper's sections 3.3-3.4 and 4.3).

Pure computation over numpy/torch arrays, with no service around it, so tests and the benchmark
run it directly:

- `Pool`: the concepts an exploration samples from: the vocabulary, or in the label-guided mode the
  10% of it closest to the labels plus the labels themselves.
- `RewardModel`: the Gaussian-process posterior over the pool (exact, or FIC on cached vocabulary
  features past a size where exact stops paying; see gp.py).
- `make_plan`: posterior -> mu + sigma -> tempered softmax -> tiers -> distinct samples ->
  descriptors.
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from services.planner import gp, sampling
from services.planner.descriptors import ConceptRef, Descriptor, DescriptorSource, NoDescriptors

PAPER_LABEL_FRACTION = 0.5
PAPER_PRUNE_FRACTION = 0.1
# Exact posterior up to this many distinct observed concepts unless an exploration says otherwise.
# CPU: ~8 iterations of 256 queries; a step then costs ~1.5e12 flops, ~20 s on two cores, small next
# to an iteration. CUDA: the paper's whole run (~40 x 256) with margin, about a second a step.
CPU_EXACT_MAX = 2048
CUDA_EXACT_MAX = 16384


@dataclass(frozen=True)
class SamplingParams:
    spread: float = sampling.PAPER_SPREAD
    tiers: tuple[int, ...] = sampling.PAPER_TIERS
    masses: tuple[float, ...] = sampling.PAPER_MASSES
    label_fraction: float = PAPER_LABEL_FRACTION
    prune_fraction: float = PAPER_PRUNE_FRACTION
    prune_neighbours: int = 0  # 0: a third of the labels


@dataclass(frozen=True)
class ModelParams:
    length_scale: float = gp.PROJECT_LENGTH_SCALE
    noise: float = 0.1
    rank: int = 512
    exact_max: int = 0  # 0: CPU_EXACT_MAX on a CPU, CUDA_EXACT_MAX on CUDA
    normalize: bool = True
    blocks: bool = True  # PIC with the pool's blocks (WordNet synsets) when it has them, else FIC


PAPER_MODEL = ModelParams(length_scale=gp.PAPER_LENGTH_SCALE)


@dataclass
class Pool:
    """The concepts of one exploration, in a fixed order; observations and samples index it."""

    keys: list[str]
    names: list[str]
    texts: list[str]
    synsets: list[int]
    is_label: np.ndarray  # bool [P]
    embeddings: np.ndarray | None  # float32 [P, d], None when no reward model is needed
    digest: str
    index: dict[str, int] = field(default_factory=dict)
    # Block of each concept for the PIC approximation (WordNet: its synset, so that synonyms stay as
    # correlated as the exact kernel makes them); None: every concept its own block (FIC).
    blocks: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not self.index:
            self.index = {k: i for i, k in enumerate(self.keys)}

    @functools.cached_property
    def query_ids(self) -> np.ndarray:
        """Per row, an id of its search text: WordNet senses that share a lemma ("apple" the fruit and
        the tree) are asked as the same query and get the same answer."""
        return np.unique(np.asarray(self.names, dtype=object), return_inverse=True)[1].astype(np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def refs(self, rows: Sequence[int]) -> list[ConceptRef]:
        return [ConceptRef(self.names[i], self.synsets[i] if self.synsets else 0) for i in rows]


def pool_digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def synset_blocks(synsets: Sequence[int], extra: int = 0) -> np.ndarray | None:
    """Block ids for PIC: the synset of each WordNet concept, then `extra` singletons (labels)."""
    if not synsets:
        return None
    ids = np.asarray(synsets, dtype=np.int64)
    return np.concatenate([ids, -1 - np.arange(extra, dtype=np.int64)]) if extra else ids


def vocabulary_pool(vocabulary, embeddings: np.ndarray | None) -> Pool:
    return Pool(
        keys=vocabulary.keys,
        names=vocabulary.names,
        texts=vocabulary.texts,
        synsets=vocabulary.synsets,
        is_label=np.zeros(len(vocabulary), dtype=bool),
        embeddings=embeddings,
        digest=vocabulary.digest,
        index=vocabulary.index,
        blocks=synset_blocks(vocabulary.synsets),
    )


def labels_only_pool(labels: Sequence[str]) -> Pool:
    labels = list(dict.fromkeys(labels))
    return Pool(labels, labels, labels, [], np.ones(len(labels), dtype=bool), None, pool_digest("labels", *labels))


def label_texts(labels: Sequence[str], descriptions: Sequence[str] = ()) -> list[str]:
    """What a label is embedded as: "label: description" when a description is given."""
    out = []
    for i, label in enumerate(labels):
        description = descriptions[i].strip() if i < len(descriptions) else ""
        out.append(f"{label}: {description}" if description else label)
    return out


def prune_around_labels(concepts: np.ndarray, labels: np.ndarray, fraction: float, neighbours: int = 0, chunk: int = 65536) -> np.ndarray:
    """Rows of the `fraction` of concepts closest to the label set, closest first.

    A concept's closeness is its mean cosine similarity to its k most similar labels, k a third of
    the labels by default (the paper's kNN rule).
    """
    L = labels.shape[0]
    k = max(1, min(L, neighbours or int(round(L / 3)) or 1))
    keep = max(1, int(math.ceil(fraction * concepts.shape[0])))
    lab = torch.as_tensor(labels, dtype=torch.float32)
    scores = np.empty(concepts.shape[0], dtype=np.float32)
    for start in range(0, concepts.shape[0], chunk):
        sims = torch.as_tensor(concepts[start : start + chunk], dtype=torch.float32) @ lab.T
        scores[start : start + chunk] = torch.topk(sims, k, dim=1).values.mean(1).numpy()
    top = np.argpartition(-scores, keep - 1)[:keep] if keep < scores.size else np.arange(scores.size)
    return top[np.argsort(-scores[top], kind="stable")]


def label_guided_pool(
    vocabulary,
    embeddings: np.ndarray,
    labels: Sequence[str],
    label_embeddings: np.ndarray,
    fraction: float = PAPER_PRUNE_FRACTION,
    neighbours: int = 0,
) -> Pool:
    """The pruned vocabulary followed by the labels (a label already in the vocabulary is not repeated)."""
    labels = list(dict.fromkeys(labels))
    rows = prune_around_labels(embeddings, label_embeddings, fraction, neighbours)
    rows = np.sort(rows)  # vocabulary order: stable keys, cache-friendly gathers
    label_rows = [i for i, label in enumerate(labels) if label not in vocabulary.index]
    keys = [vocabulary.keys[r] for r in rows] + [labels[i] for i in label_rows]
    names = [vocabulary.names[r] for r in rows] + [labels[i] for i in label_rows]
    texts = [vocabulary.texts[r] for r in rows] + [labels[i] for i in label_rows]
    synsets = ([vocabulary.synsets[r] for r in rows] + [0] * len(label_rows)) if vocabulary.synsets else []
    emb = np.concatenate([embeddings[rows], label_embeddings[label_rows]]).astype(np.float32)
    is_label = np.zeros(len(keys), dtype=bool)
    is_label[len(rows) :] = True
    for label in labels:
        if label in vocabulary.index:
            position = int(np.searchsorted(rows, vocabulary.index[label]))
            if position < len(rows) and rows[position] == vocabulary.index[label]:
                is_label[position] = True
    digest = pool_digest("labels-pool", vocabulary.digest, rows.astype(np.int64).tobytes(), *labels)
    blocks = synset_blocks([vocabulary.synsets[r] for r in rows], extra=len(label_rows)) if vocabulary.synsets else None
    return Pool(keys, names, texts, synsets, is_label, emb, digest, blocks=blocks)


# ------------------------------------------------------------------------------------------------


class RewardModel:
    """The GP posterior over a pool; caches the vocabulary factors FIC needs (one per pool, length-scale, rank)."""

    def __init__(self, device: str = "auto", chunk: int = gp.DEFAULT_CHUNK, cached_factors: int = 4, seed: int = 0) -> None:
        self.device = gp.pick_device(device)
        self.chunk = chunk
        self.seed = seed
        self.cached_factors = cached_factors
        self._factors: OrderedDict[tuple, gp.VocabularyFeatures] = OrderedDict()
        self._lock = threading.Lock()
        self.factor_seconds: dict[tuple, float] = {}

    def method(self, pool: Pool, distinct_observed: int, params: ModelParams) -> str:
        """exact up to `exact_max` distinct observed concepts (by default 2,048 on a CPU, 16,384 on CUDA), then PIC/FIC."""
        if distinct_observed == 0:
            return "prior"
        if len(pool) <= params.rank:
            return "exact"  # a factor of rank >= the pool would be the exact kernel anyway
        limit = params.exact_max or (CUDA_EXACT_MAX if self.device.type == "cuda" else CPU_EXACT_MAX)
        return "exact" if distinct_observed <= limit else self._approximation(pool, params)

    @staticmethod
    def _approximation(pool: Pool, params: ModelParams) -> str:
        return "pic" if params.blocks and pool.blocks is not None else "fic"

    def factor(self, pool: Pool, params: ModelParams) -> gp.VocabularyFeatures:
        key = (pool.digest, float(params.length_scale), int(params.rank))
        with self._lock:
            cached = self._factors.get(key)
            if cached is not None:
                self._factors.move_to_end(key)
                return cached
            began = time.perf_counter()
            factor = gp.build_features(pool.embeddings, params.rank, length_scale=params.length_scale, seed=self.seed, device=self.device)
            self.factor_seconds[key] = time.perf_counter() - began
            self._factors[key] = factor
            while len(self._factors) > self.cached_factors:
                self._factors.popitem(last=False)
            return factor

    def posterior(self, pool: Pool, rewards: dict[str, list[float]], params: ModelParams) -> tuple[gp.Posterior, int]:
        """Posterior over the pool from rewards keyed by concept key; also returns how many rewards it used."""
        by_index: dict[int, list[float]] = {}
        for key, values in rewards.items():
            i = pool.index.get(key)
            if i is not None and values:
                by_index[i] = list(values)
        obs = gp.Observations.from_rewards(by_index)
        method = self.method(pool, len(obs), params)
        if method == "prior":
            return gp.prior(len(pool), obs, params.normalize), obs.total
        if pool.embeddings is None:
            raise ValueError("the reward model needs the pool's embeddings")
        if method == "exact":
            post = gp.exact_posterior(
                pool.embeddings, obs, length_scale=params.length_scale, noise=params.noise, normalize=params.normalize, device=self.device, chunk=self.chunk
            )
        else:
            post = gp.feature_posterior(
                self.factor(pool, params),
                obs,
                noise=params.noise,
                normalize=params.normalize,
                chunk=self.chunk,
                blocks=pool.blocks if params.blocks else None,
                embeddings=pool.embeddings,
            )
        return post, obs.total


# ------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """The queries of one iteration and the distribution they were drawn from."""

    picks: list[int]  # pool rows, in query order
    descriptors: list[Descriptor]
    probabilities: np.ndarray  # float64 [P]: chance of each concept per query draw
    posterior: gp.Posterior | None
    method: str  # uniform | observed | prior | exact | fic | pic
    observations_used: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def concept_distribution(scores: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Tempered softmax then tiers; equal scores (the prior) give the uniform distribution.

    Tiering ranks concepts, and a ranking of ties would only reflect their order in the pool.
    """
    if scores.size == 0 or float(np.ptp(scores)) == 0.0:
        return sampling.uniform(scores.size) if scores.size else np.zeros(0)
    return sampling.next_distribution(scores, spread=params.spread, tiers=params.tiers, masses=params.masses)


SCORINGS = ("optimistic", "mean", "observed")


def observed_scores(pool: Pool, rewards: dict[str, list[float]]) -> tuple[np.ndarray, int]:
    """Without the Gaussian process: mean observed reward per concept, the overall mean elsewhere."""
    observed = {pool.index[k]: float(np.mean(v)) for k, v in rewards.items() if k in pool.index and v}
    prior = float(np.mean(list(observed.values()))) if observed else 0.0
    scores = np.full(len(pool), prior, dtype=np.float64)
    for row, value in observed.items():
        scores[row] = value
    return scores, sum(len(v) for k, v in rewards.items() if k in pool.index)


def queried_rows(pool: Pool, rewards: dict[str, list[float]]) -> np.ndarray:
    """Pool rows whose query was asked already (a concept with observed rewards, or another sense of
    its name): make_plan's `exclude`."""
    asked = np.array([pool.index[k] for k in rewards if k in pool.index], dtype=np.int64)
    if not asked.size:
        return asked
    ids = pool.query_ids
    return np.flatnonzero(np.isin(ids, ids[asked]))


def one_row_per_query(pool: Pool, scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """`allowed` keeping, of the rows that share a search text, only the best-scoring one: two senses
    of one name drawn in the same iteration would be the same query twice."""
    ids = pool.query_ids
    order = np.flatnonzero(allowed)
    order = order[np.argsort(-scores[order], kind="stable")]
    _, first = np.unique(ids[order], return_index=True)
    out = np.zeros_like(allowed)
    out[order[first]] = True
    return out


def make_plan(
    pool: Pool,
    rewards: dict[str, list[float]],
    *,
    mode: str,
    queries: int,
    rng: np.random.Generator,
    sampling_params: SamplingParams = SamplingParams(),
    model_params: ModelParams = ModelParams(),
    reward_model: RewardModel | None = None,
    descriptors: DescriptorSource | None = None,
    scoring: str = "optimistic",
    exclude: np.ndarray | None = None,
) -> Plan:
    """Chooses `queries` concepts of the pool.

    Modes: "uniform" (the random baseline, and labels-only over a pool of labels), "ie" (the paper:
    GP mu + sigma, tempered softmax, tiers) and "labels" (each query is a label with probability
    `label_fraction`, otherwise drawn like "ie" from the non-label concepts).

    `scoring` replaces the paper's acquisition score, for its ablations: "optimistic" (mu + sigma,
    the paper), "mean" (mu: no uncertainty term) and "observed" (no Gaussian process: a concept's
    mean observed reward, every concept never queried at the mean over those that were).

    `exclude` (pool rows) are left out of the "ie" draw: concepts already queried, whose answer from
    a deterministic search (the offline web, a caption index) would be the same images again. They
    still inform the model through their rewards; the tiers are filled by the best of the others.
    With `exclude` given (even empty), each search text is drawn at most once per plan, as its best-
    scoring sense (`one_row_per_query`).
    """
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    began = time.perf_counter()
    timings: dict[str, float] = {}
    P = len(pool)
    posterior = None
    used = sum(len(v) for k, v in rewards.items() if k in pool.index)
    if mode == "uniform":
        probs = sampling.uniform(P)
        picks = sampling.sample(probs, queries, rng).tolist()
        method = "uniform"
    else:
        if scoring == "observed":
            scores, used = observed_scores(pool, rewards)
            method = "observed"
        else:
            model = reward_model or RewardModel()
            posterior, used = model.posterior(pool, rewards, model_params)
            method = posterior.method
            scores = (posterior.optimistic if scoring == "optimistic" else posterior.mean).astype(np.float64)
        timings["posterior"] = time.perf_counter() - began
        t = time.perf_counter()
        if mode == "labels":
            concept_rows = np.flatnonzero(~pool.is_label)
            label_rows = np.flatnonzero(pool.is_label)
            inner = concept_distribution(scores[concept_rows], sampling_params) if concept_rows.size else np.zeros(0)
            fraction = sampling_params.label_fraction if concept_rows.size else 1.0
            if not label_rows.size:
                fraction = 0.0
            probs = np.zeros(P)
            probs[concept_rows] = (1.0 - fraction) * inner
            probs[label_rows] += fraction / max(1, label_rows.size)
            is_label_query = rng.random(queries) < fraction
            n_labels = int(is_label_query.sum())
            label_picks = label_rows[sampling.sample(sampling.uniform(label_rows.size), n_labels, rng)] if n_labels else np.zeros(0, int)
            concept_picks = concept_rows[sampling.sample(inner, queries - n_labels, rng)] if queries - n_labels else np.zeros(0, int)
            picks, li, ci = [], iter(label_picks.tolist()), iter(concept_picks.tolist())
            for flag in is_label_query:
                picks.append(next(li) if flag else next(ci))
        else:
            allowed = np.ones(P, dtype=bool)
            if exclude is not None:
                allowed[np.asarray(exclude, dtype=np.int64)] = False
                if allowed.any():
                    allowed = one_row_per_query(pool, scores, allowed)
            if allowed.all() or not allowed.any():
                probs = concept_distribution(scores, sampling_params)
            else:
                probs = np.zeros(P)
                probs[allowed] = concept_distribution(scores[allowed], sampling_params)
            picks = sampling.sample(probs, queries, rng).tolist()
        timings["sampling"] = time.perf_counter() - t
    t = time.perf_counter()
    source = descriptors or NoDescriptors()
    described = source.describe(pool.refs(picks), rng)
    timings["descriptors"] = time.perf_counter() - t
    return Plan(picks, described, probs, posterior, method, used, time.perf_counter() - began, timings)
