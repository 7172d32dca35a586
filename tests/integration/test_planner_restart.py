"""The planner killed (SIGKILL) in the middle of an exploration, on the real stack.

After the restart the exploration carries on from the iteration it was in (same queries, same ids),
finishes, and the queries topic holds every query id exactly once. The second iteration is chosen by
the Gaussian process, fitted on the first iteration's rewards that reached the restarted planner.

Runs last in the session (pytest-order): its images would otherwise be counted by the vertical
slice's whole-bucket assertions.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter

import grpc
import pytest
from kafka import KafkaConsumer

from iex.v1 import common_pb2, planner_pb2, planner_pb2_grpc
from services.cli.demo import upload_target
from services.common import topics
from services.common.endpoints import LOOPBACK, SERVICE_PORTS
from services.common.objectstore import ObjectStore
from services.search import synthetic
from services.stack import servers

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.order(-1)]

BUCKET = "iex"
EXPLORATION = "restart-1"
QUERIES = 6
ITERATIONS = 2
TERMINAL = (common_pb2.EXPLORATION_STATE_SUCCEEDED, common_pb2.EXPLORATION_STATE_FAILED, common_pb2.EXPLORATION_STATE_CANCELLED)


def planner_stub() -> planner_pb2_grpc.PlannerServiceStub:
    channel = grpc.insecure_channel(f"{LOOPBACK}:{SERVICE_PORTS['planner'].grpc}")
    grpc.channel_ready_future(channel).result(timeout=60)
    return planner_pb2_grpc.PlannerServiceStub(channel)


def get(stub, exploration_id: str = EXPLORATION) -> planner_pb2.Exploration:
    return stub.GetExploration(planner_pb2.GetExplorationRequest(exploration_id=exploration_id), timeout=10).exploration


def wait_for(stub, condition, timeout_s: float, what: str) -> planner_pb2.Exploration:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        e = get(stub)
        if condition(e):
            return e
        assert e.state not in TERMINAL, f"exploration ended while waiting for {what}: {e}"
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}: {get(stub)}")


def issued_queries(bootstrap: str, exploration_id: str, quiet_s: float = 5.0, timeout_s: float = 60.0) -> list:
    """Every QueryIssued of the exploration on the topic, read until it stays quiet."""
    consumer = KafkaConsumer(
        topics.QUERIES.name,
        bootstrap_servers=bootstrap.split(","),
        group_id=f"test-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
    )
    found, last_new, began = [], time.monotonic(), time.monotonic()
    try:
        while time.monotonic() - last_new < quiet_s and time.monotonic() - began < timeout_s:
            for records in consumer.poll(timeout_ms=1000).values():
                for record in records:
                    message = topics.QUERIES.message.FromString(record.value)
                    if message.exploration_id == exploration_id:
                        found.append(message)
                    last_new = time.monotonic()
    finally:
        consumer.close()
    return found


def history(stub) -> dict[str, str]:
    rows = stub.QueryHistory(planner_pb2.QueryHistoryRequest(exploration_id=EXPLORATION, page_size=1000), timeout=10).queries
    return {q.query_id: q.text for q in rows}


def test_planner_killed_mid_exploration_resumes_where_it_stopped(stack_env):
    store = ObjectStore(stack_env["IEX_S3_ENDPOINT"], stack_env["IEX_S3_ACCESS_KEY"], stack_env["IEX_S3_SECRET_KEY"])
    store.ensure_bucket(BUCKET)
    target_uri = upload_target(store, BUCKET, "targets/restart", ("blue square", "green square"), n_train=8, n_eval=2)
    stub = planner_stub()
    spec = planner_pb2.ExplorationSpec(
        target_uri=target_uri,
        mode=common_pb2.EXPLORATION_MODE_IE,
        concepts=list(synthetic.CONCEPTS),
        iterations=ITERATIONS,
        queries_per_iteration=QUERIES,
        images_per_query=4,
        seed=11,
        iteration_deadline_seconds=600,
    )
    stub.CreateExploration(planner_pb2.CreateExplorationRequest(spec=spec, exploration_id=EXPLORATION), timeout=30)
    running = wait_for(stub, lambda e: e.current_iteration == 1 and e.state == common_pb2.EXPLORATION_STATE_RUNNING, 300, "iteration 1")
    before = history(stub)
    assert len(before) == QUERIES

    planner = servers.handle("planner")
    pid = planner.pid()
    assert pid is not None, "the stack's planner is not running"
    planner.kill()  # SIGKILL: no drain, no final persist
    assert planner.pid() is None
    phase_at_kill = running.iterations[0].phase

    restarted = servers.service_process("planner", stack_env)
    restarted.start()
    restarted.wait_ready()
    stub = planner_stub()
    after = get(stub)
    assert after.current_iteration == 1, f"restarted at iteration {after.current_iteration}, killed in 1 (phase {phase_at_kill})"
    assert after.state in (common_pb2.EXPLORATION_STATE_RUNNING, common_pb2.EXPLORATION_STATE_SUCCEEDED)
    assert history(stub) == before  # the same queries, not a new plan

    done = wait_for(stub, lambda e: e.state == common_pb2.EXPLORATION_STATE_SUCCEEDED, 900, "the exploration to finish") if after.state != common_pb2.EXPLORATION_STATE_SUCCEEDED else after
    assert done.iterations_finished == ITERATIONS and done.stop_reason == "iterations"
    assert [it.reward_model for it in done.iterations] == ["prior", "exact"]
    queries = issued_queries(stack_env["IEX_KAFKA_BOOTSTRAP"], EXPLORATION)
    counts = Counter(q.query_id for q in queries)
    repeated = {qid: n for qid, n in counts.items() if n > 1}
    assert not repeated, f"queries issued more than once: {repeated}"
    assert set(counts) == {f"{EXPLORATION}-i{i}-q{j}" for i in range(1, ITERATIONS + 1) for j in range(QUERIES)}
    top = stub.TopConcepts(planner_pb2.TopConceptsRequest(exploration_id=EXPLORATION, limit=5), timeout=10)
    assert top.reward_model == "exact" and top.iteration == ITERATIONS and all(c.uncertainty > 0 for c in top.concepts)
