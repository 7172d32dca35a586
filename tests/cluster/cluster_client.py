"""The cluster suite's client side: the planner's gRPC API over a port-forward (TLS with the
chart's CA, the chart's token), the target uploaded to the cluster's MinIO over another one."""

from __future__ import annotations

import argparse
import time
import zlib
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import grpc

from iex.v1 import common_pb2, planner_pb2, planner_pb2_grpc
from services.cli.defaults import DEMO, exploration_spec
from services.cli.demo import DEMO_TARGET_CONCEPTS, upload_target
from services.common.objectstore import ObjectStore
from services.search import synthetic

ENDED = {
    common_pb2.EXPLORATION_STATE_SUCCEEDED,
    common_pb2.EXPLORATION_STATE_FAILED,
    common_pb2.EXPLORATION_STATE_CANCELLED,
}


def state_name(state: int) -> str:
    return common_pb2.ExplorationState.Name(state)


@dataclass
class Planner:
    stub: planner_pb2_grpc.PlannerServiceStub
    metadata: tuple[tuple[str, str], ...]

    def get(self, exploration_id: str) -> planner_pb2.Exploration:
        return self.stub.GetExploration(planner_pb2.GetExplorationRequest(exploration_id=exploration_id), timeout=30).exploration


@contextmanager
def planner_client(cluster):
    """A planner stub through `kubectl port-forward`, verifying the chart's certificate."""
    ca = cluster.secret(f"{cluster.fullname}-tls", "ca.crt").encode()
    token = cluster.secret(f"{cluster.fullname}-auth", "tokens").splitlines()[0].split(":", 1)[1]
    with cluster.port_forward(f"svc/{cluster.fullname}-planner", 50051) as port:
        channel = grpc.secure_channel(
            f"127.0.0.1:{port}",
            grpc.ssl_channel_credentials(root_certificates=ca),
            options=[("grpc.ssl_target_name_override", f"{cluster.fullname}-planner")],
        )
        grpc.channel_ready_future(channel).result(timeout=60)
        try:
            yield Planner(planner_pb2_grpc.PlannerServiceStub(channel), (("authorization", f"Bearer {token}"),))
        finally:
            channel.close()


@contextmanager
def object_store(cluster):
    access = cluster.secret(f"{cluster.fullname}-s3", "access-key")
    secret = cluster.secret(f"{cluster.fullname}-s3", "secret-key")
    with cluster.port_forward(f"svc/{cluster.fullname}-minio", 9000) as port:
        yield ObjectStore(f"127.0.0.1:{port}", access, secret)


def create_exploration(cluster, planner: Planner, name: str, iterations: int = 1, queries: int = 8) -> str:
    """The demo's exploration (generated target, the synthetic offline web the chart's search
    serves), with a tiny budget; the target goes to the cluster's MinIO first."""
    with object_store(cluster) as store:
        store.ensure_bucket("iex")
        target_uri = upload_target(store, "iex", f"targets/cluster-{name}", DEMO_TARGET_CONCEPTS)
    args = argparse.Namespace(**{**DEMO.as_dict(), "iterations": iterations, "queries": queries,
                                 "images_per_query": DEMO.images_per_query, "descriptors": None,
                                 # Each exploration samples other concepts: a repeat would find only duplicates.
                                 "seed": zlib.crc32(name.encode()) % 100_000 + 1})
    spec = exploration_spec(args, display_name=f"cluster suite: {name}", target_uri=target_uri,
                            concepts=list(synthetic.CONCEPTS), labels=[])
    created = planner.stub.CreateExploration(planner_pb2.CreateExplorationRequest(spec=spec), metadata=planner.metadata, timeout=60)
    return created.exploration.exploration_id


def wait_ended(connect, exploration_id: str, timeout_s: float, on_poll=None) -> planner_pb2.Exploration:
    """Polls until the exploration ends; `connect()` opens a planner client (reopened when the
    port-forward or the planner pod goes away, as it does during a rollout)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            with connect() as planner:
                while time.monotonic() < deadline:
                    last = planner.get(exploration_id)
                    if on_poll is not None:
                        on_poll(last)
                    if last.state in ENDED:
                        return last
                    time.sleep(3)
        except (grpc.RpcError, AssertionError, TimeoutError, grpc.FutureTimeoutError) as exc:  # a rollout in between
            print(f"planner unreachable for a moment ({type(exc).__name__}); reconnecting")
            time.sleep(3)
    raise AssertionError(f"exploration {exploration_id} did not end in {timeout_s:.0f}s; last: {last}")


def assert_nothing_lost(exploration: planner_pb2.Exploration) -> None:
    """Every query issued was crawled, every iteration collected all its queries, every unique
    image was scored: what a lost message or a dropped piece of work would break."""
    assert exploration.state == common_pb2.EXPLORATION_STATE_SUCCEEDED, (state_name(exploration.state), exploration.error)
    counts = exploration.counts
    assert counts.queries_issued > 0 and counts.queries_crawled == counts.queries_issued, counts
    assert counts.images_unique > 0 and counts.images_scored >= counts.images_unique, counts
    assert exploration.iterations_finished == exploration.spec.iterations, exploration
    assert [it.queries_incomplete for it in exploration.iterations] == [0] * len(exploration.iterations), exploration.iterations
