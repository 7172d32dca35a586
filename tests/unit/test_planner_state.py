import dataclasses

from iex.v1 import common_pb2, planner_pb2
import pytest

from services.planner.state import ExplorationRecord, IterationState, QueryState, decision_id
from services.planner.validation import InvalidField, SpecDefaults, normalise_spec

DEFAULTS = SpecDefaults(
    iterations=2,
    queries_per_iteration=4,
    images_per_query=5,
    search_backend="local",
    init="random",
    backbone="mobilenetv3_small_050",
    image_size=64,
    iteration_deadline_seconds=60,
    search_backends=("local",),
    vocabulary="",  # no default vocabulary: requests must bring concepts
)
WITH_WORDNET = dataclasses.replace(DEFAULTS, vocabulary="wordnet")


def test_query_completes_only_when_everything_is_accounted_for():
    q = QueryState(query_id="q", concept="c", descriptor="", text="c")
    assert not q.complete
    a, b = decision_id("a" * 64, "http://x/1"), decision_id("a" * 64, "http://x/2")
    assert a != b  # same bytes under two URLs are two results
    q.decisions[a] = common_pb2.DECISION_KIND_UNIQUE
    q.accepted_objects[a] = "images/aa"
    q.crawled, q.images_expected = True, 2
    assert not q.complete  # one decision missing
    q.decisions[b] = common_pb2.DECISION_KIND_EXACT_DUPLICATE
    q.accepted_objects[b] = "images/aa"
    q.rewards[a] = 0.5
    assert not q.complete  # the duplicate is not scored yet
    q.rewards[b] = 0.5
    q.rewards[b] = 0.5  # a redelivered score changes nothing
    assert q.complete
    assert q.counts()["images_scored"] == 2 and q.counts()["images_duplicate"] == 1


def test_record_round_trips_through_json():
    spec = normalise_spec(planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a", "b"]), DEFAULTS)
    record = ExplorationRecord(exploration_id="e1", spec_hex=spec.SerializeToString().hex(), serving_model=("enc_e1", 2))
    it = IterationState(iteration=1, scored_with=("enc_e1", 1))
    it.queries["q"] = QueryState(query_id="q", concept="a", descriptor="", text="a", crawled=True, rewards={"x": 0.25})
    record.iterations[1] = it
    record.observations["a"] = [0.25]
    again = ExplorationRecord.from_json(record.to_json())
    assert again == record


@pytest.mark.parametrize(
    "spec, field",
    [
        (planner_pb2.ExplorationSpec(concepts=["a"]), "spec.target_uri"),
        (planner_pb2.ExplorationSpec(target_uri="http://x", concepts=["a"]), "spec.target_uri"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t"), "spec.concepts"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a", " "]), "spec.concepts[1]"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], iterations=5000), "spec.iterations"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], search_backend="google"), "spec.search_backend"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], init="imagenet"), "spec.init"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], init="s3://iex/checkpoints/"), "spec.init"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], init="efficientnet-lite0", backbone="resnet50"), "spec.backbone"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], mode=common_pb2.EXPLORATION_MODE_LABELS), "spec.labels"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], image_size=8), "spec.image_size"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], vocabulary="wordnet"), "spec.concepts"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", vocabulary="custom"), "spec.concepts"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], vocabulary="imagenet"), "spec.vocabulary"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], descriptors="gpt"), "spec.descriptors"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], descriptors="llm"), "spec.descriptors"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], labels=["x", "y"], label_descriptions=["one"]), "spec.label_descriptions"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], max_images=-1), "spec.max_images"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], max_wall_seconds=-5), "spec.max_wall_seconds"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], sampling=planner_pb2.SamplingSpec(spread=-1)), "spec.sampling.spread"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], sampling=planner_pb2.SamplingSpec(tier_sizes=[10])), "spec.sampling.tier_masses"),
        (
            planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], sampling=planner_pb2.SamplingSpec(tier_sizes=[10], tier_masses=[0.5, 0.6])),
            "spec.sampling.tier_masses",
        ),
        (
            planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], sampling=planner_pb2.SamplingSpec(tier_sizes=[0], tier_masses=[0.5, 0.5])),
            "spec.sampling.tier_sizes[0]",
        ),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], sampling=planner_pb2.SamplingSpec(label_fraction=1.5)), "spec.sampling.label_fraction"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], sampling=planner_pb2.SamplingSpec(prune_fraction=2)), "spec.sampling.prune_fraction"),
        (
            planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], labels=["x"], sampling=planner_pb2.SamplingSpec(prune_neighbours=3)),
            "spec.sampling.prune_neighbours",
        ),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], reward_model=planner_pb2.RewardModelSpec(length_scale=-1)), "spec.reward_model.length_scale"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], reward_model=planner_pb2.RewardModelSpec(noise=1000)), "spec.reward_model.noise"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], reward_model=planner_pb2.RewardModelSpec(rank=3)), "spec.reward_model.rank"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], reward_model=planner_pb2.RewardModelSpec(exact_max=-2)), "spec.reward_model.exact_max"),
    ],
)
def test_invalid_specs_name_the_field(spec, field):
    with pytest.raises(InvalidField) as info:
        normalise_spec(spec, DEFAULTS)
    assert info.value.field == field
    assert str(info.value).startswith(field + ":")


def test_defaults_fill_unset_fields():
    spec = normalise_spec(planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"]), DEFAULTS)
    assert (spec.iterations, spec.queries_per_iteration, spec.images_per_query) == (2, 4, 5)
    assert spec.mode == common_pb2.EXPLORATION_MODE_IE and spec.search_backend == "local"


@pytest.mark.parametrize("field", ["iterations", "queries_per_iteration", "images_per_query"])
@pytest.mark.parametrize("value", [0, -1, -40])
def test_a_budget_set_to_zero_or_less_is_refused_not_defaulted(field, value):
    """`iex explore create --iterations 0` used to mean the planner's default (40): a budget that is
    set is taken as asked, so 0 or less is an error naming the field."""
    spec = planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], **{field: value})
    with pytest.raises(InvalidField) as info:
        normalise_spec(spec, DEFAULTS)
    assert info.value.field == f"spec.{field}"
    assert f"must be at least 1, got {value}" in str(info.value)
    one = normalise_spec(planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], **{field: 1}), DEFAULTS)
    assert getattr(one, field) == 1


def test_inits_the_trainer_knows_are_accepted_with_their_architecture():
    lite0 = normalise_spec(planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], init="efficientnet-lite0"), DEFAULTS)
    assert lite0.backbone == "tf_efficientnet_lite0"
    checkpoint = normalise_spec(planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], init="s3://iex/checkpoints/e/v3.pt"), DEFAULTS)
    assert checkpoint.init == "s3://iex/checkpoints/e/v3.pt" and checkpoint.backbone == ""  # the checkpoint's own architecture
    assert normalise_spec(planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"]), DEFAULTS).backbone == DEFAULTS.backbone


def test_defaults_are_the_papers_sampling_and_model_but_for_the_measured_length_scale():
    spec = normalise_spec(planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"]), DEFAULTS)
    assert spec.vocabulary == "custom" and spec.descriptors == "none"
    assert spec.sampling.spread == 3.0 and list(spec.sampling.tier_sizes) == [250, 750]
    assert list(spec.sampling.tier_masses) == pytest.approx([0.8, 0.1, 0.1])
    assert spec.sampling.label_fraction == 0.5 and spec.sampling.prune_fraction == pytest.approx(0.1)
    assert spec.reward_model.length_scale == pytest.approx(0.6) and spec.reward_model.noise == pytest.approx(0.1) and spec.reward_model.rank == 512
    # The paper's values, asked for, are kept; a planner configured with them makes them the default.
    paper = planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], reward_model=planner_pb2.RewardModelSpec(length_scale=1.0))
    assert normalise_spec(paper, DEFAULTS).reward_model.length_scale == 1.0
    configured = normalise_spec(planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"]), dataclasses.replace(DEFAULTS, tier_masses=(0.95, 0.03, 0.02), gp_length_scale=1.0))
    assert list(configured.sampling.tier_masses) == pytest.approx([0.95, 0.03, 0.02]) and configured.reward_model.length_scale == 1.0
    # An explicit zero label fraction is kept (proto3 optional), unlike the 0-means-default fields.
    zero = normalise_spec(planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], sampling=planner_pb2.SamplingSpec(label_fraction=0.0)), DEFAULTS)
    assert zero.sampling.label_fraction == 0.0


def test_empty_concepts_mean_the_default_wordnet_vocabulary():
    spec = normalise_spec(planner_pb2.ExplorationSpec(target_uri="s3://iex/t"), WITH_WORDNET)
    assert spec.vocabulary == "wordnet" and not spec.concepts
    only_labels = normalise_spec(
        planner_pb2.ExplorationSpec(target_uri="s3://iex/t", mode=common_pb2.EXPLORATION_MODE_LABELS_ONLY, labels=["rose"]), DEFAULTS
    )
    assert only_labels.vocabulary == ""


def test_a_finished_query_keeps_its_counts_but_drops_per_image_maps():
    q = QueryState(query_id="q", concept="c", descriptor="", text="c", crawled=True, images_expected=1)
    d = decision_id("b" * 64, "http://x/1")
    q.decisions[d] = common_pb2.DECISION_KIND_UNIQUE
    q.accepted_objects[d] = "images/bb"
    q.rewards[d] = 0.7
    before, complete = q.counts(), q.complete
    q.freeze()
    assert q.counts() == before and q.complete == complete and not q.decisions and not q.rewards
    again = ExplorationRecord.from_json(
        ExplorationRecord(exploration_id="e", spec_hex="", iterations={1: IterationState(iteration=1, queries={"q": q})}).to_json()
    )
    assert again.iterations[1].queries["q"].counts() == before
