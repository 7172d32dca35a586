"""Pure logic of bench/exploration/diagnose: reward quality, yields, ratios to random with intervals."""

from __future__ import annotations

import numpy as np
import pytest

from bench.exploration import diagnose


def test_reward_quality_of_a_perfect_and_a_useless_reward():
    relevant = np.array([True] * 10 + [False] * 90)
    perfect = diagnose.reward_quality(np.linspace(1, 0, 100), relevant)
    assert perfect["roc_auc"] == 1.0 and perfect["precision_at_relevant_count"] == 1.0 and perfect["base_rate"] == 0.1
    assert perfect["precision_at_100"] == pytest.approx(0.1)
    useless = diagnose.reward_quality(np.zeros(100), relevant)
    assert useless["roc_auc"] == 0.5  # ties count half


def test_run_yields_are_per_round_and_cumulative_over_new_images():
    run = diagnose.Run("ie", 0, new=[100, 50, 0], relevant=[10, 20, 0])
    assert run.yields() == [0.1, 0.4, 0.0]
    assert run.cumulative() == pytest.approx([0.1, 30 / 150, 30 / 150])


def test_ratio_interval_is_paired_by_seed_and_covers_the_point():
    out = diagnose.ratio_interval([0.30, 0.20, 0.25], [0.10, 0.10, 0.05])
    assert out["ratio"] == pytest.approx(0.75 / 0.25)
    assert out["low"] <= out["ratio"] <= out["high"] and out["seeds"] == 3
    same = diagnose.ratio_interval([0.1, 0.1], [0.1, 0.1])
    assert same["ratio"] == same["low"] == same["high"] == 1.0


def test_summary_reports_each_arm_against_random():
    runs = [diagnose.Run("random", s, [100, 100], [5, 5]) for s in range(3)] + [diagnose.Run("ie", s, [100, 100], [10, 20 + s]) for s in range(3)]
    summary = diagnose.summarise("animals", runs, {}, np.array([True, False, False, False]), rounds=2)
    assert summary["base_rate"] == 0.25
    assert summary["arms"]["random"]["cumulative_yield_mean"] == [0.05, 0.05]
    vs = summary["arms"]["ie"]["cumulative_vs_random"]
    assert vs["ratio"] == pytest.approx(np.mean([30, 31, 32]) / 200 / 0.05, abs=1e-3)
    assert "cumulative_vs_random" not in summary["arms"]["random"]


def test_summary_counts_relevant_images_found_and_each_ablations_paired_effect():
    runs = [diagnose.Run("random", s, [100, 100], [5, 5]) for s in range(3)]
    runs += [diagnose.Run("ie", s, [100, 50], [10, 20]) for s in range(3)]
    runs += [diagnose.Run("ie-paper", s, [100, 100], [10, 10]) for s in range(3)]
    arms = diagnose.summarise("animals", runs, {}, np.array([True, False]), rounds=2)["arms"]
    # ie's yield is 2x the paper's arm with the same 30 relevant images: found as many, asked fewer new.
    assert arms["ie"]["relevant_found_mean"] == 30 and arms["ie"]["relevant_found_vs_random"]["ratio"] == pytest.approx(3.0)
    effect = arms["ie-paper"]["effect_vs_ie"]
    assert effect["ratio"] == pytest.approx(0.1 / 0.2) and effect["low"] == effect["high"] == effect["ratio"]
    assert "effect_vs_ie" not in arms["ie"] and "effect_vs_ie" not in arms["random"]


def test_an_ablation_shares_its_base_arms_draws_and_differs_only_in_its_parameters():
    assert all(diagnose.ARM_SEEDS[arm] == diagnose.ARM_SEEDS[base] for arm, base in diagnose.ABLATION_OF.items())
    assert set(diagnose.ARM_SEEDS) == set(diagnose.ARMS) == set(diagnose.ARM_SPECS)
    paper_model, _ = diagnose.ARM_PARAMS["ie-paper"]
    assert paper_model.length_scale == 1.0 and diagnose.arm_description("ie")["length_scale"] == 0.6
    assert diagnose.arm_description("ie-paper")["tier_masses"] == diagnose.arm_description("ie")["tier_masses"] == [0.8, 0.1, 0.1]
    # The project's planner against the paper's: the names' embeddings and fresh concepts, against
    # the definition texts and every concept drawable again; each ablation changes one of them.
    ie, paper = diagnose.arm_description("ie"), diagnose.arm_description("ie-paper")
    assert (ie["concept_text"], ie["fresh_concepts_only"]) == ("name", True)
    assert (paper["concept_text"], paper["fresh_concepts_only"], paper["length_scale"]) == ("definition", False, 1.0)
    assert diagnose.arm_description("ie-definition")["concept_text"] == "definition" and diagnose.arm_description("ie-definition")["fresh_concepts_only"]
    assert diagnose.arm_description("ie-repeats")["concept_text"] == "name" and not diagnose.arm_description("ie-repeats")["fresh_concepts_only"]


def test_hindsight_picks_what_keeps_the_cumulative_yield_highest():
    relevant = np.array([True, True, True, False, False, False])
    results = np.array([
        [0, 3],    # half relevant
        [1, 2],    # all relevant
        [4, 5],    # none
        [0, -1],   # one image, relevant
        [1, 2],    # the same as row 1: nothing new once row 1 is queried
    ])
    seen, queried = np.zeros(6, bool), np.zeros(5, bool)
    picks = diagnose.hindsight_round(results, relevant, seen, queried, 3, (0, 0))
    # Row 1 (2/2) first; then row 3 (image 0, relevant: 3/3) ahead of row 4 (nothing new, 2/2 stays);
    # then row 4, which keeps 3/3, ahead of row 0 (image 3 is irrelevant: 3/4).
    assert picks == [1, 3, 4]
    assert seen.tolist() == [True, True, True, False, False, False] and queried.tolist() == [False, True, False, True, True]
    run = diagnose.run_hindsight(0, type("Pool", (), {"names": list("abcde"), "__len__": lambda self: 5})(), results, relevant, rounds=2, queries=2)
    # Round 1: rows 1 and 3 (3 new, all relevant); round 2: row 4 (nothing new), then row 0 (3/4) over row 2 (3/5).
    assert run.new == [3, 1] and run.relevant == [3, 0] and run.top_concepts == ["b", "d", "e", "a"]


class RecordingWeb:
    """The offline web's search, answering each query with the rows named after its last word."""

    def __init__(self, rows_by_name: dict[str, list[int]]) -> None:
        self.rows_by_name, self.queries = rows_by_name, []

    def search(self, texts: list[str], k: int) -> list[list[int]]:
        self.queries += texts
        return [self.rows_by_name.get(t.split()[-1], [])[:k] for t in texts]


def test_the_descriptors_arm_asks_descriptor_plus_concept_and_credits_the_concept():
    from services.planner import planning
    from services.planner.vocabulary import custom_vocabulary

    names = ["apple", "pear", "brick", "kettle"]
    vocabulary = custom_vocabulary(names)
    embeddings = np.eye(4, 8, dtype=np.float32)
    pool = planning.vocabulary_pool(vocabulary, embeddings)
    web = RecordingWeb({"apple": [0, 1], "pear": [1, 2], "brick": [3], "kettle": [4]})
    relevant = np.array([True, True, True, False, False])
    image_reward = np.array([0.9, 0.8, 0.7, 0.1, 0.2])
    args = (pool, web, image_reward, relevant, planning.RewardModel(device="cpu"), 3, 4, 2)
    plain = diagnose.run_arm("ie", 0, *args)
    plain_queries, web.queries = web.queries, []
    described = diagnose.run_arm("ie-descriptors", 0, *args)
    assert sorted(plain_queries) == sorted(names * 3)
    assert all(len(q.split()) == 2 and q.split()[-1] in names for q in web.queries)
    # The same first (uniform) round, so the same images; credited to the concept, not the query text.
    assert described.new[0] == plain.new[0] == 5 and set(described.top_concepts) <= set(names)
