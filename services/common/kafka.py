"""Kafka over kafka-python with protobuf payloads, at-least-once consumption and dead-letter topics.

Settings chosen to work on both tansu and Apache Kafka: no idempotent producer (tansu has no
InitProducerId), group offsets committed explicitly after the work is durable, auto_offset_reset
earliest, and lag computed from fetch high-water marks instead of ListOffsets (wrong on tansu when a
batch holds several records).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata, TopicPartition

from iex.v1 import events_pb2
from services.common.errors import DependencyUnavailable, PermanentError
from services.common.metrics import Metrics
from services.common.topics import BY_NAME, Topic

log = logging.getLogger(__name__)

HEADER_TYPE = "iex-type"
HEADER_PRODUCER = "iex-producer"


def now_timestamp() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap: str
    client_id: str
    session_timeout_ms: int = 6000
    max_poll_interval_ms: int = 300_000
    max_message_bytes: int = 1_000_000
    max_attempts: int = 3
    partitions: int = 4

    @classmethod
    def from_settings(cls, settings, max_poll_interval_ms: int = 300_000) -> "KafkaConfig":
        return cls(
            bootstrap=settings.kafka_bootstrap,
            client_id=f"iex-{settings.service}",
            session_timeout_ms=settings.kafka_session_timeout_ms,
            max_poll_interval_ms=max_poll_interval_ms,
            max_message_bytes=settings.kafka_max_message_bytes,
            max_attempts=settings.kafka_max_attempts,
            partitions=settings.kafka_topic_partitions,
        )

    @property
    def servers(self) -> list[str]:
        return [part.strip() for part in self.bootstrap.split(",") if part.strip()]


def ensure_topics(config: KafkaConfig, names: Iterable[str], timeout_s: float = 30.0) -> None:
    """Creates missing topics; racing creators are fine."""
    admin = KafkaAdminClient(bootstrap_servers=config.servers, client_id=config.client_id, request_timeout_ms=10_000)
    try:
        existing = set(admin.list_topics())
        missing = [name for name in names if name not in existing]
        if not missing:
            return
        for name in missing:
            try:
                admin.create_topics([NewTopic(name=name, num_partitions=config.partitions, replication_factor=1)])
            except TopicAlreadyExistsError:
                pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if set(missing) <= set(admin.list_topics()):
                return
            time.sleep(0.2)
        raise DependencyUnavailable(f"topics not visible after creation: {sorted(set(missing) - set(admin.list_topics()))}")
    finally:
        admin.close()


class Publisher:
    """Produces protobuf events; `flush()` is the point after which they are durable on the broker."""

    def __init__(self, config: KafkaConfig, metrics: Metrics) -> None:
        self.config = config
        self.producer = KafkaProducer(
            bootstrap_servers=config.servers,
            client_id=config.client_id,
            acks="all",
            retries=10,
            linger_ms=5,
            max_request_size=config.max_message_bytes,
            enable_idempotence=False,
            request_timeout_ms=15_000,
        )
        self.produced = metrics.counter("kafka_produced_total", "Events produced", ["topic"])
        self.produce_errors = metrics.counter("kafka_produce_errors_total", "Events the broker did not accept", ["topic"])
        self._failed: list[BaseException] = []
        self._lock = threading.Lock()

    def publish(self, topic: Topic | str, message: Message, key: str, headers: Mapping[str, str] | None = None) -> None:
        name = topic.name if isinstance(topic, Topic) else topic
        payload = message.SerializeToString()
        if len(payload) > self.config.max_message_bytes:
            raise PermanentError("message_too_large", f"{len(payload)} bytes for {name}")
        all_headers = [(HEADER_TYPE, message.DESCRIPTOR.full_name.encode()), (HEADER_PRODUCER, self.config.client_id.encode())]
        all_headers += [(k, v.encode()) for k, v in (headers or {}).items()]
        future = self.producer.send(name, value=payload, key=key.encode(), headers=all_headers)
        future.add_callback(lambda _meta: self.produced.labels(topic=name).inc())
        future.add_errback(lambda exc: self._on_error(name, exc))

    def _on_error(self, topic: str, exc: BaseException) -> None:
        self.produce_errors.labels(topic=topic).inc()
        with self._lock:
            self._failed.append(exc)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Waits until every event sent so far is acknowledged; raises when one was not."""
        try:
            self.producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            raise DependencyUnavailable(f"kafka flush failed: {exc}") from exc
        with self._lock:
            failed, self._failed = self._failed, []
        if failed:
            raise DependencyUnavailable(f"{len(failed)} events not acknowledged: {failed[0]!r}")

    def close(self) -> None:
        try:
            self.producer.flush(timeout=10)
        finally:
            self.producer.close(timeout=5)


@dataclass(frozen=True)
class EventContext:
    topic: str
    partition: int
    offset: int
    key: str
    headers: Mapping[str, str]
    timestamp_ms: int


Handler = Callable[[Message, EventContext], None]


class ConsumerLoop:
    """Consumes topics in one group; each record is handled, outputs flushed, then its offset committed.

    A handler raising DependencyUnavailable is retried without limit (the record is not lost and not
    dead-lettered while S3 or Triton is away); any other exception is retried `max_attempts` times and
    then the record goes to `<topic>.dlq` with the reason. Undecodable records go there at once.

    `concurrency` names topics whose records of one poll are handled by that many threads at once
    (a handler that waits on S3 round trips); each record keeps its retries and dead-lettering, and
    a partition's offset is committed only up to its first record left unfinished. Their handlers
    must be thread-safe; the other topics' records of the poll are handled first, one at a time.
    """

    def __init__(
        self,
        config: KafkaConfig,
        group_id: str,
        handlers: Mapping[str, Handler],
        publisher: Publisher,
        metrics: Metrics,
        max_poll_records: int = 64,
        after_batch: Callable[[], None] | None = None,
        before_commit: Callable[[], None] | None = None,
        message_types: Mapping[str, type[Message]] | None = None,
        concurrency: Mapping[str, int] | None = None,
    ) -> None:
        self.config = config
        self.group_id = group_id
        self.handlers = dict(handlers)
        self.publisher = publisher
        self.max_poll_records = max_poll_records
        self.after_batch = after_batch
        self.before_commit = before_commit
        # Topics of services.common.topics are known; others (tests, plugins) name their type here.
        self.message_types = {name: topic.message for name, topic in BY_NAME.items()} | dict(message_types or {})
        self.concurrency = {topic: workers for topic, workers in (concurrency or {}).items() if workers > 1}
        self._pool: ThreadPoolExecutor | None = None
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.consumer: KafkaConsumer | None = None
        self.healthy = False
        self.consumed = metrics.counter("kafka_consumed_total", "Events handled", ["topic", "outcome"])
        self.dead_lettered = metrics.counter("kafka_dead_lettered_total", "Events sent to a dead-letter topic", ["topic", "reason"])
        self.handler_errors = metrics.counter("kafka_handler_errors_total", "Handler failures (before retry)", ["topic", "kind"])
        self.lag = metrics.gauge("kafka_consumer_lag_messages", "Records behind the high-water mark", ["topic", "partition"])
        self.handle_seconds = metrics.histogram("kafka_handle_duration_seconds", "Time to handle one event", ["topic"])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"consumer-{self.group_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops polling, lets the record in hand finish, commits and leaves the group."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def _connect(self) -> KafkaConsumer:
        return KafkaConsumer(
            *self.handlers.keys(),
            bootstrap_servers=self.config.servers,
            client_id=self.config.client_id,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=self.config.session_timeout_ms,
            heartbeat_interval_ms=max(500, self.config.session_timeout_ms // 3),
            max_poll_interval_ms=self.config.max_poll_interval_ms,
            max_poll_records=self.max_poll_records,
            fetch_max_bytes=max(self.config.max_message_bytes * 4, 4 * 1024 * 1024),
            max_partition_fetch_bytes=max(self.config.max_message_bytes, 1024 * 1024),
        )

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.consumer = self._connect()
                    self.healthy = True
                    self._poll_loop(self.consumer)
                except KafkaError as exc:
                    self.healthy = False
                    log.warning("kafka consumer error, reconnecting", extra={"error": repr(exc), "group": self.group_id})
                    self._stop.wait(2.0)
                finally:
                    if self.consumer is not None:
                        try:
                            self._finish_joining(self.consumer)
                            self.consumer.close(autocommit=False)
                        except Exception:  # noqa: BLE001 - closing a broken consumer must not mask the loop's outcome
                            pass
                        self.consumer = None
        finally:
            self.healthy = False
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._stopped.set()

    def _finish_joining(self, consumer: KafkaConsumer) -> None:
        """Lets a join in progress complete before the consumer leaves the group.

        tansu mishandles a LeaveGroup that arrives while the member's join is still in progress:
        the group's next generation keeps the departed member's partitions, and nobody consumes
        them until the group rebalances again (seen in CI: a crawler stopped seconds after it
        started left half the queries topic unread for the rest of the run). A member that has
        finished joining leaves cleanly. Records polled meanwhile are not handled and not
        committed, so they are delivered again to whoever owns their partition next.
        """
        coordinator = getattr(consumer, "_coordinator", None)
        if coordinator is None or not hasattr(coordinator, "rebalance_in_progress"):
            return
        deadline = time.monotonic() + self.config.session_timeout_ms / 1000
        while coordinator.rebalance_in_progress() and time.monotonic() < deadline:
            consumer.poll(timeout_ms=100, max_records=1)

    def _poll_loop(self, consumer: KafkaConsumer) -> None:
        while not self._stop.is_set():
            batch = consumer.poll(timeout_ms=500, max_records=self.max_poll_records)
            done: dict[TopicPartition, int] = {}
            try:
                concurrent = {tp: records for tp, records in batch.items() if tp.topic in self.concurrency}
                for tp, records in batch.items():
                    if tp in concurrent:
                        continue
                    for record in records:
                        if not self._handle_until_done(record):
                            return  # stopping with this record unfinished: it is not committed
                        done[tp] = record.offset + 1
                if concurrent and not self._handle_concurrently(concurrent, done):
                    return
            finally:
                if done:
                    self._commit(consumer, done)
            if self.after_batch is not None:
                self.after_batch()
            self._update_lag(consumer)

    def _handle_concurrently(self, batch: Mapping[TopicPartition, list], done: dict[TopicPartition, int]) -> bool:
        """Handles the records on the pool; records each partition's finished prefix in `done`."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=max(self.concurrency.values()), thread_name_prefix=f"{self.group_id}-handler")
        records = [record for records in batch.values() for record in records]
        finished = dict(zip((id(r) for r in records), self._pool.map(self._handle_until_done, records)))
        complete = True
        for tp, part in batch.items():
            for record in part:
                if not finished[id(record)]:
                    complete = False  # stopping: this record and the rest of its partition are redelivered
                    break
                done[tp] = record.offset + 1
        return complete

    def _commit(self, consumer: KafkaConsumer, done: Mapping[TopicPartition, int]) -> None:
        # Outputs first: a record is committed only once what it produced is durable (state, broker).
        while True:
            try:
                if self.before_commit is not None:
                    self.before_commit()
                self.publisher.flush()
                break
            except DependencyUnavailable as exc:
                if self._stop.is_set():
                    raise
                log.warning("waiting for kafka to accept outputs", extra={"error": str(exc)})
                time.sleep(1.0)
        consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in done.items()})

    def _handle_until_done(self, record) -> bool:
        """Handles one record; False only when asked to stop before it could be handled."""
        topic = record.topic
        handler = self.handlers[topic]
        message_type = self.message_types.get(topic)
        headers = {k: (v.decode(errors="replace") if isinstance(v, bytes) else str(v)) for k, v in (record.headers or [])}
        context = EventContext(
            topic=topic,
            partition=record.partition,
            offset=record.offset,
            key=(record.key or b"").decode(errors="replace"),
            headers=headers,
            timestamp_ms=record.timestamp,
        )
        if message_type is None:
            self._dead_letter(record, "unknown_topic", 0)
            return True
        if record.value is not None and len(record.value) > self.config.max_message_bytes:
            self._dead_letter(record, "message_too_large", 0)
            return True
        try:
            message = message_type.FromString(record.value or b"")
        except (DecodeError, RuntimeError, ValueError):
            self._dead_letter(record, "decode_error", 0)
            return True
        attempts = 0
        backoff = 0.5
        while True:
            started = time.perf_counter()
            try:
                handler(message, context)
                self.handle_seconds.labels(topic=topic).observe(time.perf_counter() - started)
                self.consumed.labels(topic=topic, outcome="ok").inc()
                return True
            except DependencyUnavailable as exc:
                self.handler_errors.labels(topic=topic, kind="dependency").inc()
                log.warning("dependency unavailable, will retry", extra={"topic": topic, "error": str(exc)[:300]})
                if self._stop.wait(backoff):
                    return False
                backoff = min(backoff * 2, 10.0)
            except PermanentError as exc:
                self.handler_errors.labels(topic=topic, kind="permanent").inc()
                self._dead_letter(record, exc.reason, attempts + 1)
                return True
            except Exception as exc:  # noqa: BLE001 - any handler bug is retried, then dead-lettered
                attempts += 1
                self.handler_errors.labels(topic=topic, kind="error").inc()
                log.exception("handler failed", extra={"topic": topic, "offset": record.offset, "attempt": attempts})
                if attempts >= self.config.max_attempts:
                    self._dead_letter(record, type(exc).__name__, attempts)
                    return True
                if self._stop.wait(backoff):
                    return False
                backoff = min(backoff * 2, 10.0)

    def _dead_letter(self, record, reason: str, attempts: int) -> None:
        reason = reason[:64]
        letter = events_pb2.DeadLetter(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key or b"",
            value=(record.value or b"")[: self.config.max_message_bytes // 2],
            reason=reason,
            attempts=attempts,
            consumer_group=self.group_id,
            failed_at=now_timestamp(),
        )
        self.publisher.publish(f"{record.topic}.dlq", letter, key=(record.key or b"").decode(errors="replace"))
        self.dead_lettered.labels(topic=record.topic, reason=reason).inc()
        self.consumed.labels(topic=record.topic, outcome="dead_lettered").inc()
        log.warning("dead-lettered", extra={"topic": record.topic, "offset": record.offset, "reason": reason})

    def _update_lag(self, consumer: KafkaConsumer) -> None:
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            try:
                position = consumer.position(tp, timeout_ms=1000)
            except KafkaError:
                continue
            if position is not None:
                self.lag.labels(topic=tp.topic, partition=str(tp.partition)).set(max(0, highwater - position))
