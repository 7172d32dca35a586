"""Per-exploration report: Markdown + PNG plots made from what the system recorded.

Everything comes from the planner's API (iterations, counts, concept rewards, k-NN) and the object
store (iteration manifests with image rewards, dedup decision records with each image's source
URL). Relevance — the share of stored images whose own concept falls under the target — needs the
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
from services.common.objectstore import ObjectStore, parse_s3_uri

log = logging.getLogger(__name__)


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
        if decision.get("kind") == "DECISION_KIND_UNIQUE":
            it.stored_urls.append(decision.get("url", ""))
            if relevance is not None:
                verdict = relevance.of_url(decision.get("url", ""))
                if verdict is not None:
                    it.judged += 1
                    it.relevant += int(verdict)
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


def _plots(iterations: list[IterationData], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    xs = [it.iteration for it in iterations]

    fig, ax = plt.subplots(figsize=(7, 4))
    box_data = [it.concept_rewards or [np.nan] for it in iterations]
    ax.boxplot(box_data, positions=xs, widths=0.5)
    ax.plot(xs, [it.summary.mean_concept_reward for it in iterations], "o-", label="mean concept reward")
    ax.set_xlabel("iteration")
    ax.set_ylabel("concept reward (top-10 mean cosine to k=15 nearest target images)")
    ax.set_title("Concept rewards per iteration")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "concept_rewards.png", dpi=110)
    plt.close(fig)
    made.append("concept_rewards.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = np.zeros(len(xs))
    for label, getter in (
        ("stored", lambda c: c.images_unique),
        ("duplicates", lambda c: c.images_duplicate),
        ("contaminating", lambda c: c.images_contaminating),
        ("invalid", lambda c: c.images_invalid),
        ("refused", lambda c: c.images_refused),
    ):
        values = np.array([getter(it.summary.counts) for it in iterations], dtype=float)
        ax.bar(xs, values, bottom=bottom, label=label)
        bottom += values
    ax.set_xlabel("iteration")
    ax.set_ylabel("images")
    ax.set_title("What happened to the fetched URLs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "images.png", dpi=110)
    plt.close(fig)
    made.append("images.png")

    if any(it.image_rewards for it in iterations):
        fig, ax = plt.subplots(figsize=(7, 4))
        for it in iterations:
            if it.image_rewards:
                ax.hist(it.image_rewards, bins=20, histtype="step", label=f"iteration {it.iteration}")
        ax.set_xlabel("image reward")
        ax.set_ylabel("stored images")
        ax.set_title("Image reward distribution")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "image_rewards.png", dpi=110)
        plt.close(fig)
        made.append("image_rewards.png")

    yields = [it.yield_ for it in iterations]
    knn = [it.summary.knn_top1 or np.nan for it in iterations]
    if any(y is not None for y in yields) or not all(np.isnan(knn)):
        fig, ax = plt.subplots(figsize=(7, 4))
        if any(y is not None for y in yields):
            ax.plot(xs, [np.nan if y is None else y for y in yields], "o-", label="relevant-image yield")
        if not all(np.isnan(knn)):
            ax.plot(xs, knn, "s--", label="k-NN top-1 on target eval")
        ax.set_ylim(0, 1)
        ax.set_xlabel("iteration")
        ax.set_title("Yield and representation quality")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "quality.png", dpi=110)
        plt.close(fig)
        made.append("quality.png")
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


def write_report(stub, store: ObjectStore, bucket: str, exploration_id: str, out_dir: Path, corpus_jsonl: Path | None = None) -> Path:
    exploration = stub.GetExploration(planner_pb2.GetExplorationRequest(exploration_id=exploration_id)).exploration
    relevance = None
    target_bucket, target_prefix = parse_s3_uri(exploration.spec.target_uri)
    target = store.get_json(target_bucket, f"{target_prefix}/target.json" if target_prefix else "target.json")
    if target and corpus_jsonl is not None and corpus_jsonl.exists():
        relevance = Relevance.from_files(corpus_jsonl, target)
    iterations = collect(stub, store, bucket, exploration, relevance)
    out = out_dir / exploration_id
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(iterations, out) if iterations else []
    c = exploration.counts
    state = common_pb2.ExplorationState.Name(exploration.state).removeprefix("EXPLORATION_STATE_").lower()
    mode = common_pb2.ExplorationMode.Name(exploration.spec.mode).removeprefix("EXPLORATION_MODE_").lower()
    lines = [
        f"# Exploration `{exploration_id}`",
        "",
        f"- target: `{exploration.spec.target_uri}`; mode: **{mode}**; state: **{state}**; "
        f"{exploration.iterations_finished}/{exploration.spec.iterations} iterations; serving model "
        f"`{exploration.serving_model.name}` v{exploration.serving_model.version}",
        f"- queries: {c.queries_issued} issued, {c.queries_crawled} crawled; images: {c.images_fetched} fetched, "
        f"{c.images_unique} stored, {c.images_duplicate} duplicates, {c.images_contaminating} contaminating the target, "
        f"{c.images_invalid} invalid, {c.images_refused} refused; {c.images_scored} scored",
    ]
    if relevance is not None:
        lines.append(f"- relevance: {relevance.rule}")
    lines += ["", "| iteration | stored | duplicates | scored | mean concept reward | max | relevant yield | k-NN top-1 | scored with | trained | wall time |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for it in iterations:
        s = it.summary
        wall = (s.finished_at.ToSeconds() - s.started_at.ToSeconds()) if s.finished_at.seconds else 0
        yield_text = f"{it.yield_:.3f} ({it.relevant}/{it.judged})" if it.yield_ is not None else "-"
        lines.append(
            f"| {it.iteration} | {s.counts.images_unique} | {s.counts.images_duplicate} | {s.counts.images_scored} | "
            f"{s.mean_concept_reward:.3f} | {s.max_concept_reward:.3f} | {yield_text} | "
            f"{s.knn_top1:.3f} | v{s.scored_with.version} | v{s.trained_model.version} | {wall:.0f} s |"
        )
    lines.append("")
    for name in plots:
        lines += [f"![{name}]({name})", ""]
    lines += ["## Top queries per iteration", ""]
    for it in iterations:
        lines.append(f"### Iteration {it.iteration}")
        lines.append("")
        lines.append("| query | concept reward | stored | best image |")
        lines.append("|---|---|---|---|")
        for query in it.top_queries:
            key = it.example_keys.get(query.query_id)
            thumb = _thumbnail(store, bucket, key, out) if key else None
            lines.append(f"| {query.text} | {query.concept_reward:.3f} | {query.counts.images_unique} | {f'![]({thumb})' if thumb else '-'} |")
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    (out / "report.json").write_text(
        json.dumps(
            {
                "exploration_id": exploration_id,
                "iterations": [
                    {
                        "iteration": it.iteration,
                        "stored": it.summary.counts.images_unique,
                        "scored": it.summary.counts.images_scored,
                        "mean_concept_reward": it.summary.mean_concept_reward,
                        "relevant": it.relevant,
                        "judged": it.judged,
                        "yield": it.yield_,
                        "knn_top1": it.summary.knn_top1,
                    }
                    for it in iterations
                ],
            },
            indent=2,
        )
    )
    return path


def default_corpus_jsonl() -> Path | None:
    configured = os.environ.get("IEX_SEARCH_CORPUS_DIR")
    if configured:
        return Path(configured) / "corpus.jsonl"
    from services.stack.servers import search_corpus_dir

    return search_corpus_dir() / "corpus.jsonl"
