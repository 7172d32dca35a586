"""Every service under hostile input, on the real code: every gRPC method, and every Kafka handler.

The six services run in this process (start(): real settings, interceptors, S3 and Kafka of a
private stack; consumers off, so nothing but the fuzzed input reaches them), each on an ephemeral
port, with authentication on and the fuzzing client holding a valid token so that requests get
past it.

gRPC: a request may be refused, but deliberately: the answer is OK or one of the codes a servicer
chooses (INVALID_ARGUMENT naming the field, NOT_FOUND, FAILED_PRECONDITION, ...). UNKNOWN or
INTERNAL means an exception escaped the servicer; UNIMPLEMENTED means the proto promises a method
nobody serves. Bytes that are not a protobuf at all must leave the server serving the next request.

Kafka: every handler a service registers gets decodable but hostile events (the undecodable ones
never reach a handler: the consumer loop dead-letters them, tests/integration/test_runtime_kafka.py).
A handler may finish or raise PermanentError (the record is dead-lettered with its reason). It may
raise DependencyUnavailable only for a dependency that is really away here (Triton for the scorer,
the search backend for the crawler): otherwise the record is a poison pill that the consumer retries
forever, and its partition stops. Any other exception is an unhandled case (retried, then
dead-lettered under the exception's class name).
"""

from __future__ import annotations

import os
import re
from collections import Counter
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from fuzz_strategies import messages, near
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import event, given, settings
from hypothesis import strategies as st

from iex.v1 import common_pb2, crawler_pb2, dedup_pb2, events_pb2, planner_pb2, planner_pb2_grpc, scorer_pb2, search_pb2, trainer_pb2
from services.cli.demo import upload_target
from services.common import endpoints, security, topics
from services.common.errors import DependencyUnavailable, PermanentError
from services.common.kafka import EventContext
from services.common.objectstore import content_key
from services.common.objectstore import ObjectStore
from services.common.settings import load_service_settings
from services.search import synthetic
from services.stack import servers
from services.stack.process import port_open

pytestmark = [pytest.mark.fuzz, pytest.mark.integration]

BUCKET = "iex"
PROTOS = {
    "planner": planner_pb2,
    "crawler": crawler_pb2,
    "dedup": dedup_pb2,
    "scorer": scorer_pb2,
    "trainer": trainer_pb2,
    "search": search_pb2,
}
DELIBERATE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,  # the scorer has no Triton here: its encoder is honestly unavailable
}
# method -> answers seen, printed at the end (pytest -s): how far the generated requests got.
ANSWERS: dict[str, Counter] = {}
# "<field>: <problem>" with field paths like spec.concepts[3] or images[0].
FIELD_PREFIX = re.compile(r"^[a-z_][a-z0-9_]*(\[\d+\])?(\.[a-z_][a-z0-9_]*(\[\d+\])?)*: ")


KNOWN = "fuzz-known"  # an exploration that exists, so requests naming it get past the lookup
SHA = "ab" * 32
SPEC = planner_pb2.ExplorationSpec(
    target_uri=f"s3://{BUCKET}/targets/fuzz",
    mode=common_pb2.EXPLORATION_MODE_RANDOM,
    concepts=["red circle", "blue square"],
    iterations=1,
    queries_per_iteration=2,
    images_per_query=2,
    seed=1,
)
# Valid requests, one per method; the fuzzer changes one or two fields of them at a time.
TEMPLATES = {
    "iex.v1.PlannerService.CreateExploration": planner_pb2.CreateExplorationRequest(spec=SPEC, exploration_id="fuzz-new"),
    "iex.v1.PlannerService.GetExploration": planner_pb2.GetExplorationRequest(exploration_id=KNOWN),
    "iex.v1.PlannerService.ListExplorations": planner_pb2.ListExplorationsRequest(page_size=10),
    "iex.v1.PlannerService.WatchExploration": planner_pb2.WatchExplorationRequest(exploration_id=KNOWN),
    "iex.v1.PlannerService.PauseExploration": planner_pb2.PauseExplorationRequest(exploration_id=KNOWN),
    "iex.v1.PlannerService.ResumeExploration": planner_pb2.ResumeExplorationRequest(exploration_id=KNOWN),
    "iex.v1.PlannerService.CancelExploration": planner_pb2.CancelExplorationRequest(exploration_id="fuzz-cancel-me"),
    "iex.v1.PlannerService.TopConcepts": planner_pb2.TopConceptsRequest(exploration_id=KNOWN, limit=5),
    "iex.v1.PlannerService.QueryHistory": planner_pb2.QueryHistoryRequest(exploration_id=KNOWN, page_size=5),
    "iex.v1.CrawlerService.ProbeUrl": crawler_pb2.ProbeUrlRequest(url="http://10.1.2.3/a.png"),
    "iex.v1.DedupService.GetDecision": dedup_pb2.GetDecisionRequest(exploration_id=KNOWN, raw_sha256=SHA),
    "iex.v1.ScorerService.ScoreImages": scorer_pb2.ScoreImagesRequest(exploration_id=KNOWN, images=[b"\x89PNG\r\n\x1a\n"]),
    "iex.v1.ScorerService.GetServingModel": scorer_pb2.GetServingModelRequest(exploration_id=KNOWN),
    "iex.v1.ScorerService.GetEmbeddings": scorer_pb2.GetEmbeddingsRequest(exploration_id=KNOWN, pixel_sha256=[SHA]),
    "iex.v1.SearchService.Search": search_pb2.SearchRequest(text="red circle", num_images=5),
    "iex.v1.TrainerService.GetTrainerStatus": trainer_pb2.GetTrainerStatusRequest(exploration_id=KNOWN),
}


def _requests(method):
    """Hostile messages: fully random ones, and valid ones with one or two fields made hostile."""
    template = TEMPLATES.get(method.full_name)
    if template is None:
        return messages(method.input_type)
    return st.one_of(messages(method.input_type), near(template), near(template), st.just(template))


def _service_class(name: str):
    import importlib

    module = importlib.import_module(f"services.{name}.service")
    return next(
        value
        for value in vars(module).values()
        if isinstance(value, type) and getattr(value, "name", None) == name and hasattr(value, "settings_class") and value.__module__ == module.__name__
    )


def _methods():
    for name, module in PROTOS.items():
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                yield pytest.param(name, service, method, id=f"{name}.{method.name}")


@dataclass
class Running:
    service: object
    address: str


@pytest.fixture(scope="module")
def fuzz_stack():
    names = ("s3", "kafka")
    busy = [p for name in names for p in servers.ports(name) if port_open(endpoints.LOOPBACK, p)]
    if busy:
        pytest.fail(f"ports {busy} are in use (another stack): set IEX_PORT_OFFSET or stop it")
    state = Path(tempfile.mkdtemp(prefix="fuzz-", dir=os.environ.get("IEX_STATE_DIR") or None))
    saved = dict(os.environ)
    os.environ["IEX_STATE_DIR"] = str(state)
    stack = servers.Stack(servers=names, kafka_storage="memory", echo=print)
    try:
        stack.up()
        env = stack.env()
        store = ObjectStore(env["IEX_S3_ENDPOINT"], env["IEX_S3_ACCESS_KEY"], env["IEX_S3_SECRET_KEY"])
        store.ensure_bucket(BUCKET)
        upload_target(store, BUCKET, "targets/fuzz", ("red circle",), n_train=2, n_eval=1)
        yield env, state
    finally:
        try:
            stack.down()
        finally:
            os.environ.clear()
            os.environ.update(saved)
            shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def running(fuzz_stack):
    env, state = fuzz_stack
    token = secrets.token_urlsafe(24)
    corpus = state / "corpus"
    synthetic.make_corpus(corpus, per_concept=1)
    started: dict[str, Running] = {}
    try:
        # Search first: the crawler's 'local' backend is pointed at its HTTP port.
        for name in ("search", *[n for n in PROTOS if n != "search"]):
            cls = _service_class(name)
            # Requests only: no consumer, so the fuzzed calls are all that reaches the service.
            quiet = type(f"Fuzzed{cls.__name__}", (cls,), {"handlers": lambda self: {}})
            grpc_port = endpoints.free_listen_port()
            values = {
                **env,
                "IEX_GRPC_PORT": str(grpc_port),
                "IEX_METRICS_PORT": str(endpoints.free_listen_port()),
                "IEX_AUTH_REQUIRED": "true",
                "IEX_AUTH_TOKENS": f"fuzzer:{token}",
                "IEX_MODEL_REPOSITORY": str(state / "models"),
                "IEX_TRITON_GRPC_URL": f"{endpoints.LOOPBACK}:{endpoints.free_listen_port()}",  # nothing listens: Triton is away
                "IEX_SEARCH_CORPUS_DIR": str(corpus),
                "IEX_SEARCH_HTTP_PORT": "0",
                "IEX_PLANNER_ADDRESS": f"{endpoints.LOOPBACK}:{endpoints.free_listen_port()}",
                "IEX_LOG_LEVEL": "WARNING",
                "IEX_CRAWLER_ALLOW_NETWORKS": "127.0.0.0/8",  # the offline web serves on loopback
            }
            if "search" in started:
                values["IEX_CRAWLER_LOCAL_SEARCH_URL"] = f"http://{endpoints.LOOPBACK}:{started['search'].service.http.port}"
            service = quiet(load_service_settings(cls.settings_class, name, environ=values))
            service.start()
            started[name] = Running(service, f"{endpoints.LOOPBACK}:{grpc_port}")
        client = security.ClientSettings(auth_token=token)
        planner = planner_pb2_grpc.PlannerServiceStub(security.client_channel(started["planner"].address, client))
        for exploration_id in (KNOWN, "fuzz-cancel-me"):
            planner.CreateExploration(planner_pb2.CreateExplorationRequest(spec=SPEC, exploration_id=exploration_id), timeout=30)
        yield started, client
    finally:
        for run in started.values():
            run.service.stop()
        for method, answers in sorted(ANSWERS.items()):
            print(f"fuzzed {method}: {dict(answers)}")


def _call(channel: grpc.Channel, service, method, request_bytes: bytes) -> tuple[grpc.StatusCode, str]:
    path = f"/{service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            for _ in stream(request_bytes, timeout=3):
                pass
        else:
            channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)(request_bytes, timeout=20)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


@pytest.mark.parametrize("name, service, method", list(_methods()))
def test_every_request_gets_a_deliberate_answer(running, name, service, method):
    started, client = running
    channel = security.client_channel(started[name].address, client)
    allowed = DELIBERATE | ({grpc.StatusCode.DEADLINE_EXCEEDED} if method.server_streaming else set())

    @settings(max_examples=int(os.environ.get("IEX_FUZZ_GRPC_EXAMPLES", "30")))
    @given(_requests(method))
    def check(request):
        code, details = _call(channel, service, method, request.SerializeToString())
        event(code.name)
        ANSWERS.setdefault(method.full_name, Counter())[code.name] += 1
        assert code in allowed, f"{method.full_name} answered {code.name}: {details[:300]}"
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert FIELD_PREFIX.match(details), f"{method.full_name}: INVALID_ARGUMENT does not name the field: {details[:200]!r}"

    try:
        check()
    finally:
        channel.close()


@pytest.mark.parametrize("name, service, method", list(_methods()))
def test_bytes_that_are_no_protobuf_leave_the_server_serving(running, name, service, method):
    started, client = running
    channel = security.client_channel(started[name].address, client)

    @settings(max_examples=10)
    @given(st.binary(min_size=1, max_size=512))
    def check(garbage):
        code, details = _call(channel, service, method, garbage)
        # Unparseable input is refused by the gRPC runtime itself (INTERNAL, "deserializing");
        # bytes that happen to parse are an ordinary request and must be answered deliberately.
        assert code in DELIBERATE | {grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}, f"{code.name}: {details[:200]}"
        if code == grpc.StatusCode.INTERNAL:
            assert "deserializ" in details.lower(), f"INTERNAL not from deserialization: {details[:200]}"
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)

    try:
        check()
    finally:
        channel.close()


def test_oversized_requests_are_refused(running):
    started, client = running
    channel = security.client_channel(started["planner"].address, client)
    try:
        spec = planner_pb2.ExplorationSpec(target_uri=f"s3://{BUCKET}/targets/fuzz", display_name="x" * (65 * 1024 * 1024))
        with pytest.raises(grpc.RpcError) as info:
            planner_pb2_grpc.PlannerServiceStub(channel).CreateExploration(planner_pb2.CreateExplorationRequest(spec=spec), timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # and the server is fine afterwards
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()


# ---- Kafka handlers --------------------------------------------------------------------------------

QUERY = f"{KNOWN}-i1-q0"
MODEL = common_pb2.ModelRef(name="enc_fuzz_known", version=2)
EVENT_TEMPLATES = {
    topics.EXPLORATIONS.name: events_pb2.ExplorationCreated(
        exploration_id="fuzz-event", target_uri=f"s3://{BUCKET}/targets/fuzz", init="random", backbone="mobilenetv3_small_050", image_size=32, seed=1
    ),
    topics.QUERIES.name: events_pb2.QueryIssued(
        query_id=QUERY, exploration_id=KNOWN, iteration=1, concept="red circle", text="red circle", num_results=2, search_backend="local"
    ),
    topics.IMAGES_FETCHED.name: events_pb2.ImageFetched(
        exploration_id=KNOWN, iteration=1, query_id=QUERY, concept="red circle", url="http://example.org/a.png",
        staging_key=content_key("staging", SHA), raw_sha256=SHA, content_type="image/png", width=64, height=64, size_bytes=100,
    ),
    topics.QUERIES_CRAWLED.name: events_pb2.QueryCrawled(query_id=QUERY, exploration_id=KNOWN, iteration=1, results_returned=2, images_fetched=2),
    topics.DECISIONS.name: events_pb2.ImageDecision(
        exploration_id=KNOWN, iteration=1, query_id=QUERY, url="http://example.org/a.png", raw_sha256=SHA, pixel_sha256=SHA,
        kind=common_pb2.DECISION_KIND_UNIQUE, object_key=content_key("images", SHA),
    ),
    topics.IMAGES_SCORED.name: events_pb2.ImageScored(
        exploration_id=KNOWN, iteration=1, query_id=QUERY, pixel_sha256=SHA, object_key=content_key("images", SHA), reward=0.5,
        model=MODEL, raw_sha256=SHA, url="http://example.org/a.png", decision=common_pb2.DECISION_KIND_UNIQUE,
    ),
    topics.MODELS_SERVING.name: events_pb2.ModelServing(exploration_id=KNOWN, model=MODEL, target_bank_size=2),
    topics.MODEL_LOAD_FAILED.name: events_pb2.ModelLoadFailed(exploration_id=KNOWN, model=MODEL, reason="fuzz"),
    topics.MODELS.name: events_pb2.ModelPublished(
        exploration_id=KNOWN, model=MODEL, iteration=1, checkpoint_key=f"checkpoints/{KNOWN}/v2.pt", embedding_dim=8, image_size=32
    ),
    topics.EVALUATIONS.name: events_pb2.EvaluationFinished(exploration_id=KNOWN, iteration=1, model=MODEL, knn_top1=0.5),
    topics.ITERATIONS.name: events_pb2.IterationFinished(exploration_id=KNOWN, iteration=1, manifest_key=f"explorations/{KNOWN}/iterations/1/manifest.json"),
}
# Handlers whose valid events start real work measured in seconds of CPU (building an encoder):
# fuzzed with hostile messages only, which they must refuse before starting it.
EXPENSIVE = {("trainer", topics.EXPLORATIONS.name)}
# Dependencies that are really away in this setup.
AWAY = {"scorer": "triton"}


@pytest.mark.parametrize("name", [n for n in PROTOS if n != "search"])  # search consumes nothing
def test_every_handler_refuses_hostile_events_without_stalling(running, name):
    started, _client = running
    service = started[name].service
    # The service's own table (the class under the fuzzing subclass), not the override that
    # keeps its consumer off.
    table = type(service).__mro__[1].handlers(service)
    assert table, f"{name} declares no handlers"
    for topic, handler in table.items():
        _fuzz_handler(service, name, topic, handler)


def _forget_buffered(service) -> None:
    """What the consumer does with a record it gave up on: the next example starts clean.

    Only the scorer buffers decisions between the handler and the commit."""
    for attribute in ("_pending", "_pending_ids"):
        buffered = getattr(service, attribute, None)
        if buffered is not None:
            buffered.clear()


def _fuzz_handler(service, name: str, topic: str, handler) -> None:
    message_type = topics.BY_NAME[topic].message
    template = EVENT_TEMPLATES.get(topic)
    strategy = messages(message_type.DESCRIPTOR)
    if template is not None and (name, topic) not in EXPENSIVE:
        strategy = st.one_of(strategy, near(template), near(template))
    outcomes: Counter = Counter()

    @settings(max_examples=int(os.environ.get("IEX_FUZZ_EVENT_EXAMPLES", "15")), deadline=None)
    @given(strategy)
    def check(event):
        context = EventContext(topic=topic, partition=0, offset=0, key="fuzz", headers={}, timestamp_ms=0)
        try:
            handler(event, context)
            # As the consumer loop does before committing the record: the service's own durability step.
            service.before_commit()
            outcomes["handled"] += 1
        except PermanentError as exc:
            outcomes[f"dead-lettered: {exc.reason}"] += 1
        except DependencyUnavailable as exc:
            away = AWAY.get(name)
            assert away and away in str(exc).lower(), f"poison pill: {name} would retry this {topic} event forever: {exc}\n{event}"
            outcomes[f"waits for {away}"] += 1
        finally:
            _forget_buffered(service)

    try:
        check()
    finally:
        ANSWERS[f"{name} <- {topic}"] = outcomes
