"""What the chaos suite (and the load benchmark) use to break a running stack and to read what it did.

Evidence is read where it lives, never from the services' own summaries alone: topic contents from
the broker, committed offsets from the group coordinator against fetched high-water marks, objects
from S3, health over gRPC, memory from /proc.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.structs import TopicPartition

from iex.v1 import common_pb2, events_pb2
from services.common import security, topics

DECISION_NAMES = {value: name.removeprefix("DECISION_KIND_").lower() for name, value in common_pb2.DecisionKind.items()}
# Decisions the scorer must score: new pictures and those crediting an already stored one.
ACCEPTED_KINDS = {common_pb2.DECISION_KIND_UNIQUE, common_pb2.DECISION_KIND_EXACT_DUPLICATE, common_pb2.DECISION_KIND_NEAR_DUPLICATE}
DUPLICATE_KINDS = ACCEPTED_KINDS - {common_pb2.DECISION_KIND_UNIQUE}


# --------------------------------------------------------------------------------------------
# Kafka


def read_topics(bootstrap: str, names: Sequence[str], timeout_s: float = 60.0) -> dict[str, list]:
    """Every record of every partition of `names`, from offset 0 to the fetched high-water mark.

    Reads by assignment (no group), and knows it is done from fetch high-water marks: on tansu the
    ListOffsets answer is wrong when a batch holds several records, so end_offsets() is not used.
    """
    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), group_id=None, enable_auto_commit=False, request_timeout_ms=20_000)
    out: dict[str, list] = {name: [] for name in names}
    try:
        partitions = []
        deadline = time.monotonic() + timeout_s
        for name in names:
            ids = consumer.partitions_for_topic(name)
            while ids is None and time.monotonic() < deadline:
                time.sleep(0.2)
                ids = consumer.partitions_for_topic(name)
            partitions += [TopicPartition(name, p) for p in sorted(ids or ())]
        if not partitions:
            return out
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, 0)
        quiet = 0
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=500, max_records=5000)
            for tp, records in batch.items():
                out[tp.topic].extend(records)
            done = all(consumer.highwater(tp) is not None and consumer.position(tp) >= consumer.highwater(tp) for tp in partitions)
            quiet = quiet + 1 if done and not batch else 0
            if quiet >= 2:
                return out
        raise TimeoutError(f"could not read {', '.join(names)} to their end within {timeout_s:.0f}s")
    finally:
        consumer.close()


def decoded(records: Iterable, message_type) -> list:
    return [message_type.FromString(r.value) for r in records]


def group_lag(bootstrap: str, group: str) -> dict[str, int]:
    """'topic/partition' -> records between the group's committed offset and the fetched high-water mark.

    Every partition of every topic the group has committed on is counted, so a partition that got
    records but was never committed shows its whole length as lag.
    """
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), request_timeout_ms=20_000)
    try:
        committed = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    group_topics = sorted({tp.topic for tp in committed})
    if not group_topics:
        return {}
    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), group_id=None, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(t, p) for t in group_topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        consumer.assign(partitions)
        offsets = {tp: (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0) for tp in partitions}
        for tp, offset in offsets.items():
            consumer.seek(tp, offset)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(consumer.highwater(tp) is None for tp in partitions):
            consumer.poll(timeout_ms=300, max_records=1)
            for tp, offset in offsets.items():  # poll moved positions; only the high-water marks are wanted
                consumer.seek(tp, offset)
        return {f"{tp.topic}/{tp.partition}": max(0, (consumer.highwater(tp) or 0) - offsets[tp]) for tp in partitions}
    finally:
        consumer.close()


def dead_letters(bootstrap: str) -> list[events_pb2.DeadLetter]:
    names = [topic.dead_letter for topic in topics.ALL]
    records = read_topics(bootstrap, names)
    return [events_pb2.DeadLetter.FromString(r.value) for name in names for r in records[name]]


# --------------------------------------------------------------------------------------------
# Services


def health(address: str, client: security.ClientSettings, timeout_s: float = 3.0) -> str:
    channel = security.client_channel(address, client)
    try:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    except grpc.RpcError as exc:
        return f"unreachable ({exc.code().name})"
    finally:
        channel.close()


def wait_serving(address: str, client: security.ClientSettings, timeout_s: float) -> float | None:
    """Seconds until the service answers SERVING, None if it did not within `timeout_s`."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        if health(address, client) == "SERVING":
            return time.monotonic() - began
        time.sleep(0.5)
    return None


def metrics_text(port: int, host: str = "127.0.0.1") -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:  # noqa: S310 - loopback
        return response.read().decode()


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def rss_bytes(pid: int) -> tuple[int, int]:
    """(current, peak) resident memory of one process, from /proc/<pid>/status."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, amount, _unit = line.split()
                values[key[:-1]] = int(amount) * 1024
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def group_members(pid: int) -> Iterator[tuple[int, list[str]]]:
    """(pid, /proc/<pid>/stat fields after the command name) of `pid` and every process in its group."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            if int(entry) == pid or int(fields[2]) == pid:  # fields[2] is the process group
                yield int(entry), fields
        except (OSError, ValueError, IndexError):
            continue


def group_rss(pid: int) -> int:
    """Resident memory of a process and its children (Triton's python-backend stubs live apart)."""
    total = 0
    for member, _fields in group_members(pid):
        try:
            total += rss_bytes(member)[0]
        except (OSError, ValueError):
            continue
    return total


def stop_group(pid: int) -> None:
    os.killpg(pid, signal.SIGSTOP)


def continue_group(pid: int) -> None:
    os.killpg(pid, signal.SIGCONT)


# --------------------------------------------------------------------------------------------
# The ledger: what the topics and S3 say happened to every image


def decision_key(query_id: str, raw_sha256: str, url: str) -> tuple[str, str, str]:
    return (query_id, raw_sha256, url)


@dataclass
class Ledger:
    """Counts for one exploration (optionally one iteration) from the topics and the object store."""

    fetched: int = 0  # distinct (query, raw sha, url) the crawler published
    decided: int = 0  # of those, with a dedup decision
    accepted: int = 0  # distinct pictures dedup accepted as new (UNIQUE)
    stored: int = 0  # of those, present in S3 under images/<pixel sha>
    duplicates_decided: int = 0  # decisions crediting an already stored picture
    to_score: int = 0  # accepted decisions (unique or duplicate) that must be scored
    scored: int = 0  # of those, scored at least once
    lost: int = 0  # fetched-but-undecided + accepted-but-not-stored + to-score-but-unscored
    duplicated: int = 0  # pictures accepted as new more than once + decisions with conflicting kinds
    redelivered: int = 0  # extra copies of events (at-least-once; harmless, counted)
    rescored: int = 0  # extra ImageScored for a decision and model version already scored (harmless, counted)
    scored_versions: dict[str, int] = field(default_factory=dict)
    redelivered_by_event: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def build_ledger(
    fetched_events: Sequence[events_pb2.ImageFetched],
    decision_events: Sequence[events_pb2.ImageDecision],
    stored_events: Sequence[events_pb2.ImageStored],
    scored_events: Sequence[events_pb2.ImageScored],
    object_exists: Callable[[str], bool],
    exploration_id: str,
    iteration: int | None = None,
) -> Ledger:
    def mine(event) -> bool:
        return event.exploration_id == exploration_id and (iteration is None or event.iteration == iteration)

    ledger = Ledger()
    fetched = Counter(decision_key(e.query_id, e.raw_sha256, e.url) for e in fetched_events if mine(e))
    ledger.fetched = len(fetched)
    kinds: dict[tuple, set[int]] = defaultdict(set)
    copies: Counter = Counter()
    pixels: dict[tuple, str] = {}
    for d in decision_events:
        if mine(d):
            key = decision_key(d.query_id, d.raw_sha256, d.url)
            kinds[key].add(int(d.kind))
            copies[key] += 1
            pixels[key] = d.pixel_sha256
    ledger.decided = len(set(fetched) & set(kinds))
    undecided = set(fetched) - set(kinds)
    conflicting = [key for key, k in kinds.items() if len(k) > 1]
    unique_by_pixel: dict[str, set[tuple]] = defaultdict(set)
    for key, k in kinds.items():
        if common_pb2.DECISION_KIND_UNIQUE in k:
            unique_by_pixel[pixels[key]].add(key)
    ledger.accepted = len(unique_by_pixel)
    missing_objects = [sha for sha in unique_by_pixel if not object_exists(sha)]
    ledger.stored = ledger.accepted - len(missing_objects)
    twice_new = [sha for sha, keys in unique_by_pixel.items() if len(keys) > 1]
    ledger.duplicates_decided = sum(1 for k in kinds.values() if k and k <= DUPLICATE_KINDS)

    to_score = {key for key, k in kinds.items() if k & ACCEPTED_KINDS}
    ledger.to_score = len(to_score)
    score_copies: Counter = Counter()
    versions: Counter = Counter()
    for s in scored_events:
        if mine(s):
            key = decision_key(s.query_id, s.raw_sha256, s.url)
            score_copies[(key, s.model.version)] += 1
    scored_keys = {key for key, _version in score_copies}
    for (_key, version), _n in score_copies.items():
        versions[f"v{version}"] += 1
    ledger.scored = len(to_score & scored_keys)
    unscored = to_score - scored_keys
    ledger.rescored = sum(n - 1 for n in score_copies.values())
    ledger.scored_versions = dict(sorted(versions.items()))

    stored_copies = Counter(e.pixel_sha256 for e in stored_events if mine(e))
    unannounced = [sha for sha in unique_by_pixel if sha not in stored_copies and iteration is None]
    ledger.redelivered_by_event = {
        "ImageFetched": sum(n - 1 for n in fetched.values()),
        "ImageDecision": sum(n - 1 for n in copies.values()),
        "ImageStored": sum(n - 1 for n in stored_copies.values()),
        "ImageScored": ledger.rescored,
    }
    ledger.redelivered = sum(v for k, v in ledger.redelivered_by_event.items() if k != "ImageScored")

    ledger.lost = len(undecided) + len(missing_objects) + len(unscored)
    ledger.duplicated = len(twice_new) + len(conflicting)
    for label, items in (
        ("fetched but never decided", undecided),
        ("accepted but not in S3", missing_objects),
        ("accepted but never scored", unscored),
        ("accepted as new more than once", twice_new),
        ("conflicting decisions", conflicting),
        ("stored without an ImageStored event", unannounced),
    ):
        if items:
            ledger.problems.append(f"{len(items)} {label}: {sorted(map(str, items))[:3]}")
    return ledger


# --------------------------------------------------------------------------------------------
# Fault records and the report


@dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""


@dataclass
class FaultRecord:
    name: str
    action: str
    trigger: str
    injected_during: str = ""
    iteration: int = 0
    outage_s: float = 0.0
    recovered_s: float | None = None
    checks: list[Check] = field(default_factory=list)
    ledger: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def check(self, name: str, passed: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, bool(passed), detail))
        return bool(passed)


def write_json(path, data: Mapping) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as out:
        json.dump(data, out, indent=2, sort_keys=True, default=str)
        out.write("\n")
    os.replace(tmp, path)
