"""The consumer loop's concurrent topics: every record handled once, on several threads, with the
same retry and dead-letter rules, and a partition committed only up to its first unfinished record."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from kafka.structs import TopicPartition

from iex.v1 import events_pb2
from services.common import topics
from services.common.errors import DependencyUnavailable
from services.common.kafka import ConsumerLoop, KafkaConfig
from services.common.metrics import Metrics

TOPIC = topics.IMAGES_FETCHED.name


class Sink:
    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []

    def publish(self, topic, message, key, headers=None):
        self.sent.append((topic if isinstance(topic, str) else topic.name, message))

    def flush(self, timeout_s: float = 30.0) -> None:
        pass


def record(partition: int, offset: int) -> SimpleNamespace:
    value = events_pb2.ImageFetched(exploration_id="e", query_id=f"q{partition}-{offset}").SerializeToString()
    return SimpleNamespace(topic=TOPIC, partition=partition, offset=offset, key=b"k", value=value, headers=[], timestamp=0)


def loop(handler, threads: int = 4) -> ConsumerLoop:
    config = KafkaConfig(bootstrap="127.0.0.1:1", client_id="test", max_attempts=2)
    return ConsumerLoop(config, "iex-test", {TOPIC: handler}, Sink(), Metrics(f"concurrency_{id(handler)}"), concurrency={TOPIC: threads})


def test_records_of_a_poll_are_handled_at_once_and_each_once():
    seen: list[str] = []
    running, peak = [0], [0]
    lock = threading.Lock()

    def handler(message, ctx):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
            seen.append(message.query_id)

    consumer = loop(handler)
    batch = {TopicPartition(TOPIC, p): [record(p, o) for o in range(5)] for p in range(2)}
    done: dict = {}
    try:
        assert consumer._handle_concurrently(batch, done)
    finally:
        consumer._pool.shutdown()
    assert sorted(seen) == sorted(f"q{p}-{o}" for p in range(2) for o in range(5))
    assert peak[0] > 1  # handled concurrently, not one after the other
    assert done == {TopicPartition(TOPIC, 0): 5, TopicPartition(TOPIC, 1): 5}


def test_a_partition_is_committed_only_up_to_its_first_unfinished_record():
    def handler(message, ctx):
        if (ctx.partition, ctx.offset) == (0, 2):
            consumer._stop.set()  # asked to stop while this record waits for a dependency
            raise DependencyUnavailable("s3 away")

    consumer = loop(handler)
    batch = {TopicPartition(TOPIC, p): [record(p, o) for o in range(4)] for p in range(2)}
    done: dict = {}
    try:
        assert not consumer._handle_concurrently(batch, done)
    finally:
        consumer._pool.shutdown()
    # Offsets 3 (and 2) of partition 0 are redelivered; partition 1 finished.
    assert done == {TopicPartition(TOPIC, 0): 2, TopicPartition(TOPIC, 1): 4}


def test_a_failing_record_is_retried_then_dead_lettered_while_the_others_pass():
    attempts: dict[int, int] = {}
    lock = threading.Lock()

    def handler(message, ctx):
        with lock:
            attempts[ctx.offset] = attempts.get(ctx.offset, 0) + 1
        if ctx.offset == 1:
            raise ValueError("bad image")

    consumer = loop(handler)
    batch = {TopicPartition(TOPIC, 0): [record(0, o) for o in range(3)]}
    done: dict = {}
    try:
        assert consumer._handle_concurrently(batch, done)
    finally:
        consumer._pool.shutdown()
    assert attempts == {0: 1, 1: 2, 2: 1}
    letters = [m for t, m in consumer.publisher.sent if t == f"{TOPIC}.dlq"]
    assert [(m.offset, m.reason, m.attempts) for m in letters] == [(1, "ValueError", 2)]
    assert done == {TopicPartition(TOPIC, 0): 3}
