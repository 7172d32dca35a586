"""Which RBF length-scale the concept rewards themselves prefer: the GP's marginal likelihood over a grid.

    python -m bench.exploration.evidence [--branch animals ...] [--observations 256,1024] [--images-per-query 4]
                                         [--concept-texts definition,name]

The paper fixes the length-scale at 1 on unit-length MiniLM embeddings, where unrelated concepts
still correlate at 0.4-0.5. Here, per target of the offline web, concepts are drawn uniformly from
the 146,347 WordNet nouns (seeded; what an exploration observes after its first, uniform rounds),
searched, and given their concept reward two ways: from the fixed encoder's image rewards (what
`ie` sees, 96 px) and from the ground truth (each query's relevant share, what the `oracle` arm
sees). For every (length-scale, noise) of a grid the GP's log marginal likelihood of those rewards
(`gp.log_marginal_likelihood`, equal to scikit-learn's) is computed; the best pair is what a
scikit-learn GaussianProcessRegressor with a free kernel would fit. The same rewards are scored
with each concept text the planner can embed (`definition`, the paper's gloss text; `name`, the
text searched for): the better kernel input has the higher evidence. Writes
bench/results/exploration-length-scale.json; the planner's defaults (length-scale 0.6, concept
text `name`) come from it (docs/planner.md, "Where the defaults differ from the paper's").
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time

import numpy as np
import torch

from bench.exploration.diagnose import RESULTS, concept_value, embed_corpus, embed_paths
from bench.learning.__main__ import OfflineWeb, machine, vocabulary_pool
from services.offlineweb import targets as target_sets
from services.offlineweb.build import default_data_dir
from services.planner import gp
from services.planner.vocabulary import CONCEPT_TEXTS, PAPER_CONCEPT_TEXT
from services.scorer.rewards import knn_rewards

LENGTH_SCALES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0, 1.5)
NOISES = (0.03, 0.1, 0.3, 1.0)


def evidence(embeddings: np.ndarray, rewards: dict[int, float]) -> list[dict]:
    obs = gp.Observations.from_rewards({i: [v] for i, v in rewards.items()})
    return [
        {"length_scale": ls, "noise": noise, "log_marginal_likelihood": round(gp.log_marginal_likelihood(embeddings, obs, length_scale=ls, noise=noise), 2)}
        for ls in LENGTH_SCALES
        for noise in NOISES
    ]


def summary(grid: list[dict]) -> dict:
    best = max(grid, key=lambda g: g["log_marginal_likelihood"])
    at = {(g["length_scale"], g["noise"]): g["log_marginal_likelihood"] for g in grid}
    best_per_scale = {str(ls): max(at[(ls, n)] for n in NOISES) for ls in LENGTH_SCALES}
    return {"best": best, "paper_1.0_noise_0.1": at[(1.0, 0.1)], "project_0.6_noise_0.1": at[(0.6, 0.1)], "best_over_noise_per_length_scale": best_per_scale}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.exploration.evidence", description=__doc__.split("\n\n")[0])
    parser.add_argument("--branch", action="append", help="Tux Paint branch (repeatable; default animals, food, plants, household, vehicles)")
    parser.add_argument("--observations", default="256,1024", help="concepts observed, comma separated")
    parser.add_argument("--images-per-query", type=int, default=4)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concept-texts", default=",".join(CONCEPT_TEXTS), help="what the concepts are embedded as, comma separated (definition: the paper's; name)")
    parser.add_argument("--out", default=str(RESULTS / "exploration-length-scale.json"))
    args = parser.parse_args(argv)
    branches = args.branch or ["animals", "food", "plants", "household", "vehicles"]
    counts = [int(n) for n in args.observations.split(",") if n.strip()]
    texts = [t for t in args.concept_texts.split(",") if t.strip()]
    if set(texts) - set(CONCEPT_TEXTS):
        parser.error(f"--concept-texts: one or more of {', '.join(CONCEPT_TEXTS)}")
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    data_dir = default_data_dir()
    web = OfflineWeb(data_dir)
    embedded = {text: vocabulary_pool("wordnet", web, text) for text in texts}
    vocabulary = embedded[texts[0]][0]  # the same concepts, names and order whatever the text
    corpus = embed_corpus(web, args.size, torch.device("cpu"))
    rng = np.random.default_rng(args.seed)
    drawn = rng.choice(len(vocabulary), max(counts) * 2, replace=False)
    hits = web.search([vocabulary.names[i] for i in drawn], args.images_per_query)
    answered = [(int(i), found) for i, found in zip(drawn, hits) if found][: max(counts)]
    results = []
    for branch in branches:
        directory = target_sets.target_dir(data_dir, branch)
        relevant = web.relevant(target_sets.Target.load(directory))
        image_reward = knn_rewards(corpus, embed_paths(sorted((directory / "train").glob("*")), args.size, torch.device("cpu")))
        row: dict = {"branch": branch}
        for text in texts:
            embeddings = embedded[text][1]
            for n in counts:
                chosen = answered[:n]
                for source in ("reward", "truth"):
                    values = {i: concept_value(found, source, image_reward, relevant) for i, found in chosen}
                    grid = evidence(embeddings, values)
                    # The paper's concept text keeps the keys this file had before it compared texts.
                    key = f"{source}_{n}" if text == PAPER_CONCEPT_TEXT else f"{source}_{n}_{text}"
                    row[key] = {**summary(grid), "grid": grid}
                    best = row[key]["best"]
                    print(f"{branch:10s} {text:10s} {source:6s} n={n:5d}: best length-scale {best['length_scale']} noise {best['noise']} "
                          f"(log evidence {best['log_marginal_likelihood']:.1f}; at 0.6/0.1 {row[key]['project_0.6_noise_0.1']:.1f}, at the paper's 1.0/0.1 {row[key]['paper_1.0_noise_0.1']:.1f})", flush=True)
        results.append(row)
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "wall_seconds": round(time.perf_counter() - started),
        "setup": {"vocabulary": "wordnet", "concept_texts": texts, "keys": "<source>_<observations> for the paper's definition text, <source>_<observations>_<text> otherwise", "observations": counts, "images_per_query": args.images_per_query, "image_size": args.size, "seed": args.seed,
                  "length_scales": list(LENGTH_SCALES), "noises": list(NOISES), "rewards": "standardised, one per concept"},
        "targets": results,
    }
    with open(args.out, "w") as f:
        f.write(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} in {report['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
