"""Pure logic of the exploration benchmark: relevant-image yield, aggregation over seeds, goals, table.

No I/O here (unit-tested in tests/unit/test_bench_exploration.py); the runner in __main__.py reads
the topics and hands their events to these functions as plain tuples.

Definitions:
- An exploration's **stored images** are the images dedup accepted for it (decision UNIQUE, EXACT_DUPLICATE
  or NEAR_DUPLICATE: the image the query is credited with, the one the trainer reads), counted once
  per stored object (`object_key`). Dedup is shared by every exploration of the stack, so "unique"
  alone would depend on which exploration happened to fetch a picture first; the credited object
  does not. Invalid images and target-contaminating ones are not stored.
- An image is **relevant** when the offline-web corpus synset of the URL it was fetched from lies in
  the target's `relevant_synsets` (target.json); an image without a synset is never relevant.
- **Yield** of an iteration: relevant / stored over the images of that iteration's queries
  (distinct within the iteration). **Cumulative yield** up to iteration k: over the distinct
  images of iterations 1..k (an image fetched again later counts once, when first stored).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence
from urllib.parse import unquote, urlsplit

# DecisionKind values (protos/iex/v1/common.proto) of a stored, credited image.
STORED_KINDS = frozenset({1, 2, 3})  # UNIQUE, EXACT_DUPLICATE, NEAR_DUPLICATE

MODES = ("random", "ie", "ie+descriptors", "labels")
BASELINE = "random"
# Goals of issue 9.
IE_OVER_RANDOM = 3.0
GOAL_ITERATION = 5


def corpus_id_of(url: str) -> str:
    """The offline web serves /images/<id>: the corpus id of a fetched URL ('' when not one of ours)."""
    path = urlsplit(url).path
    marker = "/images/"
    at = path.rfind(marker)
    return unquote(path[at + len(marker) :]) if at >= 0 else ""


@dataclass(frozen=True)
class Decision:
    """What the benchmark needs of an ImageDecision."""

    exploration_id: str
    iteration: int
    url: str
    kind: int
    object_key: str


@dataclass
class IterationYield:
    iteration: int
    stored: int = 0
    relevant: int = 0
    cumulative_stored: int = 0
    cumulative_relevant: int = 0

    @property
    def rate(self) -> float | None:
        return self.relevant / self.stored if self.stored else None

    @property
    def cumulative_rate(self) -> float | None:
        return self.cumulative_relevant / self.cumulative_stored if self.cumulative_stored else None


def yields(decisions: Iterable[Decision], synset_of: Mapping[str, str], relevant_synsets: Iterable[str], iterations: int) -> list[IterationYield]:
    """Per-iteration and cumulative yield of one exploration's decisions (iterations 1..`iterations`)."""
    relevant = frozenset(relevant_synsets)
    per: dict[int, dict[str, bool]] = {}
    for d in decisions:
        if d.kind not in STORED_KINDS or not d.object_key or not 1 <= d.iteration <= iterations:
            continue
        seen = per.setdefault(d.iteration, {})
        if d.object_key not in seen:  # the first decision crediting an object names its source
            seen[d.object_key] = synset_of.get(corpus_id_of(d.url), "") in relevant
    out: list[IterationYield] = []
    cumulative: dict[str, bool] = {}
    for n in range(1, iterations + 1):
        seen = per.get(n, {})
        for key, is_relevant in seen.items():
            cumulative.setdefault(key, is_relevant)
        out.append(
            IterationYield(
                n,
                stored=len(seen),
                relevant=sum(seen.values()),
                cumulative_stored=len(cumulative),
                cumulative_relevant=sum(cumulative.values()),
            )
        )
    return out


def knn_before_after(evaluations: Iterable[tuple[int, float, int]], last_iteration: int) -> tuple[float | None, float | None, int]:
    """(iteration, knn_top1, eval_images) events of one exploration -> (before, after, eval images).

    Before: the initial encoder (iteration 0); after: the version trained on the last iteration.
    The latest event of an iteration wins (a republished version says the same)."""
    by_iteration: dict[int, tuple[float, int]] = {}
    for iteration, knn, images in evaluations:
        by_iteration[iteration] = (float(knn), int(images))
    before = by_iteration.get(0)
    after = by_iteration.get(last_iteration)
    images = (before or after or (0.0, 0))[1]
    return (before[0] if before else None, after[0] if after else None, images)


@dataclass(frozen=True)
class Spread:
    mean: float | None
    sd: float | None  # sample standard deviation; None for fewer than 2 values
    low: float | None
    high: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> "Spread":
        xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
        if not xs:
            return cls(None, None, None, None, 0)
        return cls(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, min(xs), max(xs), len(xs))

    def fmt(self, scale: float = 100.0, digits: int = 1) -> str:
        if self.mean is None:
            return "n/a"
        text = f"{self.mean * scale:.{digits}f}"
        if self.sd is not None:
            text += f" ± {self.sd * scale:.{digits}f}"
        return text

    def as_dict(self) -> dict:
        return {"mean": self.mean, "sd": self.sd, "min": self.low, "max": self.high, "n": self.n}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


@dataclass
class RunFigures:
    """One exploration (branch x mode x seed)."""

    branch: str
    mode: str
    seed: int
    per_iteration: list[IterationYield]
    knn_before: float | None = None
    knn_after: float | None = None
    eval_images: int = 0
    state: str = ""
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def yield_at(self, iteration: int, cumulative: bool = False) -> float | None:
        for it in self.per_iteration:
            if it.iteration == iteration:
                return it.cumulative_rate if cumulative else it.rate
        return None

    def as_dict(self) -> dict:
        return {
            "branch": self.branch,
            "mode": self.mode,
            "seed": self.seed,
            "state": self.state,
            "wall_s": round(self.wall_s, 1),
            "knn_before": self.knn_before,
            "knn_after": self.knn_after,
            "eval_images": self.eval_images,
            "iterations": [
                {
                    "iteration": it.iteration,
                    "stored": it.stored,
                    "relevant": it.relevant,
                    "yield": it.rate,
                    "cumulative_stored": it.cumulative_stored,
                    "cumulative_relevant": it.cumulative_relevant,
                    "cumulative_yield": it.cumulative_rate,
                }
                for it in self.per_iteration
            ],
            **self.extra,
        }


@dataclass
class ModeSummary:
    branch: str
    mode: str
    seeds: list[int]
    per_iteration: list[Spread]  # yield of iteration 1..n over seeds
    last: Spread  # yield of the last iteration
    cumulative: Spread  # cumulative yield over all iterations
    knn_before: Spread
    knn_after: Spread
    ratio_last: float | None = None  # mean yield of the last iteration / random's
    ratio_cumulative: float | None = None

    def as_dict(self) -> dict:
        return {
            "branch": self.branch,
            "mode": self.mode,
            "seeds": self.seeds,
            "yield_per_iteration": [s.as_dict() for s in self.per_iteration],
            "yield_last_iteration": self.last.as_dict(),
            "yield_cumulative": self.cumulative.as_dict(),
            "ratio_to_random_last_iteration": self.ratio_last,
            "ratio_to_random_cumulative": self.ratio_cumulative,
            "knn_before": self.knn_before.as_dict(),
            "knn_after": self.knn_after.as_dict(),
        }


def summarise(runs: Sequence[RunFigures], iterations: int) -> list[ModeSummary]:
    """Mean and spread over seeds for every (branch, mode), with ratios to the branch's random."""
    groups: dict[tuple[str, str], list[RunFigures]] = {}
    for run in runs:
        groups.setdefault((run.branch, run.mode), []).append(run)
    out: list[ModeSummary] = []
    for (branch, mode), rs in groups.items():
        out.append(
            ModeSummary(
                branch=branch,
                mode=mode,
                seeds=sorted(r.seed for r in rs),
                per_iteration=[Spread.of(r.yield_at(n) for r in rs) for n in range(1, iterations + 1)],
                last=Spread.of(r.yield_at(iterations) for r in rs),
                cumulative=Spread.of(r.yield_at(iterations, cumulative=True) for r in rs),
                knn_before=Spread.of(r.knn_before for r in rs),
                knn_after=Spread.of(r.knn_after for r in rs),
            )
        )
    base = {s.branch: s for s in out if s.mode == BASELINE}
    for s in out:
        ref = base.get(s.branch)
        if ref is not None:
            s.ratio_last = ratio(s.last.mean, ref.last.mean)
            s.ratio_cumulative = ratio(s.cumulative.mean, ref.cumulative.mean)
    order = {m: i for i, m in enumerate(MODES)}
    out.sort(key=lambda s: (s.branch, order.get(s.mode, len(order)), s.mode))
    return out


def goals(summaries: Sequence[ModeSummary], iterations: int) -> list[dict]:
    """The issue's goals per branch: ie >= 3x random by iteration 5, labels >= ie, k-NN after >= before.

    Judged on mean figures over seeds. The yield goals use the yield of the goal iteration (the
    last one when the run has fewer), and are also reported on the cumulative yield."""
    by = {(s.branch, s.mode): s for s in summaries}
    out = []
    at = min(GOAL_ITERATION, iterations)
    for branch in sorted({s.branch for s in summaries}):
        rnd, ie, labels = by.get((branch, "random")), by.get((branch, "ie")), by.get((branch, "labels"))

        def at_iteration(s: ModeSummary | None) -> float | None:
            return s.per_iteration[at - 1].mean if s is not None and len(s.per_iteration) >= at else None

        if rnd and ie:
            r = ratio(at_iteration(ie), at_iteration(rnd))
            rc = ratio(ie.cumulative.mean, rnd.cumulative.mean)
            out.append(_goal(branch, f"ie yield >= {IE_OVER_RANDOM:g}x random at iteration {at}", r, IE_OVER_RANDOM, {"cumulative_ratio": rc}))
        if ie and labels:
            r = ratio(at_iteration(labels), at_iteration(ie))
            rc = ratio(labels.cumulative.mean, ie.cumulative.mean)
            out.append(_goal(branch, f"labels yield >= ie at iteration {at}", r, 1.0, {"cumulative_ratio": rc}))
        for s in summaries:
            if s.branch != branch:
                continue
            before, after = s.knn_before.mean, s.knn_after.mean
            measured = None if before is None or after is None else after - before
            out.append(
                {
                    "branch": branch,
                    "goal": f"{s.mode}: k-NN after >= before",
                    "measured": measured,
                    "threshold": 0.0,
                    "pass": None if measured is None else measured >= -1e-9,
                    "before": before,
                    "after": after,
                }
            )
    return out


def _goal(branch: str, text: str, measured: float | None, threshold: float, extra: dict) -> dict:
    return {"branch": branch, "goal": text, "measured": measured, "threshold": threshold, "pass": None if measured is None else measured >= threshold, **extra}


def _f(value: float | None, fmt: str = "{:.2f}x") -> str:
    return "n/a" if value is None else fmt.format(value)


def table(summaries: Sequence[ModeSummary], iterations: int) -> str:
    """Markdown table: per branch and mode, yield per iteration (mean over seeds, %), last and
    cumulative yield mean ± sd, ratios to random, k-NN before -> after."""
    its = " | ".join(f"it {n}" for n in range(1, iterations + 1))
    head = f"| branch | mode | seeds | {its} | yield it {iterations} (%) | x random | cumulative (%) | x random | k-NN before (%) | k-NN after (%) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summaries:
        cells = " | ".join(_f(p.mean, "{:.1%}").rstrip("%") if p.mean is not None else "n/a" for p in s.per_iteration)
        lines.append(
            f"| {s.branch} | {s.mode} | {len(s.seeds)} | {cells} | {s.last.fmt()} | {_f(s.ratio_last)} | {s.cumulative.fmt()} | "
            f"{_f(s.ratio_cumulative)} | {s.knn_before.fmt()} | {s.knn_after.fmt()} |"
        )
    return "\n".join(lines)


def label_text(label: str) -> str:
    """A target's class label as a searchable name: folder labels keep their last part
    ('mammals-apes' -> 'apes'), concept labels lose their underscores ('granny_smith' -> 'granny smith')."""
    return label.rsplit("-", 1)[-1].replace("_", " ").strip()


def class_names(images: Iterable[Mapping]) -> list[str]:
    """The branch's class names (every photo's label, train and eval), as label_text, sorted, distinct."""
    return sorted({label_text(str(i["label"])) for i in images if i.get("label")} - {""})
