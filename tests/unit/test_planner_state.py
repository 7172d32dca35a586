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
)


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
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], mode=common_pb2.EXPLORATION_MODE_LABELS), "spec.labels"),
        (planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"], image_size=8), "spec.image_size"),
    ],
)
def test_invalid_specs_name_the_field(spec, field):
    with pytest.raises(InvalidField) as info:
        normalise_spec(spec, DEFAULTS)
    assert info.value.field == field
    assert str(info.value).startswith(field + ":")


def test_defaults_fill_zero_fields():
    spec = normalise_spec(planner_pb2.ExplorationSpec(target_uri="s3://iex/t", concepts=["a"]), DEFAULTS)
    assert (spec.iterations, spec.queries_per_iteration, spec.images_per_query) == (2, 4, 5)
    assert spec.mode == common_pb2.EXPLORATION_MODE_IE and spec.search_backend == "local"
