"""Per-exploration report: Markdown + PNG plots made from what the system recorded.

Everything comes from the planner's API (iterations, counts, concept rewards, k-NN) and the object
store (iteration manifests with image rewards, dedup decision records with each image's source
URL, the trainer's evaluation records with every test image's k-NN and probe correctness, from
which before/after differences get their paired bootstrap interval). Relevance — the share of stored images whose own concept falls under the target — needs the
ground truth of a generated or offline-web corpus: the corpus.jsonl the search service indexes
(each image's synset / concept) and the target's target.json (its relevant synsets or concepts).
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping
from urllib.parse import urlparse

import numpy as np

from iex.v1 import common_pb2, planner_pb2
from services.cli.display import observed_reward
from services.common.objectstore import ObjectStore, parse_s3_uri

log = logging.getLogger(__name__)


ACCEPTED_KINDS = ("DECISION_KIND_UNIQUE", "DECISION_KIND_EXACT_DUPLICATE", "DECISION_KIND_NEAR_DUPLICATE")


@dataclass
class Relevance:
    """Ground truth: which corpus images are relevant to the target."""

    by_image_id: dict[str, bool]
    rule: str

    @classmethod
    def from_files(cls, corpus_jsonl: Path, target: Mapping) -> "Relevance | None":
        synsets = set(target.get("relevant_synsets", ()))
        concepts = set(target.get("concepts", ()))
        if not synsets and not concepts:
            return None
        out: dict[str, bool] = {}
        with open(corpus_jsonl, encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                record = json.loads(line)
                if synsets:
                    out[record["id"]] = record.get("synset", "") in synsets
                else:
                    out[record["id"]] = record.get("concept", "") in concepts
        rule = f"image synset under the target's WordNet roots ({len(synsets)} synsets)" if synsets else f"image concept in {sorted(concepts)}"
        return cls(out, rule)

    @property
    def base_rate(self) -> float | None:
        """The relevant share of the whole corpus: the yield of fetching images at random."""
        return sum(self.by_image_id.values()) / len(self.by_image_id) if self.by_image_id else None

    def of_url(self, url: str) -> bool | None:
        """The search service serves corpus images at .../images/<id>."""
        path = urlparse(url).path
        if "/images/" not in path:
            return None
        return self.by_image_id.get(path.rsplit("/images/", 1)[1])


@dataclass
class IterationData:
    iteration: int
    summary: planner_pb2.IterationSummary
    concept_rewards: list[float] = field(default_factory=list)
    image_rewards: list[float] = field(default_factory=list)
    stored_urls: list[str] = field(default_factory=list)
    top_queries: list[planner_pb2.QueryRecord] = field(default_factory=list)
    example_keys: dict[str, str] = field(default_factory=dict)  # query id -> object key of its best image
    relevant: int = 0
    judged: int = 0
    judged_urls: set[str] = field(default_factory=set)
    new_urls: set[str] = field(default_factory=set)
    # The same, restricted to the images this iteration stored as new objects.
    new_relevant: int = 0
    new_judged: int = 0
    # Decisions recorded by dedup for this iteration, by kind (the audit records in S3).
    decisions: dict[str, int] = field(default_factory=dict)
    # concept -> concept rewards of this iteration's queries of it
    concept_reward_by_concept: dict[str, list[float]] = field(default_factory=dict)

    @property
    def yield_(self) -> float | None:
        return self.relevant / self.judged if self.judged else None


def all_queries(stub, exploration_id: str) -> list[planner_pb2.QueryRecord]:
    rows, token = [], ""
    while True:
        page = stub.QueryHistory(planner_pb2.QueryHistoryRequest(exploration_id=exploration_id, page_size=1000, page_token=token))
        rows.extend(page.queries)
        token = page.next_page_token
        if not token:
            return rows


def decision_records(store: ObjectStore, bucket: str, exploration_id: str) -> Iterable[dict]:
    for key in store.list_keys(bucket, f"decisions/{exploration_id}/"):
        record = store.get_json(bucket, key)
        if record and "decision" in record:
            yield record["decision"]


def collect(stub, store: ObjectStore, bucket: str, exploration: planner_pb2.Exploration, relevance: Relevance | None) -> list[IterationData]:
    data = {it.iteration: IterationData(it.iteration, it) for it in exploration.iterations}
    for query in all_queries(stub, exploration.exploration_id):
        it = data.get(query.iteration)
        if it is not None and query.complete:
            it.concept_rewards.append(query.concept_reward)
            it.top_queries.append(query)
            it.concept_reward_by_concept.setdefault(query.concept, []).append(query.concept_reward)
    for it in data.values():
        it.top_queries.sort(key=lambda q: -q.concept_reward)
        it.top_queries = it.top_queries[:5]
        manifest = store.get_json(bucket, f"explorations/{exploration.exploration_id}/iterations/{it.iteration}/manifest.json")
        if manifest:
            it.image_rewards = list(manifest.get("candidate_rewards", {}).values())
    best_of_query: dict[str, tuple[float, str]] = {}
    rewards_by_key: dict[str, float] = {}
    for it in data.values():
        manifest = store.get_json(bucket, f"explorations/{exploration.exploration_id}/iterations/{it.iteration}/manifest.json") or {}
        rewards_by_key.update(manifest.get("candidate_rewards", {}))
    for decision in decision_records(store, bucket, exploration.exploration_id):
        it = data.get(int(decision.get("iteration", 0)))
        if it is None:
            continue
        kind = str(decision.get("kind", "")).removeprefix("DECISION_KIND_").lower()
        it.decisions[kind] = it.decisions.get(kind, 0) + 1
        url = decision.get("url", "")
        if decision.get("kind") == "DECISION_KIND_UNIQUE":
            it.stored_urls.append(url)
        # Yield: the distinct web images the iteration found and accepted (new, or a duplicate of an
        # image already stored, by this exploration or an earlier one), judged by the ground truth.
        verdict = relevance.of_url(url) if relevance is not None and decision.get("kind") in ACCEPTED_KINDS else None
        if verdict is not None:
            if url not in it.judged_urls:
                it.judged_urls.add(url)
                it.judged += 1
                it.relevant += int(verdict)
            if decision.get("kind") == "DECISION_KIND_UNIQUE" and url not in it.new_urls:
                it.new_urls.add(url)
                it.new_judged += 1
                it.new_relevant += int(verdict)
        key = decision.get("object_key", "")
        reward = rewards_by_key.get(key)
        query_id = decision.get("query_id", "")
        if key and reward is not None and (query_id not in best_of_query or reward > best_of_query[query_id][0]):
            best_of_query[query_id] = (reward, key)
    for it in data.values():
        for query in it.top_queries:
            if query.query_id in best_of_query:
                it.example_keys[query.query_id] = best_of_query[query.query_id][1]
    return [data[n] for n in sorted(data)]


# ---------------------------------------------------------------------------------------------
# Representation quality: before (the initial encoder) vs after, paired on the same test images.

PAIRED_PROTOCOL = "train->test"
METRICS = (("knn", "knn_correct", "k-NN top-1"), ("linear_probe", "probe_correct", "linear probe top-1"))


def evaluation_records(store: ObjectStore, bucket: str, exploration: planner_pb2.Exploration) -> dict[int, dict]:
    """The trainer's evaluation record of the initial encoder (iteration 0) and of the model
    trained on each iteration, by iteration; an iteration without one is left out."""
    wanted = {0: (exploration.initial_evaluation.record_key, exploration.initial_evaluation.model.version or 1)}
    for it in exploration.iterations:
        wanted[it.iteration] = (it.evaluation.record_key, it.trained_model.version or it.evaluation.model.version)
    records = {}
    for iteration, (key, version) in wanted.items():
        if not key and not version:
            continue
        key = key or f"evaluations/{exploration.exploration_id}/v{version}.json"
        try:
            record = store.get_json(bucket, key)
        except ValueError:  # not JSON: as good as absent
            record = None
        if isinstance(record, dict):
            records[iteration] = record
    return records


def not_comparable(before: Mapping | None, after: Mapping | None) -> str:
    """Why two evaluation records cannot be compared image by image ("" when they can)."""
    if before is None or after is None:
        return "no evaluation record of " + ("the initial encoder" if before is None else "this version") + " (the trainer writes one per version)"
    if before.get("protocol") != after.get("protocol"):
        return f"evaluated under different protocols ({before.get('protocol')} before, {after.get('protocol')} after)"
    if before.get("protocol") != PAIRED_PROTOCOL:
        return before.get("not_measurable_reason") or f"protocol {before.get('protocol')!r} gives no per-image scores to pair"
    if not before.get("measurable"):
        return before.get("not_measurable_reason") or "the trainer found the split unable to measure"
    return ""


def compare(before: Mapping | None, after: Mapping | None, level: float = 0.95) -> dict:
    """Before/after accuracies of two evaluation records with the paired bootstrap interval of
    after - before, over the test images both scored. Never a verdict when the split cannot
    measure: then `measurable` is False and `reason` says why, and no difference is given."""
    reason = not_comparable(before, after)
    out: dict = {"measurable": not reason, "reason": reason, "test_images": 0, "detectable_difference": None}
    for name, _, _ in METRICS:
        out[name] = None
    if reason:
        return out
    from services.trainer.evaluation import detectable_difference, paired_bootstrap
    import torch

    position = {key: i for i, key in enumerate(after["test"]["keys"])}
    pairs = [(i, position[key]) for i, key in enumerate(before["test"]["keys"]) if key in position]
    if not pairs:
        out.update(measurable=False, reason="the two versions share no test image")
        return out
    out["test_images"] = len(pairs)
    out["detectable_difference"] = detectable_difference(len(pairs), level)
    if len(pairs) != len(before["test"]["keys"]) or len(pairs) != len(after["test"]["keys"]):
        out["note"] = f"paired on the {len(pairs)} test images both versions scored ({len(before['test']['keys'])} before, {len(after['test']['keys'])} after)"
    for name, field_name, _ in METRICS:
        a, b = before["test"].get(field_name), after["test"].get(field_name)
        if a is None or b is None:
            continue
        x = torch.tensor([a[i] for i, _ in pairs], dtype=torch.float64)
        y = torch.tensor([b[j] for _, j in pairs], dtype=torch.float64)
        interval = paired_bootstrap(x, y, level=level)
        out[name] = {
            "before": float(x.mean()),
            "after": float(y.mean()),
            **{key: float(value) for key, value in interval.to_dict().items()},
            "excludes_zero": interval.excludes_zero,
            "verdict": ("better" if interval.low > 0 else "worse") if interval.excludes_zero else "no change shown",
        }
    return out


def evaluation_numbers(exploration: planner_pb2.Exploration, records: Mapping[int, dict]) -> dict:
    """report.json's "evaluation": the protocol and measurability of the target's splits, and the
    last evaluated version against the initial encoder (plus every iteration's comparison)."""
    initial = exploration.initial_evaluation
    before = records.get(0)
    evaluated = [it for it in exploration.iterations if it.eval_images]
    last = evaluated[-1] if evaluated else None
    per_iteration = []
    for it in exploration.iterations:
        if it.eval_images:
            per_iteration.append({"iteration": it.iteration, "version": it.trained_model.version or it.evaluation.model.version, **compare(before, records.get(it.iteration))})
    main = per_iteration[-1] if per_iteration else compare(before, None)
    protocol = initial.protocol or (before or {}).get("protocol") or ("eval-split-cv" if initial.eval_images else "")
    measurable = bool(main["measurable"]) and bool(last)
    reason = main["reason"] if last else ("the initial encoder was not evaluated (the target has no labelled test split)" if not initial.eval_images else "no trained version was evaluated yet")
    return {
        "protocol": protocol or None,
        "test_images": initial.eval_images,
        "train_images": initial.train_images,
        "classes": initial.classes,
        "measurable": measurable,
        "not_measurable_reason": "" if measurable else reason,
        "detectable_difference": float(initial.detectable_difference) if initial.detectable_difference else main.get("detectable_difference"),
        "before": {"version": initial.model.version, "knn_top1": float(initial.knn_top1) if initial.eval_images else None, "linear_probe_top1": float(initial.linear_probe_top1) if initial.eval_images else None},
        "after": (
            {"iteration": last.iteration, "version": last.trained_model.version or last.evaluation.model.version, "knn_top1": float(last.knn_top1), "linear_probe_top1": float(last.linear_probe_top1)}
            if last
            else None
        ),
        "knn": main["knn"] if measurable else None,
        "linear_probe": main["linear_probe"] if measurable else None,
        "note": main.get("note"),
        "per_iteration": per_iteration,
    }


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def difference_text(metric: Mapping | None) -> str:
    """'+0.062 [95% CI -0.016, +0.141]' for one metric's comparison."""
    if not metric:
        return "-"
    level = int(round(100 * metric["level"]))
    return f"{_signed(metric['mean'])} [{level}% CI {_signed(metric['low'])}, {_signed(metric['high'])}]"


def evaluation_lines(ev: Mapping) -> list[str]:
    """The report's lines on representation quality: numbers with their interval when the split
    can measure, the reason instead of numbers when it cannot."""
    if not ev["test_images"]:
        return ["- representation quality: not evaluated (the target has no labelled test split)"]
    if ev["protocol"] == PAIRED_PROTOCOL:
        how = f"k-NN memory bank and linear probe fitted on {ev['train_images']} labelled train images, scored on {ev['test_images']} test images of {ev['classes']} classes"
    else:
        how = f"{ev['test_images']} test images, within-split estimates ({ev['protocol']}): no labelled train split"
    if not ev["measurable"]:
        return [f"- representation quality ({how}): **not measurable**: {ev['not_measurable_reason']}"]
    before, after = ev["before"], ev["after"]
    lines = [f"- representation quality, the paper's protocol ({how}); version {after['version']} (iteration {after['iteration']}) against the initial encoder (v{before['version']}):"]
    for name, _, title in METRICS:
        metric = ev[name]
        if metric:
            verdict = {"better": "better, the interval excludes 0", "worse": "worse, the interval excludes 0", "no change shown": "no change shown: the interval includes 0"}[metric["verdict"]]
            lines.append(f"  - {title}: {metric['before']:.3f} before -> {metric['after']:.3f} after, difference {difference_text(metric)} ({verdict})")
    lines.append(f"  - smallest difference these {ev['test_images']} test images can show: {ev['detectable_difference']:.3f}" + (f"; {ev['note']}" if ev.get("note") else ""))
    return lines


def _seconds(ts) -> float:
    return ts.ToNanoseconds() / 1e9 if (ts.seconds or ts.nanos) else 0.0


def stage_seconds(summary: planner_pb2.IterationSummary) -> dict[str, float | None]:
    """Where an iteration's wall time went, from the planner's timestamps: planning (the posterior
    and sampling), collecting (search, download, dedup, scoring until every query is accounted
    for), training (trainer: SSL training, evaluation, export) and serving (scorer: Triton load
    and target bank of the new version). None when the stage has not ended."""
    started, collected, trained, finished = (_seconds(t) for t in (summary.started_at, summary.collected_at, summary.trained_at, summary.finished_at))
    return {
        "planning": float(summary.planning_seconds),
        "collecting": collected - started if started and collected else None,
        "training": trained - collected if collected and trained else None,
        "serving": finished - trained if trained and finished else None,
    }


def _stats(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "mean": None, "median": None, "p10": None, "p90": None, "max": None}
    array = np.asarray(values, dtype=float)
    return {
        "n": int(array.size),
        "mean": float(array.mean()),
        "median": float(np.median(array)),
        "p10": float(np.quantile(array, 0.1)),
        "p90": float(np.quantile(array, 0.9)),
        "max": float(array.max()),
    }


def count_numbers(c: common_pb2.ImageCounts) -> dict:
    """The planner's counts under the report's names (per iteration and in total)."""
    return {
        "queries_issued": c.queries_issued,
        "queries_crawled": c.queries_crawled,
        "fetched": c.images_fetched,
        "stored": c.images_unique,
        "duplicates": c.images_duplicate,
        "contaminating": c.images_contaminating,
        "invalid": c.images_invalid,
        "refused": c.images_refused,
        "scored": c.images_scored,
    }


def iteration_numbers(it: IterationData) -> dict:
    s = it.summary
    c = s.counts
    return {
        "iteration": it.iteration,
        "phase": common_pb2.IterationPhase.Name(s.phase).removeprefix("ITERATION_PHASE_").lower(),
        **count_numbers(c),
        "queries_incomplete": s.queries_incomplete,
        "search_results": c.search_results,
        "decision_records": dict(sorted(it.decisions.items())),
        "relevant": it.relevant,
        "judged": it.judged,
        "yield": it.yield_,
        "new_relevant": it.new_relevant,
        "new_judged": it.new_judged,
        "concept_reward": {**_stats(it.concept_rewards), "planner_mean": float(s.mean_concept_reward), "planner_max": float(s.max_concept_reward)},
        "image_reward": _stats(it.image_rewards),
        "knn_top1": float(s.knn_top1) if s.eval_images else None,
        "linear_probe_top1": float(s.linear_probe_top1) if s.eval_images else None,
        "eval_images": s.eval_images,
        "scored_with": s.scored_with.version,
        "trained_model": s.trained_model.version,
        "reward_model": s.reward_model,
        "seconds": stage_seconds(s),
        "top_queries": [
            {"query_id": q.query_id, "text": q.text, "concept": q.concept, "concept_reward": float(q.concept_reward), "stored": q.counts.images_unique, "example": it.example_keys.get(q.query_id)}
            for q in it.top_queries
        ],
    }


def top_concepts_over_time(iterations: list[IterationData], limit: int = 8) -> tuple[list[str], dict[str, list[float | None]]]:
    """The concepts with the best single concept reward, and their reward per iteration (None: not queried)."""
    best: dict[str, float] = {}
    for it in iterations:
        for concept, rewards in it.concept_reward_by_concept.items():
            best[concept] = max(best.get(concept, -2.0), max(rewards))
    chosen = sorted(best, key=lambda c: (-best[c], c))[:limit]
    series = {c: [float(np.mean(it.concept_reward_by_concept[c])) if c in it.concept_reward_by_concept else None for it in iterations] for c in chosen}
    return chosen, series


def _short(concept: str) -> str:
    """`apple.n07739125` -> `apple`."""
    head, _, tail = concept.rpartition(".")
    return head if head and tail[:1] == "n" and tail[1:].isdigit() else concept


def yield_axis_top(yields: list[float | None], base_rate: float | None) -> float:
    """The yield axis ends a little above the largest value shown (yields and the base rate), not
    at 1: yields of a few percent against a base rate of a few percent must be told apart."""
    values = [v for v in (*yields, base_rate) if v is not None]
    return min(1.0, max(0.05, 1.25 * max(values, default=0.0)))


def _plots(iterations: list[IterationData], initial: planner_pb2.EncoderEvaluation, out: Path, evaluation: Mapping | None = None,
           base_rate: float | None = None) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[tuple[str, str]] = []
    xs = [it.iteration for it in iterations]

    def save(fig, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append((name, caption))

    yields = [it.yield_ for it in iterations]
    if any(y is not None for y in yields):
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(xs, [np.nan if y is None else y for y in yields], "o-", color="tab:green", label="yield of the iteration")
        for x, it in zip(xs, iterations):
            if it.yield_ is not None:
                ax.annotate(f"{it.relevant}/{it.judged}", (x, it.yield_), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        if base_rate is not None:
            ax.axhline(base_rate, color="tab:gray", linestyle="--", label=f"corpus base rate {base_rate:.1%} (its images drawn uniformly)")
        ax.set_ylim(0, yield_axis_top(yields, base_rate))
        ax.set_xticks(xs)
        ax.set_xlabel("iteration")
        ax.set_ylabel("relevant share of accepted images")
        ax.set_title("Relevant-image yield (ground truth: WordNet subtree of the target)")
        ax.legend(fontsize=8, loc="upper left")
        save(fig, "yield.png", "Relevant-image yield per iteration, against the corpus base rate")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.boxplot([it.concept_rewards or [np.nan] for it in iterations], positions=xs, widths=0.5)
    ax.plot(xs, [it.summary.mean_concept_reward for it in iterations], "o-", label="mean concept reward")
    ax.set_xlabel("iteration")
    ax.set_ylabel("concept reward")
    ax.set_title("Concept rewards (mean of a query's top-10 image rewards)")
    ax.legend()
    save(fig, "concept_rewards.png", "Concept reward distribution per iteration")

    if any(it.image_rewards for it in iterations):
        fig, ax = plt.subplots(figsize=(7, 4))
        for it in iterations:
            if it.image_rewards:
                ax.hist(it.image_rewards, bins=30, histtype="step", linewidth=1.5, label=f"iteration {it.iteration} ({len(it.image_rewards)})")
        ax.set_xlabel("image reward (mean cosine to the 15 nearest target images)")
        ax.set_ylabel("new stored images")
        ax.set_title("Image reward distribution")
        ax.legend()
        save(fig, "image_rewards.png", "Image reward distribution per iteration")

    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = np.zeros(len(xs))
    for label, getter in (
        ("stored (new)", lambda c: c.images_unique),
        ("duplicates", lambda c: c.images_duplicate),
        ("contaminating", lambda c: c.images_contaminating),
        ("invalid", lambda c: c.images_invalid),
        ("refused", lambda c: c.images_refused),
    ):
        values = np.array([getter(it.summary.counts) for it in iterations], dtype=float)
        ax.bar(xs, values, bottom=bottom, label=label)
        bottom += values
    ax.plot(xs, [it.summary.counts.images_fetched for it in iterations], "k_", markersize=30, label="fetched")
    ax.set_xticks(xs)
    ax.set_xlabel("iteration")
    ax.set_ylabel("images")
    ax.set_title("Images fetched, stored, duplicate, refused")
    ax.legend(fontsize=8)
    save(fig, "images.png", "What happened to the fetched images")

    knn = [it.summary.knn_top1 if it.summary.eval_images else np.nan for it in iterations]
    probe = [it.summary.linear_probe_top1 if it.summary.eval_images else np.nan for it in iterations]
    if initial.eval_images or not all(np.isnan(knn)):
        fig, ax = plt.subplots(figsize=(7, 4))
        qx = ([0] if initial.eval_images else []) + xs
        ax.plot(qx, ([initial.knn_top1] if initial.eval_images else []) + knn, "o-", label="k-NN top-1")
        ax.plot(qx, ([initial.linear_probe_top1] if initial.eval_images else []) + probe, "s--", label="linear probe top-1")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(qx)
        ax.set_xlabel("iteration (0: initial encoder)")
        ax.set_ylabel("accuracy on the target's test split")
        measurable = bool(evaluation and evaluation.get("measurable"))
        ax.set_title("Representation quality" + ("" if measurable else " (not measurable on this target)"))
        ax.legend()
        save(fig, "quality.png", "k-NN and linear-probe accuracy per iteration (0 = before any web image)")

    if any(it.concept_reward_by_concept for it in iterations):
        # One panel per iteration, its best concepts, all on one reward scale, so that panels compare
        # at a glance; each iteration's rewards come from its own encoder version (the report's
        # "mean / max concept reward" column shows how the scale itself moves).
        fig, axes = plt.subplots(1, len(iterations), figsize=(max(7, 3.2 * len(iterations)), 3.8), squeeze=False, sharex=True)
        for ax, it in zip(axes[0], iterations):
            best = sorted(((max(r), c) for c, r in it.concept_reward_by_concept.items()), reverse=True)[:6]
            ax.barh([_short(c)[:22] for _, c in reversed(best)], [r for r, _ in reversed(best)], color="tab:purple")
            ax.set_title(f"iteration {it.iteration}", fontsize=10)
            ax.tick_params(axis="y", labelsize=7)
            ax.set_xlabel("concept reward", fontsize=8)
        fig.suptitle("Top concepts over time")
        save(fig, "top_concepts.png", "Top concepts of each iteration")

    stages = [stage_seconds(it.summary) for it in iterations]
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = np.zeros(len(xs))
    for name in ("planning", "collecting", "training", "serving"):
        values = np.array([s[name] or 0.0 for s in stages], dtype=float)
        ax.bar(xs, values, bottom=bottom, label=name)
        bottom += values
    ax.set_xticks(xs)
    ax.set_xlabel("iteration")
    ax.set_ylabel("seconds")
    ax.set_title("Time per stage")
    ax.legend()
    save(fig, "stages.png", "Time per stage and iteration")
    return made


def _thumbnail(store: ObjectStore, bucket: str, key: str, out: Path) -> str | None:
    from PIL import Image

    data = store.get_or_none(bucket, key)
    if data is None:
        return None
    name = f"img-{key.rsplit('/', 1)[-1][:16]}.png"
    with Image.open(io.BytesIO(data)) as image:
        image.thumbnail((96, 96))
        image.save(out / name)
    return name


def _difference_cell(comparison: Mapping | None, metric: str) -> str:
    if comparison is None:
        return "-"
    if not comparison["measurable"]:
        return "not measurable"
    return difference_text(comparison[metric])


def _fmt(value, spec: str = ".3f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _secs(value, spec: str = ".0f") -> str:
    return "-" if value is None else f"{format(value, spec)} s"


def write_report(stub, store: ObjectStore, bucket: str, exploration_id: str, out_dir: Path, corpus_jsonl: Path | None = None) -> Path:
    """Writes <out_dir>/<exploration_id>/report.md, its PNG plots and report.json (every number of
    the report); returns the path of report.md."""
    exploration = stub.GetExploration(planner_pb2.GetExplorationRequest(exploration_id=exploration_id)).exploration
    relevance = None
    target_bucket, target_prefix = parse_s3_uri(exploration.spec.target_uri)
    target = store.get_json(target_bucket, f"{target_prefix}/target.json" if target_prefix else "target.json")
    if target and corpus_jsonl is not None and corpus_jsonl.exists():
        relevance = Relevance.from_files(corpus_jsonl, target)
    iterations = collect(stub, store, bucket, exploration, relevance)
    out = out_dir / exploration_id
    out.mkdir(parents=True, exist_ok=True)
    initial = exploration.initial_evaluation
    evaluation = evaluation_numbers(exploration, evaluation_records(store, bucket, exploration))
    base_rate = relevance.base_rate if relevance is not None else None
    plots = _plots(iterations, initial, out, evaluation, base_rate) if iterations else []
    try:
        top_now = stub.TopConcepts(planner_pb2.TopConceptsRequest(exploration_id=exploration_id, limit=10))
    except Exception as exc:  # noqa: BLE001 - the report is still useful without the planner's ranking
        log.warning("no top concepts: %s", exc)
        top_now = None
    c = exploration.counts
    state = common_pb2.ExplorationState.Name(exploration.state).removeprefix("EXPLORATION_STATE_").lower()
    mode = common_pb2.ExplorationMode.Name(exploration.spec.mode).removeprefix("EXPLORATION_MODE_").lower()
    per_iteration = [iteration_numbers(it) for it in iterations]
    judged = sum(it.judged for it in iterations)
    numbers = {
        "exploration_id": exploration_id,
        "target_uri": exploration.spec.target_uri,
        "target_branch": (target or {}).get("branch"),
        "mode": mode,
        "state": state,
        "stop_reason": exploration.stop_reason,
        "init": exploration.spec.init,
        "backbone": exploration.spec.backbone,
        "image_size": exploration.spec.image_size,
        "vocabulary": exploration.spec.vocabulary,
        "vocabulary_size": exploration.vocabulary_size,
        "iterations_planned": exploration.spec.iterations,
        "iterations_finished": exploration.iterations_finished,
        "queries_per_iteration": exploration.spec.queries_per_iteration,
        "images_per_query": exploration.spec.images_per_query,
        "wall_seconds": _seconds(exploration.updated_at) - _seconds(exploration.created_at),
        "relevance_rule": relevance.rule if relevance else None,
        "corpus_base_rate": base_rate,
        "totals": {
            **count_numbers(c),
            "relevant": sum(it.relevant for it in iterations),
            "judged": judged,
            "yield": (sum(it.relevant for it in iterations) / judged) if judged else None,
        },
        "initial_evaluation": {
            "model_version": initial.model.version,
            "knn_top1": float(initial.knn_top1) if initial.eval_images else None,
            "linear_probe_top1": float(initial.linear_probe_top1) if initial.eval_images else None,
            "eval_images": initial.eval_images,
            "protocol": initial.protocol or None,
            "train_images": initial.train_images,
        },
        "evaluation": evaluation,
        "eval_labels": len((target or {}).get("labels", {})) or None,
        "iterations": per_iteration,
        "top_concepts_now": [
            {"concept": t.concept, "sampling_probability": float(t.sampling_probability), "observed_reward": observed_reward(t), "predicted_reward": float(t.predicted_reward), "uncertainty": float(t.uncertainty), "times_queried": t.times_queried}
            for t in (top_now.concepts if top_now is not None else [])
        ],
        "plots": [name for name, _ in plots],
    }
    chosen, series = top_concepts_over_time(iterations)
    numbers["best_concepts_over_time"] = [{"concept": c, "reward_by_iteration": series[c]} for c in chosen]

    lines = [
        f"# Exploration `{exploration_id}`",
        "",
        f"- target: `{exploration.spec.target_uri}`" + (f" (Tux Paint branch `{numbers['target_branch']}`)" if numbers["target_branch"] else "")
        + f"; mode **{mode}**, vocabulary {exploration.spec.vocabulary or 'custom'} ({exploration.vocabulary_size} concepts); state **{state}**"
        + (f" ({exploration.stop_reason})" if exploration.stop_reason else ""),
        f"- encoder: init `{exploration.spec.init}`, backbone `{exploration.spec.backbone}` at {exploration.spec.image_size} px; serving "
        f"`{exploration.serving_model.name}` v{exploration.serving_model.version}",
        f"- {exploration.iterations_finished}/{exploration.spec.iterations} iterations of {exploration.spec.queries_per_iteration} queries x "
        f"{exploration.spec.images_per_query} images; wall time {numbers['wall_seconds']:.0f} s",
        f"- queries: {c.queries_issued} issued, {c.queries_crawled} crawled; images: {c.images_fetched} fetched, "
        f"{c.images_unique} stored, {c.images_duplicate} duplicates, {c.images_contaminating} contaminating the target, "
        f"{c.images_invalid} invalid, {c.images_refused} refused; {c.images_scored} scored",
    ]
    if relevance is not None:
        t = numbers["totals"]
        lines.append(f"- relevance: {relevance.rule}; overall yield {_fmt(t['yield'])} ({t['relevant']}/{t['judged']} distinct images accepted, new or duplicate, counted once per iteration)")
        if base_rate:
            lift = f", {t['yield'] / base_rate:.2f}x" if t["yield"] is not None else ""
            lines.append(f"- corpus base rate (the relevant share of the whole corpus: the yield of its images drawn uniformly): {_fmt(base_rate)}{lift}")
    lines += evaluation_lines(evaluation)
    lines += [
        "",
        "| iteration | fetched | stored | duplicates | contaminating | invalid | refused | scored | relevant yield | mean / max concept reward | k-NN | linear probe | k-NN - initial | probe - initial | planning | collecting | training | serving |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if initial.eval_images:
        lines.append(f"| 0 (initial v{initial.model.version}) | | | | | | | | | | {initial.knn_top1:.3f} | {initial.linear_probe_top1:.3f} | | | | | | |")
    comparisons = {c["iteration"]: c for c in evaluation["per_iteration"]}
    for n in per_iteration:
        yield_text = f"{n['yield']:.3f} ({n['relevant']}/{n['judged']})" if n["yield"] is not None else "-"
        sec = n["seconds"]
        lines.append(
            f"| {n['iteration']} | {n['fetched']} | {n['stored']} | {n['duplicates']} | {n['contaminating']} | {n['invalid']} | {n['refused']} | {n['scored']} | "
            f"{yield_text} | {n['concept_reward']['planner_mean']:.3f} / {n['concept_reward']['planner_max']:.3f} | {_fmt(n['knn_top1'])} | {_fmt(n['linear_probe_top1'])} | "
            f"{_difference_cell(comparisons.get(n['iteration']), 'knn')} | {_difference_cell(comparisons.get(n['iteration']), 'linear_probe')} | "
            f"{_secs(sec['planning'], '.1f')} | {_secs(sec['collecting'])} | {_secs(sec['training'])} | {_secs(sec['serving'])} |"
        )
    lines.append("")
    for name, caption in plots:
        lines += [f"### {caption}", "", f"![{caption}]({name})", ""]
    lines += ["## Top queries per iteration, with the best image each found", ""]
    for it in iterations:
        lines += [f"### Iteration {it.iteration}", "", "| query | concept reward | stored | best image |", "|---|---|---|---|"]
        for query in it.top_queries:
            key = it.example_keys.get(query.query_id)
            thumb = _thumbnail(store, bucket, key, out) if key else None
            lines.append(f"| {query.text} | {query.concept_reward:.3f} | {query.counts.images_unique} | {f'![]({thumb})' if thumb else '-'} |")
        lines.append("")
    if numbers["top_concepts_now"]:
        lines += ["## The planner's ranking now (TopConcepts)", "", "| concept | p | observed | predicted | queried |", "|---|---|---|---|---|"]
        for t in numbers["top_concepts_now"]:
            observed = f"{t['observed_reward']:.3f}" if t["observed_reward"] is not None else ("never queried" if not t["times_queried"] else "not observed yet")
            lines.append(f"| {t['concept']} | {t['sampling_probability']:.4f} | {observed} | {t['predicted_reward']:.3f} ± {t['uncertainty']:.3f} | {t['times_queried']} |")
        lines.append("")
    lines += ["Numbers: [report.json](report.json) (made by `iex report`, from the planner's API and the objects in S3).", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps(numbers, indent=2, sort_keys=True))
    return path


def default_corpus_jsonl() -> Path | None:
    configured = os.environ.get("IEX_SEARCH_CORPUS_DIR")
    if configured:
        return Path(configured) / "corpus.jsonl"
    from services.stack.servers import search_corpus_dir

    return search_corpus_dir() / "corpus.jsonl"
