"""The shared Kafka runtime on the real broker: at-least-once, retries, dead letters, commits."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer

from iex.v1 import events_pb2
from services.common.errors import DependencyUnavailable, PermanentError
from services.common.kafka import ConsumerLoop, KafkaConfig, Publisher, ensure_topics
from services.common.metrics import Metrics

pytestmark = pytest.mark.integration

MESSAGE = events_pb2.EvaluationFinished


def read_all(bootstrap: str, topic: str, expect: int, timeout_s: float = 20.0) -> list:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=[bootstrap],
        group_id=f"reader-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
    )
    out = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and len(out) < expect:
            for records in consumer.poll(timeout_ms=500).values():
                out.extend(records)
    finally:
        consumer.close()
    return out


@pytest.fixture()
def topic(stack_env):
    name = f"iex.test.runtime-{uuid.uuid4().hex[:8]}.v1"
    config = KafkaConfig(bootstrap=stack_env["IEX_KAFKA_BOOTSTRAP"], client_id="test-runtime", max_attempts=2, partitions=1)
    ensure_topics(config, [name, f"{name}.dlq"])
    return name, config


def run_loop(config, topic_name, group, handler, until, timeout_s=40.0):
    metrics = Metrics(f"test_{uuid.uuid4().hex[:6]}")
    publisher = Publisher(config, metrics)
    loop = ConsumerLoop(config, group, {topic_name: handler}, publisher, metrics, message_types={topic_name: MESSAGE})
    loop.start()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not until():
            time.sleep(0.2)
    finally:
        loop.stop()
        publisher.close()
    return loop


def test_bad_records_are_dead_lettered_and_the_loop_goes_on(topic):
    name, config = topic
    producer = KafkaProducer(bootstrap_servers=[config.bootstrap])
    producer.send(name, key=b"a", value=b"\xff\xff not protobuf")
    producer.send(name, key=b"b", value=MESSAGE(exploration_id="boom", iteration=1).SerializeToString())
    producer.send(name, key=b"c", value=MESSAGE(exploration_id="transient", iteration=2).SerializeToString())
    producer.send(name, key=b"d", value=MESSAGE(exploration_id="fine", iteration=3).SerializeToString())
    producer.flush()
    producer.close()

    handled: list[str] = []
    attempts = {"boom": 0, "transient": 0}

    def handler(message, ctx):
        if message.exploration_id == "boom":
            attempts["boom"] += 1
            raise ValueError("a bug in the handler")
        if message.exploration_id == "transient" and attempts["transient"] < 3:
            attempts["transient"] += 1
            raise DependencyUnavailable("S3 away for a moment")
        handled.append(message.exploration_id)

    group = f"g-{uuid.uuid4().hex[:6]}"
    run_loop(config, name, group, handler, until=lambda: "fine" in handled)
    assert handled == ["transient", "fine"]
    assert attempts == {"boom": 2, "transient": 3}  # bug retried max_attempts times; outage retried until it passed

    letters = [events_pb2.DeadLetter.FromString(r.value) for r in read_all(config.bootstrap, f"{name}.dlq", 2)]
    reasons = sorted((letter.reason, letter.attempts) for letter in letters)
    assert reasons == [("ValueError", 2), ("decode_error", 0)]
    assert all(letter.topic == name and letter.consumer_group == group for letter in letters)

    # Offsets were committed after the work: the same group sees nothing again.
    again: list[str] = []
    run_loop(config, name, group, lambda m, c: again.append(m.exploration_id), until=lambda: False, timeout_s=10)
    assert again == []


def test_permanent_errors_skip_retries(topic):
    name, config = topic
    producer = KafkaProducer(bootstrap_servers=[config.bootstrap])
    producer.send(name, key=b"x", value=MESSAGE(exploration_id="bad-input").SerializeToString())
    producer.flush()
    producer.close()
    calls = []

    def handler(message, ctx):
        calls.append(1)
        raise PermanentError("staging_missing", "no such object")

    run_loop(config, name, f"g-{uuid.uuid4().hex[:6]}", handler, until=lambda: bool(calls) and len(read_all(config.bootstrap, f"{name}.dlq", 1, 2)) >= 1)
    assert len(calls) == 1
    letter = events_pb2.DeadLetter.FromString(read_all(config.bootstrap, f"{name}.dlq", 1)[0].value)
    assert letter.reason == "staging_missing"


def test_oversized_messages_are_refused(topic):
    name, config = topic
    small = KafkaConfig(bootstrap=config.bootstrap, client_id="t", max_message_bytes=2048)
    publisher = Publisher(small, Metrics("test_oversize"))
    try:
        with pytest.raises(PermanentError) as info:
            publisher.publish(name, MESSAGE(exploration_id="x" * 4096), key="k")
        assert info.value.reason == "message_too_large"
    finally:
        publisher.close()


def test_a_member_stopped_while_it_joins_leaves_no_partition_unread(stack_env):
    """A service stopped seconds after it starts (a replica whose sibling failed to start, a rollout
    cut short) leaves its group in the middle of its join. On tansu that used to break the group:
    the next member to join was assigned nothing, and every record went unread (CI, the crawler
    replicas' fixture). ConsumerLoop.stop now lets the join finish before leaving."""
    name = f"iex.test.join-{uuid.uuid4().hex[:8]}.v1"
    config = KafkaConfig(bootstrap=stack_env["IEX_KAFKA_BOOTSTRAP"], client_id="test-join", partitions=4)
    ensure_topics(config, [name, f"{name}.dlq"])
    group = f"test-join-{uuid.uuid4().hex[:6]}"
    handled: set[str] = set()
    lock = threading.Lock()

    def handler(message, ctx):
        with lock:
            handled.add(message.exploration_id)

    metrics = Metrics(f"test_{uuid.uuid4().hex[:6]}")
    publisher = Publisher(config, metrics)

    def member() -> ConsumerLoop:
        loop = ConsumerLoop(config, group, {name: handler}, publisher, metrics, message_types={name: MESSAGE})
        loop.start()
        return loop

    def wait_for(condition, what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    first = member()
    try:
        wait_for(lambda: first.consumer is not None and first.consumer._coordinator.rebalance_in_progress(), "the first member's join to begin")
    finally:
        first.stop()
    second = member()
    try:
        expected = {f"record-{i}" for i in range(40)}
        for key in sorted(expected):
            publisher.publish(name, MESSAGE(exploration_id=key, iteration=1), key=key)
        publisher.flush()
        wait_for(lambda: handled >= expected, f"all 40 records handled (missing {len(expected - handled)})", timeout_s=45)
        assert len(second.consumer.assignment()) == 4
    finally:
        second.stop()
        publisher.close()
