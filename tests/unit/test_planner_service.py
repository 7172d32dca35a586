"""The planner's loop with in-memory fakes of the object store and the publisher.

Covers what the integration suite cannot force deterministically: a crash between persisting a plan
and publishing it, pauses while a plan is pending, budgets, and TopConcepts after a restart.
"""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from iex.v1 import common_pb2, events_pb2, planner_pb2
from services.common import settings as settings_mod
from services.common import topics
from services.common.errors import DependencyUnavailable
from services.planner.service import Explorations, PlannerService, PlannerSettings
from services.planner.state import ExplorationRecord
from services.planner.vocabulary import EMBEDDING_DIMENSION, EmbeddingCache

CONCEPTS = [f"thing {i}" for i in range(60)]


class FakeStore:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {"targets/t/train/a.png": b"png"}
        self.down = False

    def _check(self):
        if self.down:
            raise DependencyUnavailable("s3 away")

    def list_keys(self, bucket, prefix, recursive=True):
        self._check()
        return iter(sorted(k for k in self.objects if k.startswith(prefix)))

    def put_bytes(self, bucket, key, data, content_type="application/octet-stream", metadata=None):
        self._check()
        self.objects[key] = bytes(data)

    def get_or_none(self, bucket, key):
        self._check()
        return self.objects.get(key)

    def put_json(self, bucket, key, value):
        self.put_bytes(bucket, key, json.dumps(value, sort_keys=True).encode())

    def get_json(self, bucket, key):
        data = self.get_or_none(bucket, key)
        return None if data is None else json.loads(data)


class FakePublisher:
    def __init__(self, fail_flushes: int = 0) -> None:
        self.sent: list[tuple[str, object]] = []
        self.delivered: list[tuple[str, object]] = []
        self.fail_flushes = fail_flushes

    def publish(self, topic, message, key, headers=None):
        self.sent.append((topic.name if hasattr(topic, "name") else topic, message))

    def flush(self, timeout_s=30.0):
        if self.fail_flushes:
            self.fail_flushes -= 1
            self.sent.clear()  # the broker never got them
            raise DependencyUnavailable("kafka away")
        self.delivered.extend(self.sent)
        self.sent.clear()

    def of(self, topic) -> list:
        """Everything the broker accepted or will accept at the next flush."""
        return [m for name, m in self.delivered + self.sent if name == topic.name]


class Aborted(Exception):
    def __init__(self, code, details):
        super().__init__(details)
        self.code, self.details = code, details


class Context:
    def abort(self, code, details):
        raise Aborted(code, details)

    def is_active(self):
        return True


def fake_embed(texts):
    out = np.stack([np.random.default_rng(sum(map(ord, t)) * 7919 + len(t)).normal(size=EMBEDDING_DIMENSION) for t in texts]).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def make_service(store: FakeStore, publisher: FakePublisher, tmp_path, **overrides) -> PlannerService:
    values = dict(planner_default_vocabulary="none")
    values.update(overrides)
    settings = settings_mod.load_service_settings(PlannerSettings, "planner", environ={}, **values)
    service = PlannerService(settings)
    service.store = store  # type: ignore[assignment]
    service.publisher = publisher  # type: ignore[assignment]
    service.explorations = Explorations(store, settings.s3_bucket)
    service.embeddings = EmbeddingCache(store, settings.s3_bucket, cache_dir=tmp_path / "vocab", embed=fake_embed, on_ready=service._on_embeddings_ready)
    with service.explorations.lock:
        service.explorations.load_all()
    return service


def create(service: PlannerService, exploration_id: str = "e1", **fields) -> planner_pb2.Exploration:
    spec = planner_pb2.ExplorationSpec(target_uri="s3://iex/targets/t", concepts=CONCEPTS, iterations=3, queries_per_iteration=8, seed=3, **fields)
    return service.CreateExploration(planner_pb2.CreateExplorationRequest(spec=spec, exploration_id=exploration_id), Context()).exploration


def serve(service: PlannerService, version: int, exploration_id: str = "e1") -> None:
    service.on_model_serving(events_pb2.ModelServing(exploration_id=exploration_id, model=common_pb2.ModelRef(name=f"enc_{exploration_id}", version=version)), None)


def plan_until_done(service: PlannerService, exploration_id: str = "e1") -> None:
    """Runs planning steps as the planning thread would, waiting out the embedding build."""
    for _ in range(2000):
        if service._plan_step(exploration_id) == 0:
            return
        import time

        time.sleep(0.01)
    raise AssertionError("planning kept waiting")


def finish_iteration(service: PlannerService, iteration: int, exploration_id: str = "e1", reward_of=lambda concept: 0.5) -> None:
    """Crawls every query with one image and scores it, completing the iteration."""
    record = service.explorations.records[exploration_id]
    for query in list(record.iterations[iteration].queries.values()):
        service.on_query_crawled(events_pb2.QueryCrawled(query_id=query.query_id, exploration_id=exploration_id, iteration=iteration, images_fetched=1), None)
        sha, url = f"{abs(hash(query.query_id)):064d}"[:64], f"http://x/{query.query_id}"
        service.on_decision(
            events_pb2.ImageDecision(
                exploration_id=exploration_id, iteration=iteration, query_id=query.query_id, raw_sha256=sha, url=url,
                kind=common_pb2.DECISION_KIND_UNIQUE, object_key=f"images/{sha}",
            ),
            None,
        )
        service.on_image_scored(
            events_pb2.ImageScored(exploration_id=exploration_id, iteration=iteration, query_id=query.query_id, raw_sha256=sha, url=url, reward=reward_of(query.concept)),
            None,
        )


def query_ids(publisher: FakePublisher) -> list[str]:
    return [m.query_id for m in publisher.of(topics.QUERIES)]


def test_loop_plans_publishes_and_learns(tmp_path):
    store, publisher = FakeStore(), FakePublisher()
    service = make_service(store, publisher, tmp_path)
    created = create(service, mode=common_pb2.EXPLORATION_MODE_IE, descriptors="curated")
    assert created.state == common_pb2.EXPLORATION_STATE_PENDING and created.spec.vocabulary == "custom"
    serve(service, 1)
    plan_until_done(service)
    first = query_ids(publisher)
    assert first == [f"e1-i1-q{i}" for i in range(8)]
    issued = publisher.of(topics.QUERIES)
    assert all(q.text.endswith(q.concept) and q.descriptor and q.text == f"{q.descriptor} {q.concept}" for q in issued)
    record = service.explorations.records["e1"]
    assert record.iterations[1].published and record.iterations[1].reward_model == "prior"
    # Concepts with a digit 7 pay off; the GP should move towards them.
    finish_iteration(service, 1, reward_of=lambda c: 0.9 if "7" in c else 0.1)
    assert record.iterations[1].phase == common_pb2.ITERATION_PHASE_TRAINING
    assert len(publisher.of(topics.ITERATIONS)) == 1
    serve(service, 2)
    plan_until_done(service)
    assert record.iterations[2].reward_model == "exact" and record.iterations[2].observations_used == 8
    top = service.TopConcepts(planner_pb2.TopConceptsRequest(exploration_id="e1", limit=60), Context())
    assert top.iteration == 2 and top.reward_model == "exact" and top.vocabulary_size == 60
    by_concept = {c.concept: c for c in top.concepts}
    observed = [c for c in record.observations]
    untried = [c for c in CONCEPTS if c not in record.observations]
    # Observed concepts are less uncertain than untried ones; a paying concept is predicted above a poor one.
    assert np.mean([by_concept[c].uncertainty for c in observed]) < np.mean([by_concept[c].uncertainty for c in untried])
    paying = [c for c in observed if "7" in c]
    poor = [c for c in observed if "7" not in c]
    if paying and poor:
        assert max(by_concept[c].predicted_reward for c in paying) > min(by_concept[c].predicted_reward for c in poor)
    probs = [c.sampling_probability for c in top.concepts]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
    # A concept never observed has no observed reward (not 0.0); an observed one has its mean.
    assert all(not by_concept[c].HasField("observed_reward") for c in untried)
    assert all(by_concept[c].HasField("observed_reward") for c in observed)
    history = service.QueryHistory(planner_pb2.QueryHistoryRequest(exploration_id="e1", iteration=1), Context())
    assert len(history.queries) == 8 and all(q.descriptor_source == "curated" for q in history.queries)


def test_a_plan_persisted_but_not_published_is_republished_unchanged_after_a_restart(tmp_path):
    store = FakeStore()
    crashed = FakePublisher()
    service = make_service(store, crashed, tmp_path)
    create(service, mode=common_pb2.EXPLORATION_MODE_RANDOM)
    serve(service, 1)
    crashed.fail_flushes = 1  # the broker refuses the queries; the process dies right after
    with pytest.raises(DependencyUnavailable):
        service._plan_step("e1")
    persisted = json.loads(store.objects["explorations/e1/state.json"])
    planned = {qid: q["text"] for qid, q in persisted["iterations"]["1"]["queries"].items()}
    assert persisted["iterations"]["1"]["published"] is False and len(planned) == 8
    assert query_ids(crashed) == []

    publisher = FakePublisher()
    restarted = make_service(store, publisher, tmp_path)
    assert restarted._needs_planning(restarted.explorations.records["e1"])
    plan_until_done(restarted)
    assert {q.query_id: q.text for q in publisher.of(topics.QUERIES)} == planned
    record = restarted.explorations.records["e1"]
    assert record.iterations[1].published and record.state == common_pb2.EXPLORATION_STATE_RUNNING
    plan_until_done(restarted)  # nothing left to do: nothing published twice
    assert len(query_ids(publisher)) == 8


def test_restart_continues_from_the_requested_iteration_without_reissuing(tmp_path):
    store, publisher = FakeStore(), FakePublisher()
    service = make_service(store, publisher, tmp_path)
    create(service, mode=common_pb2.EXPLORATION_MODE_IE)
    serve(service, 1)
    plan_until_done(service)
    finish_iteration(service, 1)
    serve(service, 2)  # iteration 2 requested; the process dies before planning it
    service.explorations.persist_dirty()

    publisher2 = FakePublisher()
    restarted = make_service(store, publisher2, tmp_path)
    record = restarted.explorations.records["e1"]
    assert record.pending_iteration == 2 and record.current_iteration == 1
    plan_until_done(restarted)
    ids = query_ids(publisher2)
    assert ids == [f"e1-i2-q{i}" for i in range(8)]
    assert not set(ids) & set(query_ids(publisher))
    # TopConcepts after a restart reads the stored distribution.
    fresh = make_service(store, FakePublisher(), tmp_path)
    top = fresh.TopConcepts(planner_pb2.TopConceptsRequest(exploration_id="e1", limit=5), Context())
    assert top.iteration == 2 and len(top.concepts) == 5 and top.concepts[0].uncertainty > 0


def test_pause_holds_a_pending_plan_and_resume_releases_it(tmp_path):
    store, publisher = FakeStore(), FakePublisher()
    service = make_service(store, publisher, tmp_path)
    create(service, mode=common_pb2.EXPLORATION_MODE_RANDOM)
    serve(service, 1)
    service.PauseExploration(planner_pb2.PauseExplorationRequest(exploration_id="e1"), Context())
    plan_until_done(service)
    assert query_ids(publisher) == []
    resumed = service.ResumeExploration(planner_pb2.ResumeExplorationRequest(exploration_id="e1"), Context()).exploration
    assert resumed.state == common_pb2.EXPLORATION_STATE_PENDING
    plan_until_done(service)
    assert len(query_ids(publisher)) == 8
    cancelled = service.CancelExploration(planner_pb2.CancelExplorationRequest(exploration_id="e1"), Context()).exploration
    assert cancelled.state == common_pb2.EXPLORATION_STATE_CANCELLED


def test_image_budget_stops_the_exploration(tmp_path):
    store, publisher = FakeStore(), FakePublisher()
    service = make_service(store, publisher, tmp_path)
    create(service, mode=common_pb2.EXPLORATION_MODE_RANDOM, max_images=5)
    serve(service, 1)
    plan_until_done(service)
    finish_iteration(service, 1)  # 8 images fetched >= 5
    assert publisher.of(topics.ITERATIONS)[-1].last
    serve(service, 2)
    e = service.GetExploration(planner_pb2.GetExplorationRequest(exploration_id="e1"), Context()).exploration
    assert e.state == common_pb2.EXPLORATION_STATE_SUCCEEDED and e.stop_reason == "images" and e.iterations_finished == 1


def test_wall_time_budget_cuts_the_running_iteration(tmp_path):
    store, publisher = FakeStore(), FakePublisher()
    service = make_service(store, publisher, tmp_path)
    create(service, mode=common_pb2.EXPLORATION_MODE_RANDOM, max_wall_seconds=60)
    serve(service, 1)
    plan_until_done(service)
    record = service.explorations.records["e1"]
    assert record.iterations[1].deadline <= record.created_at + 60
    record.created_at -= 120  # as if two minutes had passed
    record.iterations[1].deadline -= 120
    service.after_batch()
    assert record.iterations[1].phase == common_pb2.ITERATION_PHASE_TRAINING and record.iterations[1].queries_incomplete == 8
    assert publisher.of(topics.ITERATIONS)[-1].last
    serve(service, 2)
    assert record.state == common_pb2.EXPLORATION_STATE_SUCCEEDED and record.stop_reason == "wall_time"


def test_explorations_are_isolated(tmp_path):
    store, publisher = FakeStore(), FakePublisher()
    service = make_service(store, publisher, tmp_path)
    create(service, "a", mode=common_pb2.EXPLORATION_MODE_IE)
    create(service, "b", mode=common_pb2.EXPLORATION_MODE_IE)
    serve(service, 1, "a")
    serve(service, 1, "b")
    plan_until_done(service, "a")
    plan_until_done(service, "b")
    finish_iteration(service, 1, "a", reward_of=lambda c: 1.0)
    assert service.explorations.records["b"].observations == {}
    assert service.explorations.records["b"].iterations[1].phase == common_pb2.ITERATION_PHASE_COLLECTING


def test_an_image_another_exploration_stored_first_is_still_a_training_candidate_once(tmp_path):
    """Dedup is shared by every exploration; the trainer's candidates are per exploration."""
    store, publisher = FakeStore(), FakePublisher()
    service = make_service(store, publisher, tmp_path)
    create(service, "a")
    serve(service, 1, "a")
    plan_until_done(service, "a")
    record = service.explorations.records["a"]

    def decide(iteration: int, query, kind, key: str, n: int) -> None:
        sha, url = f"{n:064d}", f"http://x/{iteration}/{n}"
        service.on_decision(events_pb2.ImageDecision(exploration_id="a", iteration=iteration, query_id=query.query_id, raw_sha256=sha, url=url, kind=kind, object_key=key), None)
        service.on_image_scored(events_pb2.ImageScored(exploration_id="a", iteration=iteration, query_id=query.query_id, raw_sha256=sha, url=url, reward=0.5), None)

    queries = list(record.iterations[1].queries.values())
    for n, query in enumerate(queries):
        service.on_query_crawled(events_pb2.QueryCrawled(query_id=query.query_id, exploration_id="a", iteration=1, images_fetched=3 if n < 3 else 1), None)
    decide(1, queries[0], common_pb2.DECISION_KIND_UNIQUE, "images/new", 1)
    decide(1, queries[1], common_pb2.DECISION_KIND_EXACT_DUPLICATE, "images/stored-by-b", 2)  # another exploration's object
    decide(1, queries[2], common_pb2.DECISION_KIND_CONTAMINATES_TARGET, "", 3)
    for i, query in enumerate(queries[3:], start=4):
        decide(1, query, common_pb2.DECISION_KIND_NEAR_DUPLICATE, "images/new", i)  # the same picture again
    for query in queries[:3]:
        for i in range(2):
            decide(1, query, common_pb2.DECISION_KIND_INVALID, "", 100 + 10 * queries.index(query) + i)
    manifest = json.loads(store.objects[record.iterations[1].manifest_key])
    assert manifest["candidates"] == ["images/new", "images/stored-by-b"]
    assert manifest["target_uri"] == service._spec(record).target_uri  # where the trainer finds train_labels.json

    serve(service, 2, "a")
    plan_until_done(service, "a")
    queries = list(record.iterations[2].queries.values())
    for query in queries:
        service.on_query_crawled(events_pb2.QueryCrawled(query_id=query.query_id, exploration_id="a", iteration=2, images_fetched=1), None)
    decide(2, queries[0], common_pb2.DECISION_KIND_EXACT_DUPLICATE, "images/new", 201)  # trained on in iteration 1
    decide(2, queries[1], common_pb2.DECISION_KIND_UNIQUE, "images/newer", 202)
    for i, query in enumerate(queries[2:], start=203):
        decide(2, query, common_pb2.DECISION_KIND_NEAR_DUPLICATE, "images/stored-by-b", i)
    manifest = json.loads(store.objects[record.iterations[2].manifest_key])
    assert manifest["candidates"] == ["images/newer"]
    # The record of what the trainer has seen survives a restart.
    assert ExplorationRecord.from_json(json.loads(json.dumps(record.to_json()))).candidate_digests == record.candidate_digests


@pytest.mark.parametrize(
    "call, request_, code",
    [
        ("GetExploration", planner_pb2.GetExplorationRequest(exploration_id="nope"), grpc.StatusCode.NOT_FOUND),
        ("GetExploration", planner_pb2.GetExplorationRequest(exploration_id="Bad Id"), grpc.StatusCode.INVALID_ARGUMENT),
        ("TopConcepts", planner_pb2.TopConceptsRequest(exploration_id="e1", limit=-1), grpc.StatusCode.INVALID_ARGUMENT),
        ("QueryHistory", planner_pb2.QueryHistoryRequest(exploration_id="e1", iteration=9), grpc.StatusCode.NOT_FOUND),
        ("QueryHistory", planner_pb2.QueryHistoryRequest(exploration_id="e1", page_token="x"), grpc.StatusCode.INVALID_ARGUMENT),
        ("ListExplorations", planner_pb2.ListExplorationsRequest(page_size=5000), grpc.StatusCode.INVALID_ARGUMENT),
        ("ResumeExploration", planner_pb2.ResumeExplorationRequest(exploration_id="e1"), grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
def test_bad_requests_get_the_right_status(tmp_path, call, request_, code):
    service = make_service(FakeStore(), FakePublisher(), tmp_path)
    create(service, mode=common_pb2.EXPLORATION_MODE_RANDOM)
    with pytest.raises(Aborted) as info:
        getattr(service, call)(request_, Context())
    assert info.value.code == code


@pytest.mark.parametrize("field", ["iterations", "queries_per_iteration", "images_per_query"])
def test_create_refuses_a_zero_budget_with_invalid_argument(tmp_path, field):
    service = make_service(FakeStore(), FakePublisher(), tmp_path)
    spec = planner_pb2.ExplorationSpec(target_uri="s3://iex/targets/t", concepts=CONCEPTS, **{field: 0})
    with pytest.raises(Aborted) as info:
        service.CreateExploration(planner_pb2.CreateExplorationRequest(spec=spec), Context())
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.details.startswith(f"spec.{field}: must be at least 1")


def test_create_rejects_a_wordnet_request_when_no_default_vocabulary(tmp_path):
    service = make_service(FakeStore(), FakePublisher(), tmp_path)
    with pytest.raises(Aborted) as info:
        service.CreateExploration(planner_pb2.CreateExplorationRequest(spec=planner_pb2.ExplorationSpec(target_uri="s3://iex/targets/t")), Context())
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.details.startswith("spec.concepts")


def test_evaluations_before_and_after_and_stage_times_are_recorded(tmp_path):
    """Iteration 0's EvaluationFinished is the initial encoder ("before"); each iteration keeps its
    k-NN and linear probe, and when it was collected, trained and served. All survive a restart."""
    store, publisher = FakeStore(), FakePublisher()
    service = make_service(store, publisher, tmp_path)
    create(service)
    ref = lambda v: common_pb2.ModelRef(name="enc_e1", version=v)  # noqa: E731
    protocol = dict(protocol="train->test", train_images=9, classes=2, measurable=False, not_measurable_reason="too few", detectable_difference=0.5)
    service.on_evaluation(
        events_pb2.EvaluationFinished(exploration_id="e1", iteration=0, model=ref(1), knn_top1=0.25, linear_probe_top1=0.5, eval_images=8, record_key="evaluations/e1/v1.json", **protocol),
        None,
    )
    serve(service, 1)
    plan_until_done(service)
    finish_iteration(service, 1)
    service.on_model_published(events_pb2.ModelPublished(exploration_id="e1", iteration=1, model=ref(2)), None)
    service.on_evaluation(
        events_pb2.EvaluationFinished(exploration_id="e1", iteration=1, model=ref(2), knn_top1=0.375, linear_probe_top1=0.625, eval_images=8, record_key="evaluations/e1/v2.json", **protocol),
        None,
    )
    serve(service, 2)
    service._sync()
    for planner in (service, make_service(store, FakePublisher(), tmp_path)):
        e = planner.GetExploration(planner_pb2.GetExplorationRequest(exploration_id="e1"), Context()).exploration
        before = e.initial_evaluation
        assert (before.model.version, before.knn_top1, before.linear_probe_top1, before.eval_images) == (1, 0.25, 0.5, 8)
        assert (before.protocol, before.train_images, before.classes, before.measurable, before.not_measurable_reason) == ("train->test", 9, 2, False, "too few")
        assert (before.detectable_difference, before.record_key) == (0.5, "evaluations/e1/v1.json")
        it = e.iterations[0]
        assert it.iteration == 1 and it.phase == common_pb2.ITERATION_PHASE_FINISHED
        assert (it.knn_top1, it.linear_probe_top1, it.eval_images) == (0.375, 0.625, 8)
        after = it.evaluation
        assert (after.model.version, after.knn_top1, after.protocol, after.train_images, after.record_key) == (2, 0.375, "train->test", 9, "evaluations/e1/v2.json")
        times = [t.ToNanoseconds() for t in (it.started_at, it.collected_at, it.trained_at, it.finished_at)]
        assert all(times) and times == sorted(times)
