"""Decision counts behind GetDedupStats.

Each replica counts what it decides and writes its counts to `dedup/stats/<replica>.json` now and
then (and on shutdown); a replica restarted under the same name continues from its file, and the
answer sums every replica's file. Counts are of decisions made, not of records replayed, so a
redelivered image is not counted again; the one case counted twice is a decision redone after a
crash that came after the counts were written but before the offset was committed.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from typing import Callable

from iex.v1 import common_pb2
from services.dedup.store import DedupOutcome

log = logging.getLogger(__name__)

STATS_PREFIX = "dedup/stats"


def replica_key(replica_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", replica_id)[:128] or "replica"
    return f"{STATS_PREFIX}/{safe}.json"


class DedupStats:
    def __init__(self, store, bucket: str, replica_id: str, persist_interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.bucket = bucket
        self.key = replica_key(replica_id)
        self.persist_interval_s = persist_interval_s
        self.clock = clock
        self.decisions: Counter[str] = Counter()
        self.objects_stored = 0
        self.bytes_stored = 0
        self._dirty = False
        self._last_persist = clock()
        self._lock = threading.Lock()

    def load(self) -> None:
        """Continues from this replica's last written counts."""
        saved = self.store.get_json(self.bucket, self.key)
        if not saved:
            return
        with self._lock:
            self.decisions.update({str(k): int(v) for k, v in saved.get("decisions", {}).items()})
            self.objects_stored += int(saved.get("objects_stored", 0))
            self.bytes_stored += int(saved.get("bytes_stored", 0))

    def record(self, outcome: DedupOutcome) -> None:
        if outcome.replayed:
            return
        with self._lock:
            self.decisions[common_pb2.DecisionKind.Name(outcome.decision.kind)] += 1
            if outcome.bytes_written:
                self.objects_stored += 1
                self.bytes_stored += outcome.bytes_written
            self._dirty = True

    def snapshot(self) -> dict:
        with self._lock:
            return {"decisions": dict(self.decisions), "objects_stored": self.objects_stored, "bytes_stored": self.bytes_stored}

    def persist(self, force: bool = False) -> None:
        now = self.clock()
        with self._lock:
            due = self._dirty and (force or now - self._last_persist >= self.persist_interval_s)
            if due:
                self._dirty = False
        if not due:
            return
        try:
            self.store.put_json(self.bucket, self.key, self.snapshot())
            self._last_persist = now
        except Exception:
            with self._lock:
                self._dirty = True
            raise

    def totals(self) -> tuple[int, dict[str, int]]:
        """(objects stored, decision kind name -> count) over every replica; this one's live counts."""
        own = self.snapshot()
        objects = own["objects_stored"]
        decisions: Counter[str] = Counter(own["decisions"])
        for key in self.store.list_keys(self.bucket, STATS_PREFIX + "/"):
            if key == self.key:
                continue
            other = self.store.get_json(self.bucket, key) or {}
            objects += int(other.get("objects_stored", 0))
            decisions.update({str(k): int(v) for k, v in other.get("decisions", {}).items()})
        return objects, dict(decisions)
