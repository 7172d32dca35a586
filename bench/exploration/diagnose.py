"""Why exploration finds the target's data or misses it: the loop's two halves measured apart, at the paper's query budget.

    python -m bench.exploration.diagnose [--branch animals --branch food ...] [--seeds 0,1,2]
                                         [--rounds 5] [--queries 256] [--images-per-query 16]

One process over the offline web (`make data`), no services: the same library code the services
run (the planner's `make_plan` over the 146,347 WordNet nouns, the search service's caption index,
the scorer's reward rule), with a fixed encoder: the ImageNet-initialised EfficientNet-Lite0 that
an exploration serves as v1. Per target (a Tux Paint branch; relevance = the corpus image's
synset lies in the target's WordNet subtree, read only to score):

1. **The reward** (the scorer's half): every corpus image's reward (mean cosine similarity to its
   k = 15 nearest target train images) against relevance: ROC AUC and precision@k, per input size.
2. **The planner** (the other half), each arm for `rounds` rounds of `queries` queries x
   `images-per-query` results, over several seeds, yield = relevant share of the new images
   (not collected before by the same run), per round and cumulatively:
   - `random`: concepts drawn uniformly from the vocabulary (the paper's baseline);
   - `ie`: the planner with the project's defaults: the GP (mu + sigma, length-scale 0.6) over the
     embeddings of the concepts' names, the paper's tiered draw over the concepts whose query was
     not asked before; concept reward = mean of the top-10 image rewards;
   - `ie-paper`: the paper's planner (the GP over the definition texts, length-scale 1, every
     concept may be drawn again);
   - `ie-definition`: `ie` with the GP over the paper's definition texts;
   - `ie-repeats`: `ie` whose draw may pick concepts already asked (the paper's draw);
   - `ie-mean`: without the uncertainty term (mu only);
   - `ie-observed`: without the Gaussian process (observed concepts' mean rewards only);
   - `ie-descriptors`: `ie` whose queries are "descriptor concept" with the planner's offline
     `wordnet` descriptor source (the paper's "Ours++"; a concept asked again gets another
     adjective, so another answer from the deterministic search: no concept is left out);
   - `oracle`: `ie` fed each query's true relevant share as its concept reward, the planner's
     ceiling: if it is far above `ie`, the reward is the weak half; if not, the planner is;
     `oracle-paper` the same with the paper's planner.
   - `hindsight`: no model at all: a plan made knowing every concept's search results and every
     image's relevance in advance, greedily, each pick the concept that leaves the cumulative yield
     highest. Not a planner anyone can run: the yield that any plan of this budget could reach on
     this corpus, so that a goal above it is known to be out of reach rather than missed.

The encoder is never retrained here, so `ie` is the paper's "fixed encoder" ablation; the
retrained loop is `bench.learning` (small budget, with training) and `bench.exploration` (the
stack). Ratios to random carry a bootstrap interval over seeds (paired by seed). Writes
bench/results/exploration-diagnosis.json; see bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.learning import explore
from bench.learning.__main__ import PROFILES, OfflineWeb, initial_state, machine, vocabulary_pool
from services.common.images import square_pixels
from services.common.rewards import concept_reward
from services.offlineweb import targets as target_sets
from services.offlineweb.build import default_data_dir
from services.planner import planning, sampling
from services.planner.vocabulary import PAPER_CONCEPT_TEXT, PROJECT_CONCEPT_TEXT, CONCEPT_TEXTS
from services.planner.descriptors import NONE, WORDNET, DescriptorSource, NoDescriptors, WordNetDescriptors, query_text
from services.scorer.rewards import knn_rewards
from services.trainer import evaluation

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
ARMS = ("random", "ie", "ie-paper", "ie-definition", "ie-repeats", "ie-mean", "ie-observed", "ie-descriptors", "oracle", "oracle-paper", "hindsight")
# arm -> (make_plan mode, scoring, concept reward from image rewards or from the ground truth,
#         whether concepts already queried are left out of later draws, descriptor source).
# `ie` is the project's planner (fresh concepts, the GP over the names, length-scale 0.6);
# `ie-paper` the paper's (every concept may be drawn again, the definition texts, length-scale 1).
ARM_SPECS = {
    "random": ("uniform", "optimistic", "reward", False, "none"),
    "ie": ("ie", "optimistic", "reward", True, "none"),
    "ie-paper": ("ie", "optimistic", "reward", False, "none"),
    "ie-definition": ("ie", "optimistic", "reward", True, "none"),
    "ie-repeats": ("ie", "optimistic", "reward", False, "none"),
    "ie-mean": ("ie", "mean", "reward", True, "none"),
    "ie-observed": ("ie", "observed", "reward", True, "none"),
    "ie-descriptors": ("ie", "optimistic", "reward", False, "wordnet"),
    "oracle": ("ie", "optimistic", "truth", True, "none"),
    "oracle-paper": ("ie", "optimistic", "truth", False, "none"),
    "hindsight": ("hindsight", "-", "truth", True, "none"),
}
# Each arm's random stream. An ablation shares its base arm's stream (common random numbers: the
# same first, uniform round and the same draws wherever the distributions agree), so that the
# difference measured is the ablated part's, not the draws'.
ARM_SEEDS = {"random": (0,), "ie": (1,), "ie-paper": (1,), "ie-definition": (1,), "ie-repeats": (1,), "ie-mean": (1,), "ie-observed": (1,),
             "ie-descriptors": (1,), "oracle": (4,), "oracle-paper": (4,), "hindsight": (7,)}
# The planner parameters of the arms that plan: the project's defaults (planning.ModelParams /
# SamplingParams; `--length-scale` and `--tier-masses` replace them), except the `-paper` arms, which
# keep the paper's length-scale 1 (the project's default is 0.6, gp.py).
PROJECT_PARAMS = (planning.ModelParams(), planning.SamplingParams())
ARM_PARAMS = {"ie-paper": (planning.PAPER_MODEL, planning.SamplingParams()), "oracle-paper": (planning.PAPER_MODEL, planning.SamplingParams())}
# What each arm's GP embeds the concepts as: the project's text (the name, or `--concept-text`) unless
# named here.
ARM_TEXTS = {"ie-paper": PAPER_CONCEPT_TEXT, "oracle-paper": PAPER_CONCEPT_TEXT, "ie-definition": PAPER_CONCEPT_TEXT}
PROJECT_TEXT = PROJECT_CONCEPT_TEXT
# Each ablation against the arm it ablates, paired by seed (they share their random streams).
ABLATION_OF = {"ie-paper": "ie", "ie-definition": "ie", "ie-repeats": "ie", "ie-mean": "ie", "ie-observed": "ie", "ie-descriptors": "ie", "oracle-paper": "oracle"}
MAX_PIXELS = 64_000_000


# ---------------------------------------------------------------------------------------------
# The reward's half


def embed_corpus(web: OfflineWeb, size: int, device: torch.device, chunk: int = 256) -> np.ndarray:
    """L2-normalised embeddings of every corpus image at `size` px (centre square, as the scorer)."""
    state = initial_state(dataclasses.replace(PROFILES["cpu"], image_size=size), device, 0)
    out = []
    for start in range(0, len(web.records), chunk):
        rows = range(start, min(start + chunk, len(web.records)))
        pixels = explore.to_tensor([square_pixels(web.path(r).read_bytes(), size, max_pixels=MAX_PIXELS) for r in rows])
        out.append(evaluation.embed(state.backbone, pixels, state.config.mean, state.config.std, device).numpy())
    return np.concatenate(out)


def embed_paths(paths: list[Path], size: int, device: torch.device) -> np.ndarray:
    state = initial_state(dataclasses.replace(PROFILES["cpu"], image_size=size), device, 0)
    pixels = explore.to_tensor([square_pixels(p.read_bytes(), size, max_pixels=MAX_PIXELS) for p in paths])
    return evaluation.embed(state.backbone, pixels, state.config.mean, state.config.std, device).numpy()


def precision_at(rewards: np.ndarray, relevant: np.ndarray, k: int) -> float:
    top = np.argsort(-rewards, kind="stable")[:k]
    return float(relevant[top].mean()) if k else float("nan")


def reward_quality(rewards: np.ndarray, relevant: np.ndarray) -> dict:
    n_relevant = int(relevant.sum())
    return {
        "roc_auc": round(explore.reward_auc(rewards, relevant), 4),
        "precision_at_relevant_count": round(precision_at(rewards, relevant, n_relevant), 4),
        "precision_at_100": round(precision_at(rewards, relevant, 100), 4),
        "precision_at_1000": round(precision_at(rewards, relevant, 1000), 4),
        "base_rate": round(float(relevant.mean()), 4),
    }


# ---------------------------------------------------------------------------------------------
# The planner's half


@dataclass
class Run:
    arm: str
    seed: int
    new: list[int] = field(default_factory=list)  # new images per round
    relevant: list[int] = field(default_factory=list)  # of which relevant
    top_concepts: list[str] = field(default_factory=list)
    plan_seconds: float = 0.0

    def yields(self) -> list[float]:
        return [r / n if n else 0.0 for r, n in zip(self.relevant, self.new)]

    def cumulative(self) -> list[float]:
        return [sum(self.relevant[: i + 1]) / max(1, sum(self.new[: i + 1])) for i in range(len(self.new))]


def run_arm(arm: str, seed: int, pool: planning.Pool, web: OfflineWeb, image_reward: np.ndarray, relevant: np.ndarray,
            reward_model: planning.RewardModel, rounds: int, queries: int, images_per_query: int,
            params: tuple[planning.ModelParams, planning.SamplingParams] | None = None) -> Run:
    """`params` overrides the arm's planner parameters (`arm_params`)."""
    mode, scoring, source, fresh, described = ARM_SPECS[arm]
    model_params, sampling_params = params or arm_params(arm)
    # Seeded by the arm's name, not its position in ARMS, so that adding an arm changes no draw.
    rng = np.random.default_rng([seed, *ARM_SEEDS[arm]])
    rewards: dict[str, list[float]] = {}
    seen: set[int] = set()
    run = Run(arm, seed)
    for _ in range(rounds):
        began = time.perf_counter()
        exclude = planning.queried_rows(pool, rewards) if fresh else None
        plan = planning.make_plan(pool, rewards, mode=mode, queries=queries, rng=rng, reward_model=reward_model, scoring=scoring, exclude=exclude,
                                  model_params=model_params, sampling_params=sampling_params, descriptors=descriptor_source(described))
        run.plan_seconds += time.perf_counter() - began
        hits = web.search([query_text(d.text, pool.names[i]) for i, d in zip(plan.picks, plan.descriptors)], images_per_query)
        for row, found in zip(plan.picks, hits):
            rewards.setdefault(pool.keys[row], []).append(concept_value(found, source, image_reward, relevant))
        new = sorted({r for found in hits for r in found} - seen)
        seen.update(new)
        run.new.append(len(new))
        run.relevant.append(int(relevant[new].sum()))
    best = sorted(((float(np.mean(v)), k) for k, v in rewards.items()), reverse=True)[:8]
    run.top_concepts = [pool.names[pool.index[k]] for _, k in best]
    return run


_DESCRIPTORS: dict[str, DescriptorSource] = {}


def descriptor_source(name: str) -> DescriptorSource:
    """The planner's descriptor source of that name (one instance per process: WordNet is read once)."""
    if name not in _DESCRIPTORS:
        _DESCRIPTORS[name] = {NONE: NoDescriptors, WORDNET: WordNetDescriptors}[name]()
    return _DESCRIPTORS[name]


def concept_value(found: list[int], source: str, image_reward: np.ndarray, relevant: np.ndarray) -> float:
    """A query's concept reward from its results (corpus rows): the scorer's rule over the image
    rewards ("reward"), or the true relevant share ("truth"); 0 for a query that found nothing."""
    if not found:
        return 0.0
    return float(relevant[found].mean()) if source == "truth" else concept_reward(image_reward[r] for r in found)


def all_results(pool: planning.Pool, web: OfflineWeb, images_per_query: int) -> np.ndarray:
    """Every concept's search results as corpus rows, (concepts, images_per_query), -1 where the
    search returned fewer: what `hindsight` plans with."""
    out = np.full((len(pool), images_per_query), -1, dtype=np.int64)
    for start in range(0, len(pool), 4096):
        names = [pool.names[i] for i in range(start, min(start + 4096, len(pool)))]
        for i, found in enumerate(web.search(names, images_per_query)):
            out[start + i, : len(found)] = found
    return out


def hindsight_round(results: np.ndarray, relevant: np.ndarray, seen: np.ndarray, queried: np.ndarray, queries: int,
                    totals: tuple[int, int]) -> list[int]:
    """One round of `queries` picks knowing every answer: each pick is the concept (never queried
    before) after which relevant-new / new over the whole run is highest; ties go to more relevant
    images, then to the lower row. A concept whose results are all seen already changes neither
    count. Updates `seen` and `queried` in place."""
    rel, tot = totals
    # The same for every pick: missing results point at a padding image, seen and not relevant.
    rows = np.where(results >= 0, results, len(relevant))
    relevant_at = np.append(relevant, False)[rows]
    picks = []
    for _ in range(queries):
        unseen = ~np.append(seen, True)[rows]
        new = unseen.sum(1)
        new_relevant = (unseen & relevant_at).sum(1)
        score = (rel + new_relevant) / np.maximum(1, tot + new)
        score = np.where(queried, -1.0, score)
        best = np.flatnonzero(score == score.max())
        pick = int(best[np.argmax(new_relevant[best])])
        picks.append(pick)
        queried[pick] = True
        found = results[pick][results[pick] >= 0]
        rel, tot = rel + int(new_relevant[pick]), tot + int(new[pick])
        seen[found] = True
    return picks


def run_hindsight(seed: int, pool: planning.Pool, results: np.ndarray, relevant: np.ndarray, rounds: int, queries: int) -> Run:
    seen = np.zeros(len(relevant), dtype=bool)
    queried = np.zeros(len(pool), dtype=bool)
    run = Run("hindsight", seed)
    picked: list[int] = []
    for _ in range(rounds):
        before = seen.copy()
        began = time.perf_counter()
        picked += hindsight_round(results, relevant, seen, queried, queries, (sum(run.relevant), sum(run.new)))
        run.plan_seconds += time.perf_counter() - began
        new = seen & ~before
        run.new.append(int(new.sum()))
        run.relevant.append(int((new & relevant).sum()))
    run.top_concepts = [pool.names[i] for i in picked[:8]]
    return run


def ratio_interval(numerator: list[float], denominator: list[float], resamples: int = 2000, seed: int = 0) -> dict:
    """mean(numerator) / mean(denominator) with a bootstrap interval over seeds, resampled in pairs."""
    a, b = np.asarray(numerator, float), np.asarray(denominator, float)
    point = float(a.mean() / b.mean()) if b.mean() else float("nan")
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        index = rng.integers(0, len(a), len(a))
        if b[index].mean():
            draws.append(a[index].mean() / b[index].mean())
    low, high = (np.quantile(draws, [0.025, 0.975]) if draws else (float("nan"), float("nan")))
    return {"ratio": round(point, 3), "low": round(float(low), 3), "high": round(float(high), 3), "seeds": len(a)}


def summarise(branch: str, runs: list[Run], quality: dict, relevant: np.ndarray, rounds: int) -> dict:
    by_arm: dict[str, list[Run]] = {}
    for run in runs:
        by_arm.setdefault(run.arm, []).append(run)
    # Seed order everywhere: per-seed rows, seed 0's concepts, and the pairs of every interval.
    by_arm = {arm: sorted(found, key=lambda r: r.seed) for arm, found in by_arm.items()}
    arms = {}
    for arm, found in by_arm.items():
        cumulative = np.array([r.cumulative() for r in found])
        per_round = np.array([r.yields() for r in found])
        arms[arm] = {
            "cumulative_yield_mean": [round(float(v), 4) for v in cumulative.mean(0)],
            "cumulative_yield_per_seed": [[round(float(v), 4) for v in row] for row in cumulative],
            "round_yield_mean": [round(float(v), 4) for v in per_round.mean(0)],
            "new_images_mean": [round(float(v), 1) for v in np.mean([r.new for r in found], 0)],
            "relevant_new_images_mean": [round(float(v), 1) for v in np.mean([r.relevant for r in found], 0)],
            "relevant_found_mean": round(float(np.mean([sum(r.relevant) for r in found])), 1),
            "plan_seconds_mean": round(float(np.mean([r.plan_seconds for r in found])), 1),
            "top_concepts_seed0": found[0].top_concepts,
        }
    random_final = [r.cumulative()[-1] for r in by_arm.get("random", [])]
    random_found = [sum(r.relevant) for r in by_arm.get("random", [])]
    for arm, found in by_arm.items():
        if arm == "random" or not random_final:
            continue
        arms[arm]["cumulative_vs_random"] = ratio_interval([r.cumulative()[-1] for r in found], random_final)
        # Yield alone rewards asking again what was seen (no new image, no change): how many
        # relevant images the arm found at all, against random's, says whether it explored.
        arms[arm]["relevant_found_vs_random"] = ratio_interval([sum(r.relevant) for r in found], random_found)
    ablation_effects(arms)
    return {
        "branch": branch,
        "relevant_web_images": int(relevant.sum()),
        "corpus_images": int(relevant.size),
        "base_rate": round(float(relevant.mean()), 4),
        "reward_quality": quality,
        "arms": arms,
        "rounds": rounds,
    }


def ablation_effects(arms: dict) -> None:
    """Adds `effect_vs_<base>` to each ablation present with its base arm: cumulative yield after the
    last round over the base's, with a bootstrap interval over seeds resampled in pairs."""
    for arm, base in ABLATION_OF.items():
        if arm in arms and base in arms:
            finals = [[row[-1] for row in arms[name]["cumulative_yield_per_seed"]] for name in (arm, base)]
            arms[arm][f"effect_vs_{base}"] = ratio_interval(*finals)


def print_summary(summary: dict) -> None:
    print(f"  base rate {summary['base_rate']:.2%} ({summary['relevant_web_images']} relevant of {summary['corpus_images']:,})")
    for size, q in summary["reward_quality"].items():
        print(f"  reward at {size}: AUC {q['roc_auc']:.3f}, precision@relevant {q['precision_at_relevant_count']:.3f}, @100 {q['precision_at_100']:.2f}, @1000 {q['precision_at_1000']:.3f}")
    for arm, a in summary["arms"].items():
        vs = a.get("cumulative_vs_random")
        found = a.get("relevant_found_vs_random")
        versus = f"  vs random {vs['ratio']:.2f}x [{vs['low']:.2f}, {vs['high']:.2f}]; relevant found {a['relevant_found_mean']:.0f} ({found['ratio']:.2f}x)" if vs else ""
        base = ABLATION_OF.get(arm)
        effect = a.get(f"effect_vs_{base}")
        versus += f"; vs {base} {effect['ratio']:.2f}x [{effect['low']:.2f}, {effect['high']:.2f}]" if effect else ""
        print(f"  {arm:12s} cumulative yield {' '.join(f'{v:.3f}' for v in a['cumulative_yield_mean'])}{versus}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.exploration.diagnose", description=__doc__.split("\n\n")[0])
    parser.add_argument("--branch", action="append", help="Tux Paint branch (repeatable; default animals, food, plants, household, vehicles)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--queries", type=int, default=256, help="queries per round (the paper: 256)")
    parser.add_argument("--images-per-query", type=int, default=16)
    parser.add_argument("--sizes", default="64,96,128", help="encoder input sizes whose reward quality is measured")
    parser.add_argument("--serve-size", type=int, default=96, help="input size of the rewards the planner arms use (the stack's default)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--length-scale", type=float, default=None, help="GP length-scale of the arms not named -paper (default: the planner's, 0.6)")
    parser.add_argument("--tier-masses", default=None, help="tier masses of the arms not named -paper, e.g. 0.95,0.03,0.02 (default: the paper's 0.8,0.1,0.1)")
    parser.add_argument("--concept-text", choices=CONCEPT_TEXTS, default=None, help="what the GP of the arms not named -paper or -definition embeds concepts as (default: the planner's, name)")
    parser.add_argument("--vocabulary", choices=("wordnet", "corpus"), default="wordnet")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "exploration-diagnosis.json")
    args = parser.parse_args(argv)
    branches = args.branch or ["animals", "food", "plants", "household", "vehicles"]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    arms = [a for a in args.arms.split(",") if a]
    if set(arms) - set(ARMS):
        parser.error(f"--arms: unknown {sorted(set(arms) - set(ARMS))}")
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()} | {args.serve_size})
    global PROJECT_PARAMS, PROJECT_TEXT
    PROJECT_TEXT = args.concept_text or PROJECT_TEXT
    model, draw = PROJECT_PARAMS
    if args.length_scale is not None:
        model = dataclasses.replace(model, length_scale=args.length_scale)
    if args.tier_masses:
        draw = dataclasses.replace(draw, masses=tuple(float(m) for m in args.tier_masses.split(",")))
        problem = sampling.masses_problem(draw.masses, draw.tiers)
        if problem:
            parser.error(f"--tier-masses: {problem}")
    PROJECT_PARAMS = (model, draw)
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cpu")
    data_dir = args.data or default_data_dir()
    started = time.perf_counter()
    print(f"bench.exploration.diagnose: {branches}, seeds {seeds}, {args.rounds} rounds x {args.queries} queries x {args.images_per_query} images, arms {arms}, on {machine()}", flush=True)
    web = OfflineWeb(data_dir)
    # One pool per concept text the arms embed (the same concepts in the same order).
    pools = {text: planning.vocabulary_pool(*vocabulary_pool(args.vocabulary, web, text)) for text in dict.fromkeys(arm_text(a) for a in arms)}
    pool = pools.get(PROJECT_TEXT) or next(iter(pools.values()))
    reward_model = planning.RewardModel(device="cpu")
    corpus = {}
    for size in sizes:
        began = time.perf_counter()
        corpus[size] = embed_corpus(web, size, device)
        print(f"  corpus embedded at {size} px in {time.perf_counter() - began:.0f} s", flush=True)
    results = []
    results_of_all = None
    for branch in branches:
        directory = target_sets.target_dir(data_dir, branch)
        target = target_sets.Target.load(directory)
        relevant = web.relevant(target)
        train = sorted((directory / "train").glob("*"))
        quality, serve_rewards = {}, None
        for size in sizes:
            rewards = knn_rewards(corpus[size], embed_paths(train, size, device))
            quality[f"{size}px"] = reward_quality(rewards, relevant)
            if size == args.serve_size:
                serve_rewards = rewards
        print(f"\n== {branch}: {len(train)} train images", flush=True)
        runs = []
        if "hindsight" in arms and results_of_all is None:
            began = time.perf_counter()
            results_of_all = all_results(pool, web, args.images_per_query)
            print(f"  every concept searched ({len(pool):,}) in {time.perf_counter() - began:.0f} s", flush=True)
        for seed in seeds:
            for arm in arms:
                if arm == "hindsight":  # no randomness: the same plan for every seed
                    run = run_hindsight(seed, pool, results_of_all, relevant, args.rounds, args.queries)
                else:
                    run = run_arm(arm, seed, pools[arm_text(arm)], web, serve_rewards, relevant, reward_model, args.rounds, args.queries, args.images_per_query)
                runs.append(run)
                print(f"    {arm:12s} seed {seed}: new {run.new}, relevant {run.relevant} (plans {run.plan_seconds:.0f} s)", flush=True)
        summary = summarise(branch, runs, quality, relevant, args.rounds)
        print_summary(summary)
        results.append(summary)
        write(args, seeds, arms, sizes, results, started, complete=branch == branches[-1])
    print(f"\nwrote {args.out} in {time.perf_counter() - started:.0f} s")
    return 0


def arm_params(arm: str) -> tuple[planning.ModelParams, planning.SamplingParams]:
    return ARM_PARAMS.get(arm, PROJECT_PARAMS)


def arm_text(arm: str) -> str:
    return ARM_TEXTS.get(arm, PROJECT_TEXT)


def arm_description(arm: str) -> dict:
    out = dict(zip(("mode", "scoring", "concept_reward", "fresh_concepts_only", "descriptors"), ARM_SPECS[arm]))
    if arm not in ("random", "hindsight"):  # uniform draws, or no model: no planner parameters
        model, draw = arm_params(arm)
        out.update(concept_text=arm_text(arm), length_scale=model.length_scale, tier_sizes=list(draw.tiers), tier_masses=list(draw.masses), spread=draw.spread)
    return out


def write(args, seeds: list[int], arms: list[str], sizes: list[int], results: list[dict], started: float, complete: bool) -> None:
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "complete": complete,
        "wall_seconds": round(time.perf_counter() - started),
        "budget": {"rounds": args.rounds, "queries_per_round": args.queries, "images_per_query": args.images_per_query, "seeds": seeds, "vocabulary": args.vocabulary},
        "encoder": {"init": "efficientnet-lite0 (ImageNet), never retrained", "reward": "mean cosine to the k=15 nearest target train images", "sizes": sizes, "serve_size": args.serve_size},
        "arms": {arm: arm_description(arm) for arm in arms},
        "targets": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
