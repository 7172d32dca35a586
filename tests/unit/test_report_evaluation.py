"""The report's representation-quality section: before/after read from the trainer's evaluation
records in S3, with the paired bootstrap interval of (version N - initial), the smallest detectable
difference, and "not measurable: <reason>" instead of numbers when the target's splits cannot show
a change (never a pass)."""

from __future__ import annotations

import json

import pytest

from iex.v1 import common_pb2, planner_pb2
from services.cli import report

BUCKET = "iex"
EXPLORATION = "exp-1"
KEYS = [f"s3://iex/targets/t/eval/{'cat' if i % 2 else 'dog'}/{i}.png" for i in range(64)]


def record(knn: list[int], probe: list[int] | None = None, protocol: str = "train->test", measurable: bool = True, reason: str = "", keys=KEYS) -> dict:
    return {
        "format": 1,
        "protocol": protocol,
        "measurable": measurable,
        "not_measurable_reason": reason,
        "detectable_difference": 0.0625,
        "test": {"keys": list(keys), "knn_correct": knn, "probe_correct": probe},
    }


def correct(n_right: int, n: int = 64) -> list[int]:
    return [1] * n_right + [0] * (n - n_right)


def test_a_clear_gain_has_an_interval_above_zero():
    comparison = report.compare(record(correct(30), correct(32)), record(correct(45), correct(32)))
    assert comparison["measurable"] and comparison["reason"] == "" and comparison["test_images"] == 64
    knn = comparison["knn"]
    assert (knn["before"], knn["after"], knn["mean"]) == pytest.approx((30 / 64, 45 / 64, 15 / 64))
    assert 0 < knn["low"] < knn["mean"] < knn["high"] and knn["excludes_zero"] and knn["verdict"] == "better"
    # Nothing moved for the probe: the interval is [0, 0], no change shown.
    probe = comparison["linear_probe"]
    assert (probe["mean"], probe["low"], probe["high"], probe["verdict"]) == (0.0, 0.0, 0.0, "no change shown")
    assert comparison["detectable_difference"] == pytest.approx(4 / 64)
    assert report.difference_text(knn).startswith("+0.234 [95% CI +0.1")


def test_an_interval_that_includes_zero_is_no_change_and_a_loss_is_a_loss():
    swapped = correct(32)[::-1]  # the same accuracy, other images right
    assert report.compare(record(correct(32)), record(swapped))["knn"]["verdict"] == "no change shown"
    worse = report.compare(record(correct(50)), record(correct(20)))["knn"]
    assert worse["verdict"] == "worse" and worse["high"] < 0


def test_pairs_only_the_test_images_both_versions_scored():
    after = record(correct(40)[:60], keys=KEYS[:60])
    comparison = report.compare(record(correct(30)), after)
    assert comparison["test_images"] == 60 and "60 test images both versions scored" in comparison["note"]
    assert comparison["knn"]["before"] == pytest.approx(30 / 60)


@pytest.mark.parametrize(
    "before, after, reason",
    [
        (record(correct(13, 13), keys=KEYS[:13], measurable=False, reason="fewer than 2 classes with >= 3 images in both the train and the test split (1)"), record(correct(13, 13), keys=KEYS[:13]), "fewer than 2 classes"),
        (record(correct(4), protocol="eval-split-cv", measurable=False, reason="the target has no labelled train split (train_labels.json): ..."), record(correct(4), protocol="eval-split-cv"), "no labelled train split"),
        (record(correct(4)), record(correct(4), protocol="eval-split-cv"), "different protocols"),
        (None, record(correct(4)), "no evaluation record of the initial encoder"),
    ],
)
def test_a_comparison_that_cannot_measure_gives_a_reason_and_no_numbers(before, after, reason):
    comparison = report.compare(before, after)
    assert not comparison["measurable"] and reason in comparison["reason"]
    assert comparison["knn"] is None and comparison["linear_probe"] is None


# ---- the whole report, from the planner's API and the records in S3 ----------------------------
class Store:
    def __init__(self, objects: dict[str, dict]) -> None:
        self.objects = {k: json.dumps(v).encode() for k, v in objects.items()}

    def get_json(self, bucket, key):
        raw = self.objects.get(key) if bucket == BUCKET else None
        return None if raw is None else json.loads(raw)

    def get_or_none(self, bucket, key):
        return self.objects.get(key) if bucket == BUCKET else None

    def list_keys(self, bucket, prefix, recursive=True):
        return iter(sorted(k for k in self.objects if bucket == BUCKET and k.startswith(prefix)))


class Stub:
    def __init__(self, exploration: planner_pb2.Exploration) -> None:
        self.exploration = exploration

    def GetExploration(self, request):
        return planner_pb2.GetExplorationResponse(exploration=self.exploration)

    def QueryHistory(self, request):
        return planner_pb2.QueryHistoryResponse()

    def TopConcepts(self, request):
        return planner_pb2.TopConceptsResponse()


def exploration(before: dict, afters: list[dict], measurable: bool = True, reason: str = "") -> planner_pb2.Exploration:
    ref = lambda v: common_pb2.ModelRef(name="enc_exp_1", version=v)  # noqa: E731
    common = dict(eval_images=64, protocol="train->test", train_images=59, classes=7, measurable=measurable, not_measurable_reason=reason, detectable_difference=0.0625)
    acc = lambda r, name: sum(r["test"][name]) / len(r["test"][name])  # noqa: E731
    initial = planner_pb2.EncoderEvaluation(model=ref(1), knn_top1=acc(before, "knn_correct"), linear_probe_top1=acc(before, "probe_correct"), record_key="evaluations/exp-1/v1.json", **common)
    iterations = []
    for n, after in enumerate(afters, start=1):
        evaluation = planner_pb2.EncoderEvaluation(model=ref(n + 1), knn_top1=acc(after, "knn_correct"), linear_probe_top1=acc(after, "probe_correct"), record_key=f"evaluations/exp-1/v{n + 1}.json", **common)
        iterations.append(
            planner_pb2.IterationSummary(
                iteration=n, phase=common_pb2.ITERATION_PHASE_FINISHED, trained_model=ref(n + 1),
                knn_top1=evaluation.knn_top1, linear_probe_top1=evaluation.linear_probe_top1, eval_images=64, evaluation=evaluation,
            )
        )
    return planner_pb2.Exploration(
        exploration_id=EXPLORATION,
        spec=planner_pb2.ExplorationSpec(target_uri="s3://iex/targets/t", iterations=len(afters)),
        state=common_pb2.EXPLORATION_STATE_SUCCEEDED,
        iterations=iterations,
        initial_evaluation=initial,
    )


def write(tmp_path, before: dict, afters: list[dict], **flags) -> tuple[str, dict]:
    records = {"evaluations/exp-1/v1.json": before, **{f"evaluations/exp-1/v{n + 1}.json": r for n, r in enumerate(afters, start=1)}}
    path = report.write_report(Stub(exploration(before, afters, **flags)), Store(records), BUCKET, EXPLORATION, tmp_path)
    return path.read_text(), json.loads((path.parent / "report.json").read_text())


def test_report_gives_before_after_with_the_interval(tmp_path):
    before = record(correct(30), correct(34))
    text, numbers = write(tmp_path, before, [record(correct(36), correct(34)), record(correct(46), correct(40))])
    ev = numbers["evaluation"]
    assert (ev["protocol"], ev["test_images"], ev["train_images"], ev["classes"], ev["measurable"]) == ("train->test", 64, 59, 7, True)
    assert ev["before"]["version"] == 1 and (ev["after"]["version"], ev["after"]["iteration"]) == (3, 2)
    assert ev["knn"]["mean"] == pytest.approx(16 / 64) and ev["knn"]["excludes_zero"] and ev["knn"]["verdict"] == "better"
    assert ev["linear_probe"]["mean"] == pytest.approx(6 / 64)
    assert ev["detectable_difference"] == pytest.approx(0.0625)
    assert [c["iteration"] for c in ev["per_iteration"]] == [1, 2]
    assert ev["per_iteration"][0]["knn"]["mean"] == pytest.approx(6 / 64)
    # The Markdown says the same: numbers, their interval, the verdict, what the split can show.
    assert f"k-NN top-1: 0.469 before -> 0.719 after, difference {report.difference_text(ev['knn'])} (better, the interval excludes 0)" in text
    assert "smallest difference these 64 test images can show: 0.062" in text
    assert "not measurable" not in text
    assert "| k-NN - initial | probe - initial |" in text and report.difference_text(ev["per_iteration"][0]["knn"]) in text


def test_report_says_not_measurable_instead_of_numbers(tmp_path):
    reason = "fewer than 2 classes with >= 3 images in both the train and the test split (1)"
    before = record(correct(64), correct(64), measurable=False, reason=reason)
    text, numbers = write(tmp_path, before, [record(correct(64), correct(64), measurable=False, reason=reason)], measurable=False, reason=reason)
    ev = numbers["evaluation"]
    assert not ev["measurable"] and ev["not_measurable_reason"] == reason
    assert ev["knn"] is None and ev["linear_probe"] is None and ev["per_iteration"][0]["knn"] is None
    (line,) = [line for line in text.splitlines() if line.startswith("- representation quality")]
    assert line.endswith(f"**not measurable**: {reason}") and "before ->" not in line and "1.000" not in line
    assert "| not measurable | not measurable |" in text  # the table's difference columns too
    # The raw accuracies stay in report.json (they match the trainer's events), flagged by measurable.
    assert numbers["initial_evaluation"]["knn_top1"] == 1.0


def test_report_without_records_or_labels(tmp_path):
    # An exploration from before the evaluation records: no pairing, said so.
    before = record(correct(30), correct(30))
    ex = exploration(before, [record(correct(40), correct(40))])
    path = report.write_report(Stub(ex), Store({}), BUCKET, EXPLORATION, tmp_path)
    ev = json.loads((path.parent / "report.json").read_text())["evaluation"]
    assert not ev["measurable"] and "no evaluation record" in ev["not_measurable_reason"]
    # A target with no labelled test split at all.
    ex.initial_evaluation.Clear()
    for it in ex.iterations:
        it.eval_images = 0
        it.ClearField("evaluation")
    path = report.write_report(Stub(ex), Store({}), BUCKET, EXPLORATION, tmp_path / "plain")
    assert "- representation quality: not evaluated (the target has no labelled test split)" in path.read_text()


# ---- yield against the corpus base rate (issue: plots whose axis shows the differences) ----------


def test_yield_axis_ends_above_the_largest_value_shown_not_at_one():
    assert report.yield_axis_top([0.08, 0.12, None], 0.06) == pytest.approx(0.15)
    assert report.yield_axis_top([0.01], 0.004) == 0.05  # never a sliver of an axis
    assert report.yield_axis_top([0.9], 0.5) == 1.0
    assert report.yield_axis_top([None], None) == 0.05


def test_report_gives_the_corpus_base_rate_and_the_yield_against_it(tmp_path):
    # A corpus of 8 images, 2 of them under the target's WordNet root: base rate 0.25.
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": f"img{i}", "synset": "n.dog" if i < 2 else "n.rock"}) for i in range(8)) + "\n")
    before, after = record(correct(30), correct(30)), record(correct(32), correct(32))
    decisions = {
        f"decisions/{EXPLORATION}/raw{i}/q-{i}.json": {"decision": {
            "iteration": 1, "kind": "DECISION_KIND_UNIQUE", "url": f"http://search/images/img{i}", "object_key": f"images/{i}.png", "query_id": "q"}}
        for i in (0, 1, 5)  # two relevant of three accepted: yield 2/3
    }
    objects = {"evaluations/exp-1/v1.json": before, "evaluations/exp-1/v2.json": after, "targets/t/target.json": {"relevant_synsets": ["n.dog"]}, **decisions}
    path = report.write_report(Stub(exploration(before, [after])), Store(objects), BUCKET, EXPLORATION, tmp_path / "out", corpus_jsonl=corpus)
    numbers = json.loads((path.parent / "report.json").read_text())
    assert numbers["corpus_base_rate"] == pytest.approx(0.25)
    assert numbers["totals"]["yield"] == pytest.approx(2 / 3)
    assert "- corpus base rate (the relevant share of the whole corpus: the yield of its images drawn uniformly): 0.250, 2.67x" in path.read_text()
    assert (path.parent / "yield.png").is_file()
