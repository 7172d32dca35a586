"""What `iex` shows: explorations, status lines, concept rows, and the live watch.

Shared by the commands (main: explore ...; mainjob: run; demo), which import it; it imports none
of them.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import grpc
from google.protobuf.json_format import MessageToDict

from iex.v1 import common_pb2, planner_pb2


def to_json(message, indent: int | None = 2) -> str:
    return json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=indent, sort_keys=True)


def show(message, as_json: bool) -> None:
    print(to_json(message) if as_json else describe(message))


def state_name(value: int) -> str:
    return common_pb2.ExplorationState.Name(value).removeprefix("EXPLORATION_STATE_").lower()


def phase_name(value: int) -> str:
    return common_pb2.IterationPhase.Name(value).removeprefix("ITERATION_PHASE_").lower()


def describe(message) -> str:
    if isinstance(message, planner_pb2.Exploration):
        e = message
        c = e.counts
        lines = [
            f"exploration {e.exploration_id} [{state_name(e.state)}] iteration {e.current_iteration}/{e.spec.iterations}, "
            f"{e.iterations_finished} finished, model {e.serving_model.name or '-'} v{e.serving_model.version}",
            f"  queries {c.queries_issued} issued / {c.queries_crawled} crawled; images {c.images_fetched} fetched, "
            f"{c.images_unique} stored, {c.images_duplicate} duplicates, {c.images_contaminating} contaminating, "
            f"{c.images_invalid} invalid, {c.images_refused} refused, {c.images_scored} scored",
        ]
        for it in e.iterations:
            lines.append(
                f"  iteration {it.iteration} [{phase_name(it.phase)}]: {it.counts.images_scored} scored, mean concept reward "
                f"{it.mean_concept_reward:.3f} (max {it.max_concept_reward:.3f}), scored with v{it.scored_with.version}, "
                f"trained v{it.trained_model.version}"
                + (f", k-NN {it.knn_top1:.3f}, linear probe {it.linear_probe_top1:.3f} on {it.eval_images} images" if it.eval_images else "")
            )
        before = e.initial_evaluation
        if before.eval_images:
            lines.append(
                f"  initial encoder v{before.model.version}: k-NN {before.knn_top1:.3f}, linear probe {before.linear_probe_top1:.3f} on {before.eval_images} images"
            )
        if e.error:
            lines.append(f"  error: {e.error}")
        return "\n".join(lines)
    return str(message)


def list_line(e: planner_pb2.Exploration) -> str:
    return f"{e.exploration_id}  {state_name(e.state):10s} iteration {e.current_iteration}/{e.spec.iterations}  {e.spec.target_uri}"


def status_line(e: planner_pb2.Exploration) -> str:
    c = e.counts
    it = e.iterations[-1] if e.iterations else None
    phase = phase_name(it.phase) if it else "-"
    return (
        f"{state_name(e.state):9s} iteration {e.current_iteration}/{e.spec.iterations} ({phase}) "
        f"queries {c.queries_crawled}/{c.queries_issued} fetched {c.images_fetched} stored {c.images_unique} "
        f"dup {c.images_duplicate} refused {c.images_refused} scored {c.images_scored} model v{e.serving_model.version}"
        + (f" - {e.detail}" if e.detail else "")
    )


# --------------------------------------------------------------------------------------------
# Concepts (TopConcepts)


def observed_reward(c: planner_pb2.ConceptScore) -> float | None:
    """The mean observed reward, None while no query of the concept has completed."""
    return float(c.observed_reward) if c.HasField("observed_reward") else None


def observed_text(c: planner_pb2.ConceptScore) -> str:
    """The observed reward, or why there is none: never queried, or queried and not observed yet."""
    value = observed_reward(c)
    if value is not None:
        return f"observed {value:.3f}"
    return "never queried" if c.times_queried == 0 else "not observed yet"


def concept_line(c: planner_pb2.ConceptScore) -> str:
    return (
        f"{c.concept:40s} p={c.sampling_probability:.4f} predicted={c.predicted_reward:.3f}±{c.uncertainty:.3f} "
        f"{observed_text(c)}" + (f", queried {c.times_queried}x" if c.times_queried else "")
    )


# --------------------------------------------------------------------------------------------
# Watching


class Progress:
    """Live status with rich on a terminal: one bar for the iterations, one for the current
    iteration's queries; plain timestamped lines when the output is not a terminal."""

    def __init__(self) -> None:
        self.progress = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self.progress = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
            self.iterations = self.progress.add_task("iterations", total=1, info="")
            self.queries = self.progress.add_task("queries", total=1, info="")
        self.last_line = ""
        self.last_key: tuple = ()
        self.last_print = 0.0

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, e: planner_pb2.Exploration) -> None:
        if self.progress is None:
            # A line when the state, iteration or phase changes, else at most one every 10 s.
            line = status_line(e)
            key = (e.state, e.current_iteration, tuple(it.phase for it in e.iterations), e.detail)
            if line != self.last_line and (key != self.last_key or time.monotonic() - self.last_print >= 10.0):
                print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
                self.last_line, self.last_key, self.last_print = line, key, time.monotonic()
            return
        c = e.counts
        it = e.iterations[-1] if e.iterations else None
        self.progress.update(self.iterations, total=max(1, e.spec.iterations), completed=e.iterations_finished, info=f"[{state_name(e.state)}] {e.detail}")
        if it is not None:
            ic = it.counts
            self.progress.update(
                self.queries,
                description=f"iteration {it.iteration} {phase_name(it.phase)}",
                total=max(1, e.spec.queries_per_iteration),
                completed=ic.queries_crawled,
                info=f"fetched {ic.images_fetched} stored {ic.images_unique} dup {ic.images_duplicate} scored {ic.images_scored} | total stored {c.images_unique}",
            )


def watch(stub, exploration_id: str, as_json: bool, timeout_s: float | None = None) -> planner_pb2.Exploration | None:
    """Streams WatchExploration until the exploration ends or `timeout_s` passes; the last state seen."""
    last = None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    stream = stub.WatchExploration(planner_pb2.WatchExplorationRequest(exploration_id=exploration_id), timeout=timeout_s)
    try:
        with Progress() if not as_json else contextlib.nullcontext() as progress:
            for update in stream:
                last = update.exploration
                if as_json:
                    print(to_json(last, indent=None), flush=True)
                else:
                    progress.update(last)
                if deadline is not None and time.monotonic() > deadline:
                    break
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    return last
