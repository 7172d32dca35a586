"""Which target each exploration explores towards (exploration id -> target URI).

ImageFetched does not carry the target, so dedup learns it from ExplorationCreated. With several
replicas each one sees only the explorations partitions it is assigned, so what any replica learns
is written to S3 (`dedup/explorations/<id>.json`) and read back by the others. An image whose
exploration is still unknown (dedup restarted with a backlog and reaches the image before the
creation event) is resolved by asking the planner, the owner of explorations: waiting for the event
instead could block the consumer that has to deliver it.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from typing import Any, Callable, Protocol

import grpc

from iex.v1 import planner_pb2, planner_pb2_grpc
from services.common import security
from services.common.errors import DependencyUnavailable, PermanentError

log = logging.getLogger(__name__)

# Ids become parts of object keys: no slashes, no dot-dot, bounded length.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

RECORD_PREFIX = "dedup/explorations"


def valid_id(value: str) -> bool:
    return bool(ID_PATTERN.match(value)) and ".." not in value


def record_key(exploration_id: str) -> str:
    return f"{RECORD_PREFIX}/{exploration_id}.json"


class PlannerLookup(Protocol):
    def __call__(self, exploration_id: str) -> str | None:
        """The exploration's target URI, None when the planner does not know the exploration."""


class PlannerExplorationLookup:
    """Asks the planner's GetExploration; an unreachable planner is a dependency outage.

    The channel is `security.client_channel` with `client` (the service's own settings): TLS when
    IEX_TLS_CA is set, this service's certificate as the client certificate under mTLS, and its
    IEX_AUTH_TOKEN, if any, with every call."""

    def __init__(self, address: str, timeout_s: float = 5.0, client: Any | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.client = client
        self._channel: grpc.Channel | None = None
        self._lock = threading.Lock()

    def _stub(self) -> planner_pb2_grpc.PlannerServiceStub:
        with self._lock:
            if self._channel is None:
                self._channel = security.client_channel(self.address, self.client)
            return planner_pb2_grpc.PlannerServiceStub(self._channel)

    def __call__(self, exploration_id: str) -> str | None:
        try:
            response = self._stub().GetExploration(planner_pb2.GetExplorationRequest(exploration_id=exploration_id), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return None
            raise DependencyUnavailable(f"planner {self.address} GetExploration: {code}") from exc
        return response.exploration.spec.target_uri

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None


class ExplorationDirectory:
    """exploration id -> target URI: memory, then the S3 record any replica wrote, then the planner."""

    def __init__(self, store, bucket: str, planner_lookup: PlannerLookup | Callable[[str], str | None] | None = None, capacity: int = 4096) -> None:
        self.store = store
        self.bucket = bucket
        self.planner_lookup = planner_lookup
        self.capacity = capacity
        self._known: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def _cache(self, exploration_id: str, target_uri: str) -> None:
        with self._lock:
            self._known[exploration_id] = target_uri
            self._known.move_to_end(exploration_id)
            while len(self._known) > self.capacity:
                self._known.popitem(last=False)

    def remember(self, exploration_id: str, target_uri: str, source: str = "event") -> None:
        if not valid_id(exploration_id):
            raise PermanentError("invalid_exploration_id", exploration_id[:80])
        self.store.put_json(self.bucket, record_key(exploration_id), {"exploration_id": exploration_id, "target_uri": target_uri, "source": source})
        self._cache(exploration_id, target_uri)

    def target_uri(self, exploration_id: str) -> str:
        """The target URI ('' when the exploration has none); PermanentError when nobody knows it."""
        with self._lock:
            known = self._known.get(exploration_id)
        if known is not None:
            return known
        record = self.store.get_json(self.bucket, record_key(exploration_id))
        if record is not None:
            target_uri = str(record.get("target_uri", ""))
            self._cache(exploration_id, target_uri)
            return target_uri
        if self.planner_lookup is None:
            raise PermanentError("unknown_exploration", exploration_id)
        target_uri = self.planner_lookup(exploration_id)
        if target_uri is None:
            raise PermanentError("unknown_exploration", exploration_id)
        log.info("exploration learned from the planner", extra={"exploration_id": exploration_id})
        self.remember(exploration_id, target_uri, source="planner")
        return target_uri
