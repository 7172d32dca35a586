"""gRPC iex.v1.DedupService: read-only views of decisions and counts."""

from __future__ import annotations

import grpc

from iex.v1 import dedup_pb2, dedup_pb2_grpc
from services.common.errors import DependencyUnavailable
from services.dedup.explorations import valid_id
from services.dedup.stats import DedupStats
from services.dedup.store import SHA256_PATTERN, decision_from_record, decisions_of_image

SERVICE_NAME = dedup_pb2.DESCRIPTOR.services_by_name["DedupService"].full_name


class DedupApi(dedup_pb2_grpc.DedupServiceServicer):
    def __init__(self, store, bucket: str, stats: DedupStats) -> None:
        self.store = store
        self.bucket = bucket
        self.stats = stats

    def GetDecision(self, request: dedup_pb2.GetDecisionRequest, context: grpc.ServicerContext) -> dedup_pb2.GetDecisionResponse:
        exploration_id = request.exploration_id
        if not exploration_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "exploration_id: required")
        if not valid_id(exploration_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "exploration_id: letters, digits, '.', '_' and '-' only, at most 128 characters")
        raw_sha = request.raw_sha256.strip().lower()
        if not raw_sha:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "raw_sha256: required")
        if not SHA256_PATTERN.match(raw_sha):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "raw_sha256: must be 64 hexadecimal characters")
        try:
            # One record per (query, URL) that found these bytes; the latest decision answers.
            records = [self.store.get_json(self.bucket, key) for key in self.store.list_keys(self.bucket, decisions_of_image(exploration_id, raw_sha))]
        except DependencyUnavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, "object store unavailable, retry later")
        decisions = [decision_from_record(record) for record in records if record is not None]
        if not decisions:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no decision for raw_sha256 {raw_sha} in exploration {exploration_id}")
        latest = max(decisions, key=lambda d: (d.decided_at.seconds, d.decided_at.nanos))
        return dedup_pb2.GetDecisionResponse(decision=latest)

    def GetDedupStats(self, request: dedup_pb2.GetDedupStatsRequest, context: grpc.ServicerContext) -> dedup_pb2.GetDedupStatsResponse:
        try:
            objects_stored, decisions = self.stats.totals()
        except DependencyUnavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, "object store unavailable, retry later")
        return dedup_pb2.GetDedupStatsResponse(objects_stored=objects_stored, decisions=decisions)
