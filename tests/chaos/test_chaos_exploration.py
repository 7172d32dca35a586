"""Chaos: one exploration (4 iterations x 8 queries x 8 images) while every part of the system is broken in turn.

Faults, each at a point of the loop where it hurts (see FAULTS): kill -9 of every service followed
by a restart; a kill -9 of the broker (tansu keeping its log in S3) and a restart; S3 frozen for
30 s (SIGSTOP of the SeaweedFS process group: a hung server, not a refused connection, so every
client needs a timeout); Triton killed while the trainer finishes a new model version, restarted
once the version is published (it comes back empty, in explicit model control).

After each fault: the process came back to SERVING on its own, nothing was dead-lettered, every
image dedup accepted so far is in S3, the exploration did not fail. At the end, from the broker,
the object store and the planner: every iteration finished, every accepted image is stored exactly
once and scored for every decision that credits it (per model version, redeliveries counted), no
consumer group has lag, no dead letters. The stack runs with TLS, mTLS and tokens, so the suite
also checks that a mutating RPC without a token is refused and that no secret reached a log or a
metric. docs/reliability.md's table is rendered from this run (render_report).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import grpc
import pytest
from chaos_harness import (
    Check,
    FaultRecord,
    Ledger,
    build_ledger,
    continue_group,
    dead_letters,
    decoded,
    group_lag,
    health,
    metric_sum,
    metrics_text,
    read_topics,
    stop_group,
    wait_serving,
    write_json,
)

from iex.v1 import common_pb2, events_pb2, planner_pb2, planner_pb2_grpc
from services.cli.demo import upload_target
from services.common import endpoints, security, topics
from services.common.objectstore import ObjectStore, content_key
from services.dedup.hashing import pixel_sha256
from services.search import synthetic
from services.stack import servers
from services.stack.process import pid_alive

# The whole run happens in the module fixture's setup, which pytest-timeout counts against the first test.
pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
BUCKET = "iex"
EXPLORATION = "chaos-1"
# Faults land in iterations 1-4, each iteration held (paused at its end) until its faults ran, however
# fast the machine. Triton's has iteration 4 to itself: it must meet the training phase, which a
# fault recovering before it in the same iteration can outlast. The fifth runs after the last fault.
ITERATIONS, QUERIES, IMAGES_PER_QUERY = 5, 8, 8
S3_OUTAGE_S = 30.0
TRITON_EXTRA_DOWN_S = 8.0  # after the new version is published, so the scorer's loads meet a dead Triton
RESTART_TIMEOUT_S = 150.0
TRITON_RESUME_S = 45.0  # Triton restart + loading two versions on a busy CPU; the backoff bug took 68 s more
COLLECTING, TRAINING, FINISHED = common_pb2.ITERATION_PHASE_COLLECTING, common_pb2.ITERATION_PHASE_TRAINING, common_pb2.ITERATION_PHASE_FINISHED
PHASE_ORDER = {COLLECTING: 0, TRAINING: 1, FINISHED: 2}
TERMINAL = {common_pb2.EXPLORATION_STATE_SUCCEEDED, common_pb2.EXPLORATION_STATE_FAILED, common_pb2.EXPLORATION_STATE_CANCELLED}
CONSUMER_GROUPS = ("planner", "crawler", "dedup", "scorer", "trainer")  # search consumes nothing


@dataclass(frozen=True)
class Fault:
    name: str
    action: str  # kill | broker | s3 | triton
    target: str
    iteration: int
    phase: int

    @property
    def trigger(self) -> str:
        return f"iteration {self.iteration} {phase_name(self.phase)}"


# In each window the fault that most needs the window's traffic goes first; the machine's speed
# decides where the next one lands, and the report says where each one did.
FAULTS = (
    Fault("kill -9 crawler", "kill", "crawler", 1, COLLECTING),  # queries in hand, images half published
    Fault("kill -9 planner", "kill", "planner", 1, COLLECTING),  # counting decisions and scores
    Fault("kill -9 trainer", "kill", "trainer", 1, TRAINING),  # mid-training: the iteration is retrained
    Fault("kill -9 dedup", "kill", "dedup", 2, COLLECTING),  # deciding and storing
    Fault("kill -9 broker, restart (tansu, log in S3)", "broker", "kafka", 2, COLLECTING),  # every client mid-flight
    Fault("kill -9 scorer", "kill", "scorer", 2, TRAINING),  # must load the next version after restart
    Fault("S3 unavailable 30 s (SIGSTOP)", "s3", "s3", 3, COLLECTING),  # also stalls the broker's storage
    Fault("kill -9 search", "kill", "search", 3, COLLECTING),  # the crawler's searches fail meanwhile
    Fault("Triton unavailable, new model published, Triton back", "triton", "triton", 4, TRAINING),
)


def phase_name(phase: int) -> str:
    return common_pb2.IterationPhase.Name(phase).removeprefix("ITERATION_PHASE_").lower()


def position(e: planner_pb2.Exploration) -> tuple[int, int]:
    if e.state in TERMINAL:
        return (ITERATIONS + 1, 0)
    for it in e.iterations:
        if it.iteration == e.current_iteration:
            return (it.iteration, PHASE_ORDER.get(it.phase, 0))
    return (e.current_iteration, 0)


def describe(e: planner_pb2.Exploration | None) -> str:
    if e is None:
        return "planner unreachable"
    state = common_pb2.ExplorationState.Name(e.state).removeprefix("EXPLORATION_STATE_").lower()
    if e.state in TERMINAL:
        return state
    current = next((it for it in e.iterations if it.iteration == e.current_iteration), None)
    if current is None:
        return f"{state}, waiting for the initial encoder"
    c = current.counts
    return f"iteration {current.iteration} {phase_name(current.phase)} ({c.queries_crawled}/{c.queries_issued} queries crawled, {c.images_fetched} fetched, {c.images_scored} scored)"


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class ChaosRun:
    faults: list[FaultRecord] = field(default_factory=list)
    invariants: list[Check] = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    per_iteration: dict = field(default_factory=dict)
    exploration: dict = field(default_factory=dict)
    started_at: str = ""
    wall_s: float = 0.0
    error: str = ""

    def note(self, name: str, passed: bool, detail: str = "") -> bool:
        self.invariants = [c for c in self.invariants if c.name != name]
        self.invariants.append(Check(name, bool(passed), detail))
        return bool(passed)

    def invariant(self, name: str) -> Check:
        for check in self.invariants:
            if check.name == name:
                return check
        raise AssertionError(f"invariant {name!r} was not evaluated (the run stopped early: {self.error or 'see the log'})")


class Driver:
    """Drives the exploration and the faults; everything it observes goes into `run`."""

    def __init__(self, chaos, run: ChaosRun) -> None:
        self.chaos = chaos
        self.stack: servers.Stack = chaos.stack
        self.run = run
        self.bootstrap = chaos.env["IEX_KAFKA_BOOTSTRAP"]
        self.store = ObjectStore(chaos.env["IEX_S3_ENDPOINT"], chaos.env["IEX_S3_ACCESS_KEY"], chaos.env["IEX_S3_SECRET_KEY"])
        self._planner = None

    # ---- the planner, whichever process currently serves it --------------------------------------
    def planner(self) -> planner_pb2_grpc.PlannerServiceStub:
        if self._planner is None:
            self._planner = planner_pb2_grpc.PlannerServiceStub(security.client_channel(self.chaos.address("planner"), self.chaos.client))
        return self._planner

    def exploration(self) -> planner_pb2.Exploration | None:
        try:
            return self.planner().GetExploration(planner_pb2.GetExplorationRequest(exploration_id=EXPLORATION), timeout=5).exploration
        except grpc.RpcError:
            return None

    def wait_exploration(self, done: Callable[[planner_pb2.Exploration], bool], timeout_s: float) -> planner_pb2.Exploration | None:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            e = self.exploration()
            if e is not None:
                last = e
                if done(e):
                    return e
            time.sleep(0.3)  # collecting windows last seconds: a fault must not miss them by polling
        return last

    # ---- start -----------------------------------------------------------------------------------
    def create(self) -> None:
        self.store.ensure_bucket(BUCKET)
        target = upload_target(self.store, BUCKET, "targets/chaos", ("red circle", "orange circle"), n_train=8, n_eval=3)
        spec = planner_pb2.ExplorationSpec(
            target_uri=target,
            mode=common_pb2.EXPLORATION_MODE_RANDOM,
            concepts=list(synthetic.CONCEPTS),
            iterations=ITERATIONS,
            queries_per_iteration=QUERIES,
            images_per_query=IMAGES_PER_QUERY,
            seed=11,
            # Far beyond the run: an iteration cut short by its deadline would hide lost work.
            iteration_deadline_seconds=1800,
        )
        self.planner().CreateExploration(planner_pb2.CreateExplorationRequest(spec=spec, exploration_id=EXPLORATION), timeout=30)

    # ---- faults ------------------------------------------------------------------------------------
    def inject_all(self) -> None:
        held = 0
        for index, fault in enumerate(FAULTS):
            record = FaultRecord(fault.name, fault.action, fault.trigger)
            self.run.faults.append(record)
            wanted = (fault.iteration, PHASE_ORDER[fault.phase])
            e = self.wait_exploration(lambda x: position(x) >= wanted, timeout_s=420)
            if fault.iteration != held and e is not None and e.state not in TERMINAL:
                # On a fast machine a whole iteration can pass while one fault recovers, and the
                # last iteration's faults would then meet a finished exploration. A pause holds the
                # loop at this iteration's end (collecting and training go on) until its faults ran.
                held = fault.iteration
                self.set_paused(True)
            record.injected_during = describe(e)
            record.iteration = fault.iteration
            in_time = e is not None and e.state not in TERMINAL and position(e) >= wanted
            record.check("injected while the exploration ran", in_time, record.injected_during)
            if not in_time:
                continue
            print(f"[chaos] {fault.name} during {record.injected_during}", flush=True)
            try:
                getattr(self, f"_{fault.action}")(fault, record)
            except Exception as exc:  # noqa: BLE001 - a broken injector is a failed fault, the run goes on
                record.check("fault injected and recovered", False, f"{type(exc).__name__}: {str(exc)[:300]}")
            self.after_fault(record)
            print(f"[chaos] {fault.name}: {'ok' if record.passed else 'FAILED'} {[(c.name, c.passed) for c in record.checks]}", flush=True)
            if held and (index + 1 == len(FAULTS) or FAULTS[index + 1].iteration != held):
                self.set_paused(False)
                held = 0

    def set_paused(self, paused: bool) -> None:
        """Pause or resume through the planner's API, retried while a fault has it restarting."""
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while True:
            try:
                if paused:
                    self.planner().PauseExploration(planner_pb2.PauseExplorationRequest(exploration_id=EXPLORATION), timeout=30)
                else:
                    self.planner().ResumeExploration(planner_pb2.ResumeExplorationRequest(exploration_id=EXPLORATION), timeout=30)
                print(f"[chaos] exploration {'paused' if paused else 'resumed'}", flush=True)
                return
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    print(f"[chaos] could not {'pause' if paused else 'resume'}: {exc.details()}", flush=True)
                    return  # already finished: the fault's own checks say it came too late
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def _all_serving(self, timeout_s: float) -> tuple[bool, dict[str, str]]:
        deadline = time.monotonic() + timeout_s
        while True:
            states = {name: health(self.chaos.address(name), self.chaos.client) for name in servers.SERVICE_NAMES}
            if all(s == "SERVING" for s in states.values()) or time.monotonic() > deadline:
                return all(s == "SERVING" for s in states.values()), states
            time.sleep(1.0)

    def _kill(self, fault: Fault, record: FaultRecord) -> None:
        proc = self.stack.process(fault.target)
        pid = proc.pid()
        proc.kill()
        record.check("process killed (SIGKILL)", pid is not None and not pid_alive(pid), f"pid {pid}")
        began = time.monotonic()
        self.stack.start_one(fault.target)
        serving = wait_serving(self.chaos.address(fault.target), self.chaos.client, RESTART_TIMEOUT_S)
        record.recovered_s = round(time.monotonic() - began, 1)
        record.check("restarted to SERVING, no manual cleanup", serving is not None, f"{record.recovered_s}s")

    def _broker(self, fault: Fault, record: FaultRecord) -> None:
        proc = self.stack.process("kafka")
        pid = proc.pid()
        proc.kill()
        record.check("broker killed (SIGKILL)", pid is not None and not pid_alive(pid), f"pid {pid}")
        began = time.monotonic()
        self.stack.start_one("kafka")
        ok, states = self._all_serving(RESTART_TIMEOUT_S)
        record.recovered_s = round(time.monotonic() - began, 1)
        record.check("every service reconnected (SERVING)", ok, str(states) if not ok else f"{record.recovered_s}s")

    def _s3(self, fault: Fault, record: FaultRecord) -> None:
        pid = self.stack.process("s3").pid()
        assert pid is not None, "s3 is not running"
        noticed: set[str] = set()
        began = time.monotonic()
        stop_group(pid)
        try:
            while time.monotonic() - began < S3_OUTAGE_S:
                for name in servers.SERVICE_NAMES:
                    if health(self.chaos.address(name), self.chaos.client, timeout_s=2) != "SERVING":
                        noticed.add(name)
                time.sleep(2.0)
        finally:
            continue_group(pid)
        record.outage_s = round(time.monotonic() - began, 1)
        record.check("readiness showed the outage", bool(noticed), f"NOT_SERVING: {sorted(noticed)}")
        back = time.monotonic()
        while not servers.s3_ready() and time.monotonic() - back < 60:
            time.sleep(0.5)
        ok, states = self._all_serving(RESTART_TIMEOUT_S)
        record.recovered_s = round(time.monotonic() - back, 1)
        record.check("every service SERVING again", ok, str(states) if not ok else f"{record.recovered_s}s after S3 returned")

    def _triton(self, fault: Fault, record: FaultRecord) -> None:
        new_version = fault.iteration + 1

        def published(e: planner_pb2.Exploration) -> bool:
            return any(it.iteration == fault.iteration and it.trained_model.version >= new_version for it in e.iterations) or e.state in TERMINAL

        proc = self.stack.process("triton")
        pid = proc.pid()
        proc.kill()
        record.check("Triton killed (SIGKILL)", pid is not None and not pid_alive(pid), f"pid {pid}")
        before = self.exploration()
        # Killed after the version was out, the fault would test nothing: that is a failure, not a pass.
        record.check(f"killed before v{new_version} was published", before is not None and not published(before), describe(before))
        began = time.monotonic()
        e = self.wait_exploration(published, timeout_s=420)
        record.check(f"v{new_version} published while Triton was down", e is not None and published(e) and e.state not in TERMINAL, describe(e))
        time.sleep(TRITON_EXTRA_DOWN_S)
        record.outage_s = round(time.monotonic() - began, 1)
        back = time.monotonic()
        self.stack.start_one("triton")
        e = self.wait_exploration(lambda x: x.serving_model.version >= new_version or x.state in TERMINAL, timeout_s=300)
        record.recovered_s = round(time.monotonic() - back, 1)
        serving = e.serving_model.version if e is not None else 0
        record.check(f"v{new_version} loaded and served after Triton returned", serving >= new_version, f"serving v{serving} after {record.recovered_s}s")
        # A ready Triton must be used at once, not after the client's reconnect backoff ran out.
        record.check("the scorer used the restarted Triton promptly", record.recovered_s <= TRITON_RESUME_S, f"{record.recovered_s}s (limit {TRITON_RESUME_S:.0f}s)")
        failed = decoded(read_topics(self.bootstrap, [topics.MODEL_LOAD_FAILED.name])[topics.MODEL_LOAD_FAILED.name], events_pb2.ModelLoadFailed)
        mine = [f for f in failed if f.exploration_id == EXPLORATION]
        record.check("the outage was not reported as a broken model", not mine, "; ".join(f"v{f.model.version}: {f.reason[:80]}" for f in mine))

    def after_fault(self, record: FaultRecord) -> None:
        letters = dead_letters(self.bootstrap)
        record.check("nothing dead-lettered", not letters, "; ".join(sorted({f"{d.topic}: {d.reason}" for d in letters}))[:300])
        decisions = decoded(read_topics(self.bootstrap, [topics.DECISIONS.name])[topics.DECISIONS.name], events_pb2.ImageDecision)
        accepted = {d.pixel_sha256 for d in decisions if d.exploration_id == EXPLORATION and d.kind == common_pb2.DECISION_KIND_UNIQUE}
        missing = [sha for sha in accepted if not self.store.exists(BUCKET, content_key("images", sha))]
        record.check("every image accepted so far is in S3", not missing, f"{len(accepted)} accepted, {len(missing)} missing")
        e = self.exploration()
        record.check(
            "exploration still alive",
            e is not None and e.state not in (common_pb2.EXPLORATION_STATE_FAILED, common_pb2.EXPLORATION_STATE_CANCELLED),
            describe(e),
        )

    # ---- the end -------------------------------------------------------------------------------------
    def finish(self) -> None:
        run = self.run
        e = self.wait_exploration(lambda x: x.state in TERMINAL, timeout_s=600)
        run.exploration = {
            "state": common_pb2.ExplorationState.Name(e.state) if e else "unknown",
            "iterations_finished": e.iterations_finished if e else 0,
            "serving_version": e.serving_model.version if e else 0,
            "counts": {f.name: getattr(e.counts, f.name) for f in common_pb2.ImageCounts.DESCRIPTOR.fields} if e else {},
            "queries_incomplete": {it.iteration: it.queries_incomplete for it in e.iterations} if e else {},
        }
        finished = e is not None and e.state == common_pb2.EXPLORATION_STATE_SUCCEEDED and e.iterations_finished == ITERATIONS
        incomplete = sum(it.queries_incomplete for it in e.iterations) if e else -1
        run.note(
            "the exploration finished its iterations",
            finished and incomplete == 0,
            f"{describe(e)}, {e.iterations_finished if e else 0}/{ITERATIONS} iterations, {incomplete} queries cut by a deadline",
        )
        self.ledgers(e)
        self.lag()
        letters = dead_letters(self.bootstrap)
        run.note("nothing dead-lettered", not letters, "; ".join(sorted({f"{d.topic}: {d.reason} x{d.attempts}" for d in letters})) or "0 dead letters on 13 .dlq topics")
        ok, states = self._all_serving(60)
        alive = {name: self.stack.process(name).pid() for name in (*servers.SERVICE_NAMES, "kafka", "s3", "triton")}
        run.note(
            "no service needed manual cleanup",
            ok and all(alive.values()),
            "every process restarted by the stack alone and SERVING at the end" if ok and all(alive.values()) else f"{states} {alive}",
        )

    def ledgers(self, e: planner_pb2.Exploration | None) -> None:
        run = self.run
        names = [topics.IMAGES_FETCHED.name, topics.DECISIONS.name, topics.IMAGES_STORED.name, topics.IMAGES_SCORED.name]
        records = read_topics(self.bootstrap, names, timeout_s=120)
        fetched = decoded(records[names[0]], events_pb2.ImageFetched)
        decisions = decoded(records[names[1]], events_pb2.ImageDecision)
        stored = decoded(records[names[2]], events_pb2.ImageStored)
        scored = decoded(records[names[3]], events_pb2.ImageScored)
        cache: dict[str, bool] = {}

        def exists(sha: str) -> bool:
            if sha not in cache:
                cache[sha] = self.store.exists(BUCKET, content_key("images", sha))
            return cache[sha]

        total = build_ledger(fetched, decisions, stored, scored, exists, EXPLORATION)
        run.totals = total.as_dict()
        for iteration in range(1, ITERATIONS + 1):
            run.per_iteration[iteration] = build_ledger(fetched, decisions, stored, scored, exists, EXPLORATION, iteration).as_dict()
        for record in run.faults:
            record.ledger = run.per_iteration.get(record.iteration, {})

        # The object store holds exactly the accepted pictures, each under the hash of its pixels.
        keys = sorted(self.store.list_keys(BUCKET, "images/"))
        accepted = {d.pixel_sha256 for d in decisions if d.exploration_id == EXPLORATION and d.kind == common_pb2.DECISION_KIND_UNIQUE}
        by_key = {content_key("images", sha): sha for sha in accepted}
        orphans = [k for k in keys if k not in by_key]
        corrupt = [k for k in keys if k in by_key and pixel_sha256(self.store.get_bytes(BUCKET, k)) != by_key[k]]
        run.note(
            "every image accepted by dedup is stored exactly once",
            total.accepted > 0 and total.stored == total.accepted and not orphans and not corrupt and total.duplicated == 0,
            f"{total.accepted} accepted, {total.stored} stored, {len(keys)} objects under images/, {len(orphans)} not accounted for, "
            f"{len(corrupt)} not matching their key, {total.duplicated} accepted twice or conflicting",
        )
        run.note(
            "every accepted decision is scored once per model version",
            total.to_score > 0 and total.scored == total.to_score,
            f"{total.scored}/{total.to_score} scored ({total.scored_versions}); {total.rescored} extra scores of an already scored decision (harmless: rewards are sets)",
        )
        planner_counts = e.counts if e is not None else None
        consistent = planner_counts is not None and planner_counts.images_scored == total.to_score and planner_counts.images_fetched >= total.fetched
        run.note(
            "the planner's counts agree with the topics",
            consistent,
            f"planner scored {planner_counts.images_scored if planner_counts else '?'} / topics {total.to_score}; "
            f"planner fetched {planner_counts.images_fetched if planner_counts else '?'} / topics {total.fetched}",
        )
        run.note("nothing lost", total.lost == 0 and total.fetched > 0, "; ".join(total.problems) or f"0 lost of {total.fetched} fetched")

    def lag(self) -> None:
        deadline = time.monotonic() + 120
        while True:
            lags = {group: group_lag(self.bootstrap, f"iex-{group}") for group in CONSUMER_GROUPS}
            behind = {g: {tp: n for tp, n in lag.items() if n} for g, lag in lags.items()}
            reported = {g: metric_sum(metrics_text(endpoints.SERVICE_PORTS[g].metrics), f"iex_{g}_kafka_consumer_lag_messages") for g in CONSUMER_GROUPS}
            clear = not any(behind.values()) and all(lags.values()) and not any(reported.values())
            if clear or time.monotonic() > deadline:
                break
            time.sleep(3)
        self.run.note(
            "no consumer is stuck (lag returns to zero)",
            clear,
            f"committed = high-water on {sum(len(v) for v in lags.values())} partitions of 5 groups; services report lag {sum(reported.values()):g}"
            if clear
            else f"behind: {behind}; groups without commits: {[g for g, v in lags.items() if not v]}; reported: {reported}",
        )


@pytest.fixture(scope="module")
def chaos_run(chaos_stack):
    run = ChaosRun(started_at=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    began = time.monotonic()
    driver = Driver(chaos_stack, run)
    try:
        driver.create()
        driver.inject_all()
        driver.finish()
    except Exception as exc:  # noqa: BLE001 - recorded in the report; the tests below fail on what is missing
        run.error = f"{type(exc).__name__}: {str(exc)[:500]}"
        print(f"[chaos] run stopped: {run.error}", flush=True)
    run.wall_s = round(time.monotonic() - began, 1)
    yield run
    render_report(run)


# --------------------------------------------------------------------------------------------
# Tests: each reads what the run recorded


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.target)
def test_fault_is_survived(chaos_run, fault):
    record = next((r for r in chaos_run.faults if r.name == fault.name), None)
    assert record is not None, f"not injected: {chaos_run.error}"
    failed = [f"{c.name}: {c.detail}" for c in record.checks if not c.passed]
    assert record.passed, f"{fault.name} during {record.injected_during}: {failed}"


@pytest.mark.parametrize(
    "name",
    [
        "the exploration finished its iterations",
        "every image accepted by dedup is stored exactly once",
        "every accepted decision is scored once per model version",
        "nothing lost",
        "the planner's counts agree with the topics",
        "no consumer is stuck (lag returns to zero)",
        "nothing dead-lettered",
        "no service needed manual cleanup",
    ],
)
def test_invariant(chaos_run, name):
    check = chaos_run.invariant(name)
    assert check.passed, f"{name}: {check.detail}"


def test_mutating_rpcs_refuse_callers_without_a_token(chaos_run, chaos_stack):
    """On the live planner: no token, a wrong token -> UNAUTHENTICATED; the operator's token -> OK."""
    address = chaos_stack.address("planner")
    anonymous = planner_pb2_grpc.PlannerServiceStub(security.client_channel(address, chaos_stack.anonymous))
    wrong = planner_pb2_grpc.PlannerServiceStub(
        security.client_channel(address, security.ClientSettings(**{**asdict(chaos_stack.anonymous), "auth_token": "x" * 32}))
    )
    operator = planner_pb2_grpc.PlannerServiceStub(security.client_channel(address, chaos_stack.client))
    spec = planner_pb2.ExplorationSpec(
        target_uri=f"s3://{BUCKET}/targets/chaos", mode=common_pb2.EXPLORATION_MODE_RANDOM, concepts=["red circle"], iterations=1, queries_per_iteration=1, images_per_query=1
    )
    create = planner_pb2.CreateExplorationRequest(spec=spec, exploration_id="auth-probe")
    outcomes = {}

    def code(call) -> str:
        try:
            call()
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name

    outcomes["Create, no token"] = code(lambda: anonymous.CreateExploration(create, timeout=10))
    outcomes["Create, wrong token"] = code(lambda: wrong.CreateExploration(create, timeout=10))
    outcomes["Create, valid token"] = code(lambda: operator.CreateExploration(create, timeout=30))
    for verb in ("Pause", "Resume", "Cancel"):
        request = getattr(planner_pb2, f"{verb}ExplorationRequest")(exploration_id="auth-probe")
        outcomes[f"{verb}, no token"] = code(lambda: getattr(anonymous, f"{verb}Exploration")(request, timeout=10))
        outcomes[f"{verb}, valid token"] = code(lambda: getattr(operator, f"{verb}Exploration")(request, timeout=30))
    outcomes["Get, no token (reads stay open)"] = code(lambda: anonymous.GetExploration(planner_pb2.GetExplorationRequest(exploration_id="auth-probe"), timeout=10))
    expected = {k: ("UNAUTHENTICATED" if ("no token" in k and "reads" not in k) or "wrong" in k else "OK") for k in outcomes}
    chaos_run.note("mutating planner RPCs need a token", outcomes == expected, ", ".join(f"{k}: {v}" for k, v in outcomes.items()))
    assert outcomes == expected


def test_the_cli_sends_the_token_from_the_environment(chaos_run, chaos_stack):
    """`iex` over TLS + mTLS: refused without IEX_AUTH_TOKEN, through to the servicer with it."""
    import subprocess
    import sys

    base = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "protos")]),
        "IEX_PLANNER_ADDR": chaos_stack.address("planner"),
        "IEX_TLS_CA": chaos_stack.client.tls_ca,
        "IEX_TLS_CERT": chaos_stack.client.tls_cert,
        "IEX_TLS_KEY": chaos_stack.client.tls_key,
    }
    base.pop("IEX_AUTH_TOKEN", None)
    argv = [sys.executable, "-m", "services.cli", "explore", "pause", "no-such-exploration"]
    without = subprocess.run(argv, env=base, cwd=REPO, capture_output=True, text=True, timeout=60)
    with_token = subprocess.run(argv, env={**base, "IEX_AUTH_TOKEN": chaos_stack.token}, cwd=REPO, capture_output=True, text=True, timeout=60)
    ok = "UNAUTHENTICATED" in without.stderr and without.returncode != 0 and "NOT_FOUND" in with_token.stderr
    chaos_run.note(
        "the CLI authenticates with IEX_AUTH_TOKEN",
        ok,
        f"without: {without.stderr.strip()[:120]}; with: {with_token.stderr.strip()[:120]}",
    )
    assert ok, (without.stderr[-500:], with_token.stderr[-500:])
    assert chaos_stack.token not in without.stderr + without.stdout + with_token.stderr + with_token.stdout


def test_transport_is_tls_with_client_certificates(chaos_run, chaos_stack):
    address = chaos_stack.address("planner")
    plaintext = health(address, security.ClientSettings())
    no_client_cert = health(address, security.ClientSettings(tls_ca=chaos_stack.client.tls_ca))
    with_cert = health(address, chaos_stack.anonymous)
    ok = plaintext.startswith("unreachable") and no_client_cert.startswith("unreachable") and with_cert == "SERVING"
    chaos_run.note("gRPC is TLS with required client certificates", ok, f"plaintext: {plaintext}; TLS without client cert: {no_client_cert}; mTLS: {with_cert}")
    assert ok


def test_no_secret_in_logs_or_metrics(chaos_run, chaos_stack):
    """The token and the S3 keys of this run, looked for in every log file and every service's /metrics."""
    logs = sorted((chaos_stack.state / "logs").glob("*.log"))
    sources = {f"log {p.name}": p.read_text(errors="replace") for p in logs}
    for name, ports in endpoints.SERVICE_PORTS.items():
        sources[f"/metrics {name}"] = metrics_text(ports.metrics)
    leaks = [f"{secret} in {where}" for where, text in sources.items() for secret, value in chaos_stack.secrets.items() if value in text]
    service_logs = [p for p in logs if p.stem in endpoints.SERVICE_PORTS]
    # Not vacuous: the services did log their (redacted) settings and the refused calls.
    redacted = sum("<redacted>" in sources[f"log {p.name}"] for p in service_logs)
    refused = "call refused" in sources.get("log planner.log", "")
    detail = f"{len(logs)} logs and {len(endpoints.SERVICE_PORTS)} /metrics pages searched; {redacted} services logged redacted settings"
    chaos_run.note("no secret in logs or metrics", not leaks and redacted == len(service_logs) and refused, "; ".join(leaks) or detail)
    assert not leaks, leaks
    assert redacted == len(service_logs) and refused


# --------------------------------------------------------------------------------------------
# The report in docs/reliability.md


COMMON_CHECKS = ("injected while the exploration ran", "nothing dead-lettered", "every image accepted so far is in S3", "exploration still alive")
BEGIN, END = "<!-- chaos-results:begin (generated by tests/chaos; do not edit) -->", "<!-- chaos-results:end -->"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(data: dict) -> str:
    lines = [
        f"Last run: {data['started_at']}, {data['wall_s']:.0f} s wall time on {data['machine']}; exploration `{EXPLORATION}`: "
        f"{ITERATIONS} iterations x {QUERIES} queries x {IMAGES_PER_QUERY} images, TLS + mTLS + tokens on, Kafka log in S3."
        + (f" **Run stopped early: {_cell(data['error'])}**" if data.get("error") else ""),
        "",
        "| fault injected | during | recovery | checked after it | result | accepted | stored | scored | lost | duplicated | redelivered (harmless) |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for f in data["faults"]:
        ledger = f.get("ledger") or {}
        recovery = "-" if f["recovered_s"] is None else f"{f['recovered_s']:.0f} s" + (f" (outage {f['outage_s']:.0f} s)" if f["outage_s"] else "")
        specific = [c for c in f["checks"] if c["name"] not in COMMON_CHECKS]
        common_ok = all(c["passed"] for c in f["checks"] if c["name"] in COMMON_CHECKS)
        checks = "; ".join(c["name"] + ("" if c["passed"] else f" **FAILED** ({_cell(c['detail'])[:120]})") for c in specific)
        checks += "; common checks" + ("" if common_ok else " **FAILED** (" + "; ".join(_cell(c["name"] + ": " + c["detail"])[:120] for c in f["checks"] if c["name"] in COMMON_CHECKS and not c["passed"]) + ")")
        result = "pass" if f["checks"] and all(c["passed"] for c in f["checks"]) else "**FAIL**"
        counts = [ledger.get(k, "-") for k in ("accepted", "stored", "scored", "lost", "duplicated")]
        redelivered = ", ".join(f"{n} {kind}" for kind, n in (ledger.get("redelivered_by_event") or {}).items() if n) or "0" if ledger else "-"
        lines.append(f"| {_cell(f['name'])} | {_cell(f['injected_during'])} | {recovery} | {checks} | {result} | " + " | ".join(map(str, counts)) + f" | {redelivered} |")
    t = data.get("totals") or {}
    if t:
        lines.append(
            f"| **whole exploration** | iterations 1-{ITERATIONS} | | every invariant below | "
            f"{'pass' if all(c['passed'] for c in data['invariants']) else '**FAIL**'} | {t['accepted']} | {t['stored']} | {t['scored']} | "
            f"{t['lost']} | {t['duplicated']} | " + (", ".join(f"{n} {kind}" for kind, n in t["redelivered_by_event"].items() if n) or "0") + " |"
        )
    lines += [
        "",
        "*Common checks*, after every fault: injected while the exploration ran, nothing dead-lettered, every image accepted so far is "
        "in S3, the exploration still alive. "
        "Counts are for the iteration the fault hit, from the topics and S3: *accepted* = distinct pictures dedup accepted as new, "
        "*stored* = of those, present in S3 under the hash of their pixels, *scored* = accepted decisions (new or crediting a stored "
        "picture) with a score, *lost* = fetched-but-undecided + accepted-but-not-stored + accepted-but-unscored, *duplicated* = pictures "
        "accepted as new twice + decisions with conflicting kinds, *redelivered* = extra copies of events from at-least-once delivery and retries (harmless: every consumer is idempotent), by event type.",
        "",
        "| invariant (end of run) | result | evidence |",
        "|---|---|---|",
    ]
    for c in data["invariants"]:
        lines.append(f"| {_cell(c['name'])} | {'pass' if c['passed'] else '**FAIL**'} | {_cell(c['detail'])} |")
    return "\n".join(lines)


def render_report(run: ChaosRun) -> None:
    data = asdict(run)
    data["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other work)"
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
        data["machine"] = f"{model}, {os.cpu_count()} cores (shared with other work)"
    except (OSError, StopIteration):
        pass
    if os.environ.get("IEX_CHAOS_WRITE_DOCS", "1") == "0":
        print(json.dumps(data, indent=2, default=str))
        return
    write_json(REPO / "docs" / "reliability-last-run.json", data)
    doc = REPO / "docs" / "reliability.md"
    text = doc.read_text() if doc.exists() else f"# Reliability\n\n{BEGIN}\n{END}\n"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        text += f"\n{BEGIN}\n{END}\n"
    text = pattern.sub(lambda _m: f"{BEGIN}\n{render_markdown(data)}\n{END}", text)
    doc.write_text(text)


def test_no_secret_in_process_arguments(chaos_run, chaos_stack):
    """Command lines are readable by every local user (ps, /proc/<pid>/cmdline): secrets go through
    the environment or files, never arguments."""
    leaks = []
    for name in chaos_stack.stack.names:
        pid = chaos_stack.stack.process(name).pid()
        if pid is None:
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        leaks += [f"{secret} in the arguments of {name}" for secret, value in chaos_stack.secrets.items() if value in argv]
    chaos_run.note("no secret in process arguments", not leaks, "; ".join(leaks) or "arguments of every process of the stack searched")
    assert not leaks, leaks
