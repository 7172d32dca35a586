"""End to end: a 2-iteration exploration driven through the `iex` CLI, then its report checked
against what the system really recorded.

The exploration runs on the session stack (generated offline web, a tiny generated target) and is
created, watched and reported with `python -m services.cli` in subprocesses, as a user would. The
report's numbers (report.json) are then recomputed independently, never through the report code:
per iteration, fetched / stored / duplicates / refused / scored from the events on the Kafka
topics (deduplicated by their identities: delivery is at-least-once), stored objects from S3
(present, content-addressed, one per new image), the relevant-image yield from the corpus's own
ground truth and the stored images' URLs, and k-NN / linear probe from the trainer's evaluation
events (iteration 0: the initial encoder) and its per-image records in S3 (the paired interval).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import urlparse

import pytest
from kafka import KafkaConsumer

from iex.v1 import common_pb2
from services.cli.demo import upload_target
from services.common import topics
from services.common.objectstore import ObjectStore, content_key
from services.dedup.hashing import pixel_sha256
from services.search import synthetic

# Late in the session (pytest-order; the planner restart test is last): its images would otherwise be
# counted by the vertical slice's whole-bucket assertions.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.order(-2)]

BUCKET = "iex"
EXPLORATION = "e2e-main-job"
ITERATIONS = 2
QUERIES = 6
IMAGES_PER_QUERY = 6
TARGET_CONCEPTS = ("red circle", "orange circle")
REPO = Path(__file__).resolve().parents[2]


def iex(env: dict, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO,
        env={**env, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "protos")])},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"iex {' '.join(args)} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def read_all(bootstrap: str, topic: topics.Topic, exploration_id: str, settle_s: float = 4.0, timeout_s: float = 60.0) -> list:
    """Every message of `exploration_id` on the topic, read from the beginning until nothing new arrives."""
    consumer = KafkaConsumer(
        topic.name,
        bootstrap_servers=bootstrap.split(","),
        group_id=f"test-e2e-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
    )
    messages: list = []
    deadline = time.monotonic() + timeout_s
    quiet_since = None
    try:
        while time.monotonic() < deadline:
            batch = [topic.message.FromString(r.value) for records in consumer.poll(timeout_ms=1000).values() for r in records]
            messages.extend(m for m in batch if m.exploration_id == exploration_id)
            if batch:
                quiet_since = None
            elif messages:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= settle_s:
                    break
    finally:
        consumer.close()
    return messages


@pytest.fixture(scope="module")
def run(stack_env, tmp_path_factory):
    """Creates, watches and reports the exploration through the CLI; returns (report.json, its dir)."""
    store = ObjectStore(stack_env["IEX_S3_ENDPOINT"], stack_env["IEX_S3_ACCESS_KEY"], stack_env["IEX_S3_SECRET_KEY"])
    store.ensure_bucket(BUCKET)
    target_uri = upload_target(store, BUCKET, "targets/e2e", TARGET_CONCEPTS, n_train=8, n_eval=4)
    env = {**os.environ, **stack_env}
    created = json.loads(
        iex(
            env, "explore", "create", "--json", "--id", EXPLORATION, "--target", target_uri, "--mode", "ie",
            "--concepts", ",".join(synthetic.CONCEPTS), "--iterations", str(ITERATIONS), "--queries", str(QUERIES),
            "--images-per-query", str(IMAGES_PER_QUERY), "--seed", "11",
            # A small random-init encoder keeps the two iterations quick (the CLI's default is EfficientNet-Lite0 at 96 px).
            "--init", "random", "--image-size", "64",
        ).stdout
    )
    assert created["exploration_id"] == EXPLORATION
    iex(env, "explore", "watch", EXPLORATION, "--timeout", "240", timeout=260)  # exits 0 only when SUCCEEDED
    status = json.loads(iex(env, "explore", "status", EXPLORATION, "--json").stdout)
    assert status["state"] == "EXPLORATION_STATE_SUCCEEDED"
    out = tmp_path_factory.mktemp("reports")
    corpus = Path(stack_env["IEX_SEARCH_CORPUS_DIR"]) / "corpus.jsonl"
    report = json.loads(iex(env, "report", EXPLORATION, "--out", str(out), "--corpus", str(corpus), "--json").stdout)
    return report, out / EXPLORATION, store


@pytest.fixture(scope="module")
def events(run, stack_env):
    bootstrap = stack_env["IEX_KAFKA_BOOTSTRAP"]
    wanted = {
        "crawled": topics.QUERIES_CRAWLED,
        "fetched": topics.IMAGES_FETCHED,
        "decisions": topics.DECISIONS,
        "scored": topics.IMAGES_SCORED,
        "stored": topics.IMAGES_STORED,
        "evaluations": topics.EVALUATIONS,
        "queries": topics.QUERIES,
    }
    found = {}
    for name, topic in wanted.items():
        if name == "stored":  # ImageStored has no exploration id: read everything, filter by the decisions below
            found[name] = read_everything(bootstrap, topic)
        else:
            found[name] = read_all(bootstrap, topic, EXPLORATION)
    return found


def read_everything(bootstrap: str, topic: topics.Topic, settle_s: float = 4.0) -> list:
    consumer = KafkaConsumer(
        topic.name, bootstrap_servers=bootstrap.split(","), group_id=f"test-e2e-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest", enable_auto_commit=False, session_timeout_ms=6000, heartbeat_interval_ms=2000,
    )
    messages: list = []
    quiet_since = time.monotonic()
    try:
        while time.monotonic() - quiet_since < settle_s:
            batch = [topic.message.FromString(r.value) for records in consumer.poll(timeout_ms=1000).values() for r in records]
            if batch:
                messages.extend(batch)
                quiet_since = time.monotonic()
    finally:
        consumer.close()
    return messages


def latest_by(messages, key) -> dict:
    """At-least-once delivery: a redelivered event repeats an identity; the last one stands."""
    out = {}
    for m in messages:
        out[key(m)] = m
    return out


def test_report_files_and_plots(run):
    report, directory, _ = run
    assert report["exploration_id"] == EXPLORATION and report["state"] == "succeeded"
    assert report["iterations_finished"] == ITERATIONS and [n["iteration"] for n in report["iterations"]] == [1, 2]
    assert (directory / "report.md").is_file() and json.loads((directory / "report.json").read_text()) == report
    for name in ("yield.png", "concept_rewards.png", "image_rewards.png", "images.png", "quality.png", "top_concepts.png", "stages.png"):
        assert name in report["plots"], name
        assert (directory / name).stat().st_size > 5_000, name  # a drawn plot, not an empty canvas
    text = (directory / "report.md").read_text()
    assert "Relevant-image yield" in text and "Time per stage" in text


def test_counts_match_the_events(run, events):
    report, _, _ = run
    decisions = latest_by(events["decisions"], lambda m: (m.query_id, m.raw_sha256, m.url))
    crawled = latest_by(events["crawled"], lambda m: m.query_id)
    fetched = latest_by(events["fetched"], lambda m: (m.query_id, m.raw_sha256, m.url))
    scored = latest_by(events["scored"], lambda m: (m.query_id, m.raw_sha256, m.url))
    queries = latest_by(events["queries"], lambda m: m.query_id)
    for n in report["iterations"]:
        i = n["iteration"]
        kinds = Counter(d.kind for d in decisions.values() if d.iteration == i)
        crawled_i = [c for c in crawled.values() if c.iteration == i]
        assert n["queries_issued"] == sum(1 for q in queries.values() if q.iteration == i) == QUERIES
        assert n["queries_crawled"] == len(crawled_i) == QUERIES
        assert n["fetched"] == sum(c.images_fetched for c in crawled_i) == sum(1 for f in fetched.values() if f.iteration == i) == sum(kinds.values())
        assert n["fetched"] > 0, "the iteration fetched nothing: the check would be vacuous"
        assert n["stored"] == kinds[common_pb2.DECISION_KIND_UNIQUE] > 0
        assert n["duplicates"] == kinds[common_pb2.DECISION_KIND_EXACT_DUPLICATE] + kinds[common_pb2.DECISION_KIND_NEAR_DUPLICATE]
        assert n["contaminating"] == kinds[common_pb2.DECISION_KIND_CONTAMINATES_TARGET]
        assert n["invalid"] == kinds[common_pb2.DECISION_KIND_INVALID]
        assert n["refused"] == sum(sum(c.refused.values()) for c in crawled_i)
        assert n["scored"] == sum(1 for s in scored.values() if s.iteration == i)
        # Every accepted image (new or duplicate) was scored, with the model serving that iteration.
        assert n["scored"] == n["stored"] + n["duplicates"]
        assert {s.model.version for s in scored.values() if s.iteration == i} == {i}
    totals = report["totals"]
    assert totals["fetched"] == len(decisions) and totals["stored"] == sum(n["stored"] for n in report["iterations"])


def test_stored_images_are_the_objects_in_s3(run, events):
    report, _, store = run
    unique = [d for d in latest_by(events["decisions"], lambda m: (m.query_id, m.raw_sha256, m.url)).values() if d.kind == common_pb2.DECISION_KIND_UNIQUE]
    # One new object per UNIQUE decision, content-addressed by its pixels, announced on images-stored.
    assert len({d.pixel_sha256 for d in unique}) == len(unique) == report["totals"]["stored"]
    announced = {m.pixel_sha256 for m in events["stored"]}
    for d in unique:
        data = store.get_bytes(BUCKET, d.object_key)
        assert d.object_key == content_key("images", pixel_sha256(data))
        assert d.pixel_sha256 in announced
    # The audit records in S3 hold one decision per fetched image of this exploration.
    records = list(store.list_keys(BUCKET, f"decisions/{EXPLORATION}/"))
    assert len(records) == report["totals"]["fetched"]
    by_iteration = Counter(store.get_json(BUCKET, key)["decision"].get("iteration", 0) for key in records)
    assert {int(k): v for k, v in by_iteration.items()} == {n["iteration"]: n["fetched"] for n in report["iterations"]}


def test_yield_from_the_ground_truth(run, events, stack_env):
    report, _, _ = run
    concept_of = {}
    with open(Path(stack_env["IEX_SEARCH_CORPUS_DIR"]) / "corpus.jsonl", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                concept_of[record["id"]] = record.get("concept", "")
    accepted = {common_pb2.DECISION_KIND_UNIQUE, common_pb2.DECISION_KIND_EXACT_DUPLICATE, common_pb2.DECISION_KIND_NEAR_DUPLICATE}
    found: dict[int, set[str]] = defaultdict(set)  # iteration -> distinct corpus images accepted
    new: dict[int, set[str]] = defaultdict(set)
    for d in latest_by(events["decisions"], lambda m: (m.query_id, m.raw_sha256, m.url)).values():
        if d.kind not in accepted:
            continue
        image_id = urlparse(d.url).path.rsplit("/images/", 1)[-1]
        assert image_id in concept_of, d.url
        found[d.iteration].add(image_id)
        if d.kind == common_pb2.DECISION_KIND_UNIQUE:
            new[d.iteration].add(image_id)
    relevant_of = lambda ids: sum(concept_of[i] in TARGET_CONCEPTS for i in ids)  # noqa: E731
    for n in report["iterations"]:
        i = n["iteration"]
        assert (n["relevant"], n["judged"]) == (relevant_of(found[i]), len(found[i]))
        assert (n["new_relevant"], n["new_judged"]) == (relevant_of(new[i]), len(new[i]))
        assert n["yield"] == pytest.approx(relevant_of(found[i]) / len(found[i]))
    total = report["totals"]
    assert total["yield"] == pytest.approx(sum(relevant_of(v) for v in found.values()) / sum(len(v) for v in found.values()))


def test_representation_quality_matches_the_evaluations(run, events):
    report, _, _ = run
    evaluations = latest_by(events["evaluations"], lambda m: m.iteration)
    assert sorted(evaluations) == [0, 1, 2]
    before = report["initial_evaluation"]
    assert before["eval_images"] == evaluations[0].eval_images > 0 and before["model_version"] == 1
    assert before["knn_top1"] == pytest.approx(evaluations[0].knn_top1) and before["linear_probe_top1"] == pytest.approx(evaluations[0].linear_probe_top1)
    for n in report["iterations"]:
        e = evaluations[n["iteration"]]
        assert n["trained_model"] == e.model.version == n["iteration"] + 1
        assert n["knn_top1"] == pytest.approx(e.knn_top1) and n["linear_probe_top1"] == pytest.approx(e.linear_probe_top1)
    # The paper's protocol: the generated target carries train labels (2 x 8 images) and a test split
    # of 2 x 4; every version is scored on the same test images, recorded image by image in S3.
    assert all((e.protocol, e.train_images, e.eval_images, e.classes) == ("train->test", 16, 8, 2) for e in evaluations.values())
    _, _, store = run
    records = {i: store.get_json(BUCKET, e.record_key) for i, e in evaluations.items()}
    assert all(r["test"]["keys"] == records[0]["test"]["keys"] for r in records.values())
    for i, r in records.items():
        assert sum(r["test"]["knn_correct"]) / 8 == pytest.approx(evaluations[i].knn_top1)
    ev = report["evaluation"]
    assert (ev["protocol"], ev["test_images"], ev["train_images"], ev["measurable"]) == ("train->test", 8, 16, True)
    assert ev["detectable_difference"] == pytest.approx(evaluations[0].detectable_difference) == pytest.approx(3 / 8)
    difference = (sum(records[2]["test"]["knn_correct"]) - sum(records[0]["test"]["knn_correct"])) / 8
    assert ev["knn"]["mean"] == pytest.approx(difference) and ev["knn"]["low"] <= difference <= ev["knn"]["high"]


def test_stage_times_cover_each_iteration(run):
    report, _, _ = run
    for n in report["iterations"]:
        seconds = n["seconds"]
        assert all(seconds[stage] is not None and seconds[stage] >= 0 for stage in ("planning", "collecting", "training", "serving")), seconds
