"""Pure logic of bench/exploration: yield, k-NN before/after, aggregation over seeds, goals, table."""

from __future__ import annotations

import pytest

from bench.exploration import figures
from bench.exploration.__main__ import exploration_id, spec_seed

UNIQUE, EXACT, NEAR, CONTAMINATES, INVALID = 1, 2, 3, 4, 5
SYNSETS = {"apple-1": "n1", "apple-2": "n1", "pear-1": "n2", "car-1": "n9", "blank-1": ""}
RELEVANT = {"n1", "n2"}


def d(iteration: int, corpus_id: str, kind: int = UNIQUE, key: str | None = None, exploration: str = "x") -> figures.Decision:
    return figures.Decision(exploration, iteration, f"http://127.0.0.1:18086/images/{corpus_id}", kind, key if key is not None else f"images/{corpus_id}")


def test_corpus_id_of_reads_the_offline_web_url():
    assert figures.corpus_id_of("http://127.0.0.1:22086/images/google-1f34e") == "google-1f34e"
    assert figures.corpus_id_of("http://h/images/a%20b") == "a b"
    assert figures.corpus_id_of("http://elsewhere/photo.jpg") == ""


def test_yield_counts_stored_objects_once_and_only_accepted_kinds():
    decisions = [
        d(1, "apple-1"),
        d(1, "apple-1", EXACT),  # the same object again in the iteration: once
        d(1, "car-1"),
        d(1, "pear-1", CONTAMINATES),  # never stored
        d(1, "blank-1", INVALID, key=""),
        d(1, "blank-1"),  # stored, no synset: never relevant
        d(2, "apple-2", NEAR, key="images/apple-1"),  # credited with an object seen in iteration 1
        d(2, "pear-1"),
        d(3, "car-1", EXACT),
    ]
    per = figures.yields(decisions, SYNSETS, RELEVANT, iterations=4)
    assert [(p.stored, p.relevant) for p in per] == [(3, 1), (2, 2), (1, 0), (0, 0)]
    assert per[0].rate == pytest.approx(1 / 3)
    assert per[1].rate == 1.0
    assert per[3].rate is None  # nothing stored: no yield, not zero
    # Cumulative: distinct objects of iterations 1..k.
    assert [(p.cumulative_stored, p.cumulative_relevant) for p in per] == [(3, 1), (4, 2), (4, 2), (4, 2)]
    assert per[3].cumulative_rate == 0.5


def test_yield_ignores_iterations_outside_the_budget():
    per = figures.yields([d(0, "apple-1"), d(3, "apple-2")], SYNSETS, RELEVANT, iterations=2)
    assert [p.stored for p in per] == [0, 0]


def test_knn_before_is_iteration_zero_after_is_the_last_and_latest_wins():
    events = [(0, 0.25, 8), (1, 0.3, 8), (2, 0.4, 8), (2, 0.5, 8)]
    assert figures.knn_before_after(events, 2) == (0.25, 0.5, 8)
    assert figures.knn_before_after([(0, 0.25, 8)], 2) == (0.25, None, 8)
    assert figures.knn_before_after([], 2) == (None, None, 0)


def run(branch: str, mode: str, seed: int, rates: list[tuple[int, int]], knn=(0.5, 0.5)) -> figures.RunFigures:
    per, cs, cr = [], 0, 0
    for n, (stored, relevant) in enumerate(rates, start=1):
        cs, cr = cs + stored, cr + relevant
        per.append(figures.IterationYield(n, stored, relevant, cs, cr))
    return figures.RunFigures(branch, mode, seed, per, knn_before=knn[0], knn_after=knn[1])


def test_summaries_mean_spread_and_ratio_to_random():
    runs = [
        run("food/fruit", "random", 1, [(100, 2), (100, 2)]),
        run("food/fruit", "random", 2, [(100, 4), (100, 2)]),
        run("food/fruit", "ie", 1, [(100, 2), (100, 8)], knn=(0.5, 0.6)),
        run("food/fruit", "ie", 2, [(100, 4), (100, 4)], knn=(0.5, 0.4)),
        run("food/fruit", "labels", 1, [(50, 10), (50, 10)]),
    ]
    s = {x.mode: x for x in figures.summarise(runs, 2)}
    assert [x.mode for x in figures.summarise(runs, 2)] == ["random", "ie", "labels"]  # MODES order
    assert s["random"].last.mean == pytest.approx(0.02)
    assert s["random"].per_iteration[0].mean == pytest.approx(0.03)
    assert s["random"].per_iteration[0].sd == pytest.approx(0.0141421, rel=1e-4)
    assert s["ie"].last.mean == pytest.approx(0.06)
    assert s["ie"].ratio_last == pytest.approx(3.0)
    assert s["ie"].cumulative.mean == pytest.approx((0.05 + 0.04) / 2)
    assert s["ie"].ratio_cumulative == pytest.approx(0.045 / 0.025)
    assert s["labels"].last.sd is None and s["labels"].last.n == 1
    assert s["ie"].knn_after.mean == pytest.approx(0.5)

    goals = {g["goal"]: g for g in figures.goals(list(s.values()), 2)}
    ie_goal = goals["ie yield >= 3x random at iteration 2"]
    assert ie_goal["pass"] is True and ie_goal["measured"] == pytest.approx(3.0)
    labels_goal = goals["labels yield >= ie at iteration 2"]
    assert labels_goal["measured"] == pytest.approx(0.2 / 0.06)
    assert goals["ie: k-NN after >= before"]["pass"] is True  # 0.5 -> 0.5


def test_goal_is_unknown_not_failed_without_figures():
    runs = [run("animals", "random", 1, [(0, 0)]), run("animals", "ie", 1, [(10, 5)], knn=(None, None))]
    goals = figures.goals(figures.summarise(runs, 1), 1)
    assert goals[0]["pass"] is None  # random stored nothing: no ratio
    assert [g["pass"] for g in goals if "k-NN" in g["goal"]] == [True, None]


def test_table_has_a_row_per_branch_and_mode():
    runs = [run("animals", "random", 1, [(10, 1)]), run("animals", "ie", 1, [(10, 4)])]
    text = figures.table(figures.summarise(runs, 1), 1)
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| branch | mode |")
    assert "| animals | ie | 1 | 40.0 | 40.0 | 4.00x |" in lines[3]


def test_labels_and_ids():
    assert figures.label_text("mammals-apes") == "apes"
    assert figures.label_text("granny_smith") == "granny smith"
    assert figures.class_names([{"label": "birds"}, {"label": "mammals-apes"}, {"label": "birds"}, {}]) == ["apes", "birds"]
    ids = {exploration_id("xb1200", b, m, s) for b in ("food/fruit", "animals") for m in figures.MODES for s in (1, 2)}
    assert len(ids) == 16 and all(len(i) <= 40 and i == i.lower() for i in ids)
    seeds = {spec_seed(s, b, m) for s in (1, 2, 3) for b in range(3) for m in range(4)}
    assert len(seeds) == 36  # every run its own query stream
