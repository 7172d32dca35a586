"""The near-duplicate index of every stored image, shared by all dedup replicas through S3.

Why shared: fetched images are keyed to partitions by raw sha256, so two near-duplicates (different
bytes, different pixels) are usually decided by different replicas, and each must see what the
others stored. The layout is in services.dedup.segments; the life of an entry:

1. Deciding UNIQUE, a replica writes a write-ahead *intent* (the image's hashes and how to store its
   object), then the object, then the decision record (the commit point, services.dedup.store).
   From the intent on, the entry is durable and in the replica's memory: a replica killed anywhere
   loses no entry of an image it accepted.
2. Every `flush_s` the replica writes the entries it stored since its last flush as one *segment*
   and deletes their intents.
3. Every `refresh_s` a replica lists the index and loads the segments it has not seen: what the
   others stored. Another replica's intent is loaded once it has been listed for `wal_grace_s` (its
   writer should have flushed it by then, so it probably died), and *adopted* (folded into a segment
   here) once listed for `orphan_after_s`. At start-up everything is loaded, intents included.
4. An intent whose object is missing (its writer died between the two writes) is completed by
   whoever matches it or adopts it: the object is written from the staged bytes with the intent's
   first-finder metadata, exactly what the writer would have written, so the writer's own redo
   still finds "its" object and decides UNIQUE again (services.dedup.store does the writing).
5. With more than `max_segments` segments, the smallest are merged (size-tiered: an entry is
   rewritten O(log n) times). Any replica may merge any segments: a merge writes its output before
   deleting its inputs, so concurrent merges only duplicate entries (dropped on load), never lose
   them, and a reader that finds a segment gone simply sees the merged one at its next listing.

The race window: an image stored by replica A is invisible to replica B until A flushes (at most
`flush_s` after it was decided, plus the rest of A's batch) and B refreshes (at most `refresh_s`
later). Two near-duplicates decided in that window on two replicas are both stored. B notices such
pairs when it loads A's segment and counts them (iex_dedup_near_index_late_matches_total); a growing
count says: shorten the intervals.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from services.common.errors import DependencyUnavailable
from services.common.objectstore import DELETE_MANY_MAX
from services.dedup import segments
from services.dedup.nearindex import NearIndex, NearMatch
from services.dedup.segments import Intent, SegmentError

log = logging.getLogger(__name__)

# Segments larger than this (merges, rebuilds) hold entries loaded long ago: not checked for races.
LATE_MATCH_CHECK_MAX = 10_000


@dataclass(frozen=True)
class IndexTimings:
    refresh_s: float = 5.0
    flush_s: float = 2.0
    wal_grace_s: float = 20.0
    orphan_after_s: float = 120.0
    max_segments: int = 24


class _NoMetrics:
    def __getattr__(self, _name):
        return self

    def labels(self, **_kwargs):
        return self

    def inc(self, *_args):
        pass

    def set(self, *_args):
        pass

    def observe(self, *_args):
        pass


class IndexMetrics:
    def __init__(self, metrics) -> None:
        self.entries = metrics.gauge("near_index_entries", "Images in this replica's near-duplicate index")
        self.segments = metrics.gauge("near_index_segments", "Segments of the shared near-duplicate index at the last listing")
        self.loaded = metrics.counter("near_index_loaded_entries_total", "Entries loaded from S3, by what held them", ["source"])
        self.late_matches = metrics.counter(
            "near_index_late_matches_total",
            "Near-duplicate pairs both stored because two replicas decided them before seeing each other's entry",
        )
        self.flushes = metrics.counter("near_index_segments_written_total", "Segments written, by why", ["reason"])
        self.completed = metrics.counter(
            "near_index_intents_completed_total", "Intents of another process whose object had to be written here, by outcome", ["outcome"]
        )
        self.refresh_seconds = metrics.histogram("near_index_refresh_duration_seconds", "Time to list and load the shared index")


class SharedNearIndex:
    def __init__(
        self,
        store,
        bucket: str,
        writer: str,
        max_distance: int,
        timings: IndexTimings = IndexTimings(),
        metrics=None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.bucket = bucket
        self.writer = segments.safe_writer(writer)
        self.max_distance = max_distance
        self.timings = timings
        self.metrics = IndexMetrics(metrics) if metrics is not None else _NoMetrics()
        self.clock = clock
        self.index = NearIndex()
        # Segment keys whose entries are in memory, and the last listing's segments with their counts.
        self._loaded_segments: set[str] = set()
        self._listed_segments: dict[str, int] = {}
        # Intents of others: key -> when first listed; which of them are in memory.
        self._wal_seen: dict[str, float] = {}
        self._wal_loaded: set[str] = set()
        # Rows whose object is not known to exist yet: sha -> its intent.
        self._intents: dict[str, Intent] = {}
        # Our own: intents written, objects not yet (in flight); stored and waiting for a segment.
        self._own_in_flight: set[str] = set()
        self._own_pending: list[str] = []
        self._wal_to_delete: list[str] = []
        self._last_refresh = -math.inf
        self._last_flush = clock()
        # Near-duplicate pairs both stored because of the race window, seen by this replica.
        self.late_matches = 0
        self._lock = threading.RLock()

    # ---- start-up ----------------------------------------------------------------------------
    def load(self) -> bool:
        """Loads every segment and intent; True when the index of this hash version was initialised."""
        started = time.perf_counter()
        keys = list(self.store.list_keys(self.bucket, segments.prefix()))
        self._note_listing(keys)
        for key in self._listed():
            self._load_segment(key, check_races=False)
        now = self.clock()
        for key in keys:
            if segments.wal_sha(key) is not None:
                self._wal_seen.setdefault(key, now)
                self._load_intent(key, check_races=False)
        self._last_refresh = now
        self._observe(started)
        return segments.marker_key() in keys

    def mark_initialised(self, source: str) -> None:
        self.store.put_json(self.bucket, segments.marker_key(), {"writer": self.writer, "source": source, "at": time.time()})

    # ---- queries -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, pixel_sha256: str) -> bool:
        return pixel_sha256 in self.index

    def nearest(self, phash: int, dhash: int, exclude: str | None = None) -> NearMatch | None:
        return self.index.nearest(phash, dhash, self.max_distance, exclude=exclude)

    def intent(self, pixel_sha256: str) -> Intent | None:
        """The intent of an entry whose object is not known to exist (None: it is stored)."""
        with self._lock:
            return self._intents.get(pixel_sha256)

    def confirm(self, pixel_sha256: str) -> None:
        """The object of an entry known through an intent exists (now)."""
        with self._lock:
            if pixel_sha256 in self._own_in_flight:
                self.stored(pixel_sha256)  # ours, from an attempt that failed after its intent
            else:
                self._intents.pop(pixel_sha256, None)

    def drop(self, pixel_sha256: str) -> None:
        """An intent whose object can never be written (its staged bytes are gone): forget the entry."""
        with self._lock:
            self._unindex(pixel_sha256)
            key = segments.wal_key(pixel_sha256)
            self._wal_seen.pop(key, None)
            self._wal_loaded.discard(key)
        try:
            self.store.delete(self.bucket, key)
        except Exception as exc:  # noqa: BLE001 - deleted at the next adoption otherwise
            log.warning("could not delete a dead intent", extra={"key": key, "error": str(exc)[:200]})

    def add_entries(self, shas: list[str], phash: list[int], dhash: list[int], reason: str) -> int:
        """Entries of stored objects found another way (a rebuild): into memory and one segment; returns how many were new."""
        if not shas:
            return 0
        raw = np.frombuffer(b"".join(bytes.fromhex(sha) for sha in shas), dtype=np.uint8).reshape(-1, 32)
        p = np.array(phash, dtype=np.uint64)
        d = np.array(dhash, dtype=np.uint64)
        added = self.index.add_many(raw, p, d)
        self._write_segment(raw, p, d, reason=reason)
        self.metrics.loaded.labels(source=reason).inc(int(added.sum()))
        self.metrics.entries.set(len(self.index))
        return int(added.sum())

    # ---- our own writes ----------------------------------------------------------------------
    def write_intent(self, intent: Intent) -> None:
        """Makes the entry durable (and visible here, if not reserved before) before the object is written."""
        self.store.put_json(self.bucket, segments.wal_key(intent.pixel_sha256), intent.to_json())
        self.reserve(intent)

    def reserve(self, intent: Intent) -> None:
        """The entry, visible to this process's decisions at once; durable only once write_intent returns."""
        with self._lock:
            self.index.add(intent.pixel_sha256, intent.phash, intent.dhash)
            self._intents[intent.pixel_sha256] = intent
            self._own_in_flight.add(intent.pixel_sha256)
        self.metrics.entries.set(len(self.index))

    def forget(self, pixel_sha256: str) -> None:
        """A reserved entry whose intent was never written: out of memory (there is nothing to delete)."""
        with self._lock:
            self._own_in_flight.discard(pixel_sha256)
            self._unindex(pixel_sha256)
        self.metrics.entries.set(len(self.index))

    def _unindex(self, pixel_sha256: str) -> None:
        """The entry and its intent out of this replica's memory (callers hold the lock)."""
        self._intents.pop(pixel_sha256, None)
        row = self.index.row_of(pixel_sha256)
        if row is not None:
            self.index.disable(row)

    def stored(self, pixel_sha256: str) -> None:
        """Our object is written: the entry goes into our next segment."""
        with self._lock:
            self._own_in_flight.discard(pixel_sha256)
            self._intents.pop(pixel_sha256, None)
            if pixel_sha256 not in self._own_pending:
                self._own_pending.append(pixel_sha256)

    def flush(self, force: bool = False) -> bool:
        """Writes our stored entries as a segment (when due) and deletes their intents; True if written."""
        with self._lock:
            due = force or self.clock() - self._last_flush >= self.timings.flush_s
            shas = list(self._own_pending) if due else []
        written = False
        if shas:
            rows = [row for row in (self.index.row_of(sha) for sha in shas) if row is not None]
            key = self._write_segment(*self.index.entries(np.array(rows, dtype=np.int64)), reason="flush")
            flushed = set(shas)
            with self._lock:
                self._own_pending = [sha for sha in self._own_pending if sha not in flushed]
                self._wal_to_delete.extend(segments.wal_key(sha) for sha in shas)
            written = key is not None
        if due:
            self._last_flush = self.clock()
            self._delete_intents()
        return written

    # ---- others' writes ----------------------------------------------------------------------
    def refresh(self, force: bool = False) -> bool:
        """Lists the index and loads what others wrote (when due); True if it listed."""
        now = self.clock()
        if not force and now - self._last_refresh < self.timings.refresh_s:
            return False
        started = time.perf_counter()
        keys = list(self.store.list_keys(self.bucket, segments.prefix()))
        self._note_listing(keys)
        for key in self._listed():
            if key not in self._loaded_segments:
                self._load_segment(key, check_races=True)
        with self._lock:
            own = set(self._own_pending) | self._own_in_flight
        listed_wal = set()
        for key in keys:
            sha = segments.wal_sha(key)
            if sha is None or sha in own:
                continue
            listed_wal.add(key)
            first_seen = self._wal_seen.setdefault(key, now)
            if key not in self._wal_loaded and now - first_seen >= self.timings.wal_grace_s:
                self._load_intent(key, check_races=True)
        with self._lock:
            for key in list(self._wal_seen):
                if key not in listed_wal:
                    self._wal_seen.pop(key)
                    self._wal_loaded.discard(key)
        self._last_refresh = now
        self._observe(started)
        return True

    def orphans(self) -> list[Intent]:
        """Intents of others listed for at least `orphan_after_s`: their writer is gone."""
        now = self.clock()
        with self._lock:
            keys = [key for key, first in self._wal_seen.items() if now - first >= self.timings.orphan_after_s]
        out = []
        for key in keys:
            sha = segments.wal_sha(key)
            intent = self.intent(sha) if sha else None
            if intent is None and sha is not None:
                intent = self._read_intent(key)
                if intent is None and sha in self.index:
                    # Its entry came from a segment (object stored); only the intent object is left.
                    with self._lock:
                        self._wal_to_delete.append(key)
                        self._wal_seen.pop(key, None)
                    continue
            if intent is not None:
                out.append(intent)
        return out

    def adopt(self, intents: Iterable[Intent], complete: Callable[[Intent], bool]) -> int:
        """Folds others' orphaned intents into a segment of ours, once `complete` made sure each object exists."""
        adopted = []
        for intent in intents:
            try:
                ok = complete(intent)
            except DependencyUnavailable:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad intent must not stop the others
                log.warning("orphaned intent could not be completed", extra={"pixel_sha256": intent.pixel_sha256, "error": str(exc)[:200]})
                ok = False
            if ok:
                with self._lock:
                    self.index.add(intent.pixel_sha256, intent.phash, intent.dhash)
                    self.confirm(intent.pixel_sha256)
                adopted.append(intent.pixel_sha256)
            else:
                self.drop(intent.pixel_sha256)
        if adopted:
            rows = [row for row in (self.index.row_of(sha) for sha in adopted) if row is not None]
            self._write_segment(*self.index.entries(np.array(rows, dtype=np.int64)), reason="adopt")
            with self._lock:
                for sha in adopted:
                    key = segments.wal_key(sha)
                    self._wal_to_delete.append(key)
                    self._wal_seen.pop(key, None)
            self._delete_intents()
        return len(adopted)

    def compact(self) -> bool:
        """Merges the smallest segments when there are more than `max_segments`; True if it merged."""
        with self._lock:
            listed = sorted((count, key) for key, count in self._listed_segments.items())
        if len(listed) <= self.timings.max_segments:
            return False
        parts, merged = [], []
        for _, key in listed[: max(2, len(listed) - self.timings.max_segments // 2)]:
            data = self.store.get_or_none(self.bucket, key)
            if data is None:
                return False  # merged by another replica meanwhile: its output is in the next listing
            try:
                parts.append(segments.decode_segment(data))
            except SegmentError as exc:
                log.warning("unreadable segment left out of a merge", extra={"key": key, "error": str(exc)})
                continue
            merged.append(key)
        if not parts:
            return False
        shas = np.concatenate([p[0] for p in parts])
        phash = np.concatenate([p[1] for p in parts])
        dhash = np.concatenate([p[2] for p in parts])
        _, first = np.unique(shas.view(np.dtype((np.void, 32))).reshape(-1), return_index=True)
        first.sort()
        # Inputs not loaded here yet: the merged segment will count as loaded, so take them in now.
        self.index.add_many(shas[first], phash[first], dhash[first])
        self._write_segment(shas[first], phash[first], dhash[first], reason="merge")
        for key in merged:
            self.store.delete(self.bucket, key)
            with self._lock:
                self._listed_segments.pop(key, None)
                self._loaded_segments.discard(key)
        return True

    # ---- pieces ------------------------------------------------------------------------------
    def _write_segment(self, shas: np.ndarray, phash: np.ndarray, dhash: np.ndarray, reason: str) -> str | None:
        if len(phash) == 0:
            return None
        key = segments.new_segment_key(len(phash), self.writer)
        self.store.put_bytes(self.bucket, key, segments.encode_segment(shas, phash, dhash, self.writer), content_type="application/octet-stream")
        with self._lock:
            self._loaded_segments.add(key)
            self._listed_segments[key] = len(phash)
        self.metrics.flushes.labels(reason=reason).inc()
        self.metrics.segments.set(len(self._listed_segments))
        return key

    def _delete_intents(self) -> None:
        # One DeleteObjects request per 1,000 intents instead of one request each.
        while True:
            with self._lock:
                if not self._wal_to_delete:
                    return
                keys = list(self._wal_to_delete[:DELETE_MANY_MAX])
            self.store.delete_many(self.bucket, keys)
            with self._lock:
                done = set(keys)
                self._wal_to_delete = [key for key in self._wal_to_delete if key not in done]

    def _listed(self) -> list[str]:
        with self._lock:
            return list(self._listed_segments)

    def _note_listing(self, keys: list[str]) -> None:
        listed = {key: count for key in keys if (count := segments.segment_count(key)) is not None}
        with self._lock:
            self._listed_segments = listed
            self._loaded_segments &= set(listed)
        self.metrics.segments.set(len(listed))

    def _load_segment(self, key: str, check_races: bool) -> None:
        data = self.store.get_or_none(self.bucket, key)
        if data is None:
            return  # merged away since the listing; its entries are in the merged segment
        try:
            shas, phash, dhash = segments.decode_segment(data)
        except SegmentError as exc:
            log.warning("unreadable index segment skipped", extra={"key": key, "error": str(exc)})
            with self._lock:
                self._loaded_segments.add(key)
            return
        if check_races and len(phash) <= LATE_MATCH_CHECK_MAX:
            self._count_late_matches(shas, phash, dhash)
        added = self.index.add_many(shas, phash, dhash)
        with self._lock:
            self._loaded_segments.add(key)
            # A segment only holds stored images: intents of those entries are settled.
            for raw in shas:
                if self._intents:
                    sha = raw.tobytes().hex()
                    if sha not in self._own_in_flight:
                        self._intents.pop(sha, None)
        self.metrics.loaded.labels(source="segment").inc(int(added.sum()))
        self.metrics.entries.set(len(self.index))

    def _read_intent(self, key: str) -> Intent | None:
        value = self.store.get_json(self.bucket, key)
        if value is None:
            return None
        try:
            return Intent.from_json(value)
        except SegmentError as exc:
            log.warning("unreadable intent skipped", extra={"key": key, "error": str(exc)})
            return None

    def _load_intent(self, key: str, check_races: bool) -> None:
        intent = self._read_intent(key)
        with self._lock:
            self._wal_loaded.add(key)
        if intent is None:
            return
        sha = intent.pixel_sha256
        if sha in self.index:
            return  # already known from a segment (stored) or our own write
        if check_races:
            self._count_late_matches(
                np.frombuffer(bytes.fromhex(sha), dtype=np.uint8).reshape(1, 32),
                np.array([intent.phash], dtype=np.uint64),
                np.array([intent.dhash], dtype=np.uint64),
            )
        with self._lock:
            self.index.add(sha, intent.phash, intent.dhash)
            self._intents[sha] = intent
        self.metrics.loaded.labels(source="intent").inc()
        self.metrics.entries.set(len(self.index))

    def _count_late_matches(self, shas: np.ndarray, phash: np.ndarray, dhash: np.ndarray) -> None:
        if self.max_distance < 0:
            return
        late = 0
        for i in range(len(phash)):
            sha = shas[i].tobytes().hex()
            if sha in self.index:
                continue
            if self.index.nearest(int(phash[i]), int(dhash[i]), self.max_distance) is not None:
                late += 1
        if late:
            self.late_matches += late
            self.metrics.late_matches.inc(late)
            log.info("near-duplicates stored by two replicas before either saw the other", extra={"pairs": late})

    def _observe(self, started: float) -> None:
        self.metrics.refresh_seconds.observe(time.perf_counter() - started)
