"""`iex` command line, a thin client of the gRPC APIs.

    iex stack up|down|status|env           the local stack (python -m services.stack)
    iex data fetch [--out DIR] [--force]   build the offline web and the Tux Paint targets
    iex run [--branch food/fruit] ...      the main job: one exploration on the embedded default, report
    iex explore create|list|status|watch|top-concepts|pause|resume|cancel
    iex report <exploration id>            Markdown + PNG plots + report.json
    iex demo                               the quick loop on the generated (synthetic) offline web

`--json` (anywhere on the line) prints machine-readable output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import grpc
from google.protobuf.json_format import MessageToDict

from iex.v1 import common_pb2, planner_pb2
from services.cli.client import Unreachable, planner


def _print(message, as_json: bool) -> None:
    if as_json:
        print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2, sort_keys=True))
    else:
        print(describe(message))


def state_name(value: int) -> str:
    return common_pb2.ExplorationState.Name(value).removeprefix("EXPLORATION_STATE_").lower()


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
            phase = common_pb2.IterationPhase.Name(it.phase).removeprefix("ITERATION_PHASE_").lower()
            lines.append(
                f"  iteration {it.iteration} [{phase}]: {it.counts.images_scored} scored, mean concept reward "
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


def cmd_create(args) -> int:
    spec = planner_pb2.ExplorationSpec(
        display_name=args.name or "",
        target_uri=args.target,
        mode=common_pb2.ExplorationMode.Value(f"EXPLORATION_MODE_{args.mode.upper().replace('-', '_')}"),
        concepts=[c.strip() for c in (args.concepts or "").split(",") if c.strip()],
        labels=[c.strip() for c in (args.labels or "").split(",") if c.strip()],
        seed=args.seed,
        # Set only when given: unset is the planner's default, and a value given must be >= 1.
        **{field: value for field, value in (("iterations", args.iterations), ("queries_per_iteration", args.queries), ("images_per_query", args.images_per_query)) if value is not None},
    )
    response = planner(args.planner).CreateExploration(planner_pb2.CreateExplorationRequest(spec=spec, exploration_id=args.id or ""))
    _print(response.exploration, args.json)
    return 0


def cmd_status(args) -> int:
    response = planner(args.planner).GetExploration(planner_pb2.GetExplorationRequest(exploration_id=args.exploration_id))
    _print(response.exploration, args.json)
    return 0


def cmd_list(args) -> int:
    response = planner(args.planner).ListExplorations(planner_pb2.ListExplorationsRequest(page_size=args.limit))
    if args.json:
        _print(response, True)
    else:
        for e in response.explorations:
            print(f"{e.exploration_id}  {state_name(e.state):10s} iteration {e.current_iteration}/{e.spec.iterations}  {e.spec.target_uri}")
    return 0


def status_line(e: planner_pb2.Exploration) -> str:
    c = e.counts
    it = e.iterations[-1] if e.iterations else None
    phase = common_pb2.IterationPhase.Name(it.phase).removeprefix("ITERATION_PHASE_").lower() if it else "-"
    return (
        f"{state_name(e.state):9s} iteration {e.current_iteration}/{e.spec.iterations} ({phase}) "
        f"queries {c.queries_crawled}/{c.queries_issued} fetched {c.images_fetched} stored {c.images_unique} "
        f"dup {c.images_duplicate} refused {c.images_refused} scored {c.images_scored} model v{e.serving_model.version}"
        + (f" - {e.detail}" if e.detail else "")
    )


class _Progress:
    """Live status with rich on a terminal: one bar for the iterations, one for the current
    iteration's queries; plain timestamped lines when the output is not a terminal."""

    def __init__(self) -> None:
        self.progress = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
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
            phase = common_pb2.IterationPhase.Name(it.phase).removeprefix("ITERATION_PHASE_").lower()
            self.progress.update(
                self.queries,
                description=f"iteration {it.iteration} {phase}",
                total=max(1, e.spec.queries_per_iteration),
                completed=ic.queries_crawled,
                info=f"fetched {ic.images_fetched} stored {ic.images_unique} dup {ic.images_duplicate} scored {ic.images_scored} | total stored {c.images_unique}",
            )


def watch(stub, exploration_id: str, as_json: bool, timeout_s: float | None = None) -> planner_pb2.Exploration:
    last = None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    stream = stub.WatchExploration(planner_pb2.WatchExplorationRequest(exploration_id=exploration_id), timeout=timeout_s)
    try:
        with _Progress() if not as_json else contextlib.nullcontext() as progress:
            for update in stream:
                last = update.exploration
                if as_json:
                    print(json.dumps(MessageToDict(last, preserving_proto_field_name=True), sort_keys=True), flush=True)
                else:
                    progress.update(last)
                if deadline is not None and time.monotonic() > deadline:
                    break
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    return last


def cmd_watch(args) -> int:
    last = watch(planner(args.planner), args.exploration_id, args.json, args.timeout)
    return 0 if last is not None and last.state == common_pb2.EXPLORATION_STATE_SUCCEEDED else 1


def observed_text(c: planner_pb2.ConceptScore) -> str:
    """The observed reward, or why there is none: never queried, or queried and not yet observed."""
    if c.HasField("observed_reward"):
        return f"observed={c.observed_reward:.3f}"
    return "never queried" if c.times_queried == 0 else "not observed yet"


def concept_line(c: planner_pb2.ConceptScore) -> str:
    return (
        f"{c.concept:40s} p={c.sampling_probability:.4f} predicted={c.predicted_reward:.3f}±{c.uncertainty:.3f} "
        f"{observed_text(c)}" + (f", queried {c.times_queried}x" if c.times_queried else "")
    )


def cmd_top(args) -> int:
    response = planner(args.planner).TopConcepts(planner_pb2.TopConceptsRequest(exploration_id=args.exploration_id, limit=args.limit))
    if args.json:
        _print(response, True)
    else:
        for c in response.concepts:
            print(concept_line(c))
    return 0


def cmd_lifecycle(args) -> int:
    stub = planner(args.planner)
    request = {"pause": planner_pb2.PauseExplorationRequest, "resume": planner_pb2.ResumeExplorationRequest, "cancel": planner_pb2.CancelExplorationRequest}[args.command](
        exploration_id=args.exploration_id
    )
    method = {"pause": stub.PauseExploration, "resume": stub.ResumeExploration, "cancel": stub.CancelExploration}[args.command]
    _print(method(request).exploration, args.json)
    return 0


def cmd_stack(args) -> int:
    from services.stack.__main__ import main as stack_main

    return stack_main(args.rest)


def cmd_report(args) -> int:
    from pathlib import Path

    from services.cli.report import default_corpus_jsonl, write_report
    from services.common import settings as settings_mod
    from services.common.objectstore import ObjectStore

    settings = settings_mod.load_service_settings(settings_mod.ServiceSettings, "cli")
    corpus = Path(args.corpus) if args.corpus else default_corpus_jsonl()
    path = write_report(planner(args.planner), ObjectStore.from_settings(settings), settings.s3_bucket, args.exploration_id, Path(args.out), corpus)
    if args.json:
        print((path.parent / "report.json").read_text())
    else:
        print(f"report: {path}")
    return 0


def cmd_data(args) -> int:
    from services.cli.mainjob import data_dir
    from services.offlineweb.build import BuildOptions, build

    out = data_dir(args.out)
    started = time.monotonic()
    say = (lambda message: None) if args.json else (lambda message: print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True))
    manifest = build(BuildOptions(out=out, force=args.force), say)
    corpus = manifest["corpus"]
    summary = {"data_dir": str(out), "images": corpus["images"], "with_synset_pct": corpus["with_synset_pct"], "targets": manifest["targets"].get("branches", 0)}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"offline web: {summary['images']} images ({summary['with_synset_pct']}% with a WordNet synset), {summary['targets']} Tux Paint targets in {out}")
    return 0


def cmd_demo(args) -> int:
    from services.cli.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iex", description="Internet Explorer: targeted representation learning on the open web")
    parser.add_argument("--planner", default=None, help="planner address host:port (default $IEX_PLANNER_ADDR or the local stack's planner, 127.0.0.1:15051)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="group", required=True)

    stack = sub.add_parser("stack", help="start / stop / inspect the local stack")
    stack.add_argument("rest", nargs=argparse.REMAINDER, help="up | down | status [options]")
    stack.set_defaults(func=cmd_stack)

    data = sub.add_parser("data", help="the offline web (images with captions and WordNet synsets) and the Tux Paint targets")
    dsub = data.add_subparsers(dest="command", required=True)
    fetch = dsub.add_parser("fetch", help="fetch the packages (npm, Debian; cached in ~/.cache/iex) and build the offline web")
    fetch.add_argument("--out", help="data directory (default $IEX_DATA_DIR or ~/.cache/iex/offline-web)")
    fetch.add_argument("--force", action="store_true", help="rebuild even when up to date")
    fetch.set_defaults(func=cmd_data)

    from services.cli.mainjob import add_parser as add_run_parser

    add_run_parser(sub)

    demo = sub.add_parser("demo", help="quick loop on the generated (synthetic) offline web with a generated target")
    demo.add_argument("--iterations", type=int, default=1)
    demo.add_argument("--queries", type=int, default=8)
    demo.add_argument("--images-per-query", type=int, default=8)
    demo.add_argument("--mode", default="random", choices=["ie", "random", "labels", "labels-only"])
    demo.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the exploration")
    demo.add_argument("--out", default="reports", help="where the report is written")
    demo.set_defaults(func=cmd_demo)

    report = sub.add_parser("report", help="write a Markdown report with plots for an exploration")
    report.add_argument("exploration_id")
    report.add_argument("--out", default="reports", help="directory for <exploration_id>/report.md and its plots")
    report.add_argument("--corpus", help="corpus.jsonl with the ground truth (default: the search service's corpus)")
    report.set_defaults(func=cmd_report)

    explore = sub.add_parser("explore", help="explorations")
    esub = explore.add_subparsers(dest="command", required=True)
    create = esub.add_parser("create")
    create.add_argument("--target", required=True, help="s3://bucket/prefix with train/ images")
    create.add_argument("--mode", default="ie", choices=["ie", "random", "labels", "labels-only"])
    create.add_argument("--concepts", help="comma-separated vocabulary (default: the planner's)")
    create.add_argument("--labels", help="comma-separated class names for the label-guided modes")
    create.add_argument("--iterations", type=int, default=None)
    create.add_argument("--queries", type=int, default=None)
    create.add_argument("--images-per-query", type=int, default=None)
    create.add_argument("--seed", type=int, default=0)
    create.add_argument("--name")
    create.add_argument("--id")
    create.set_defaults(func=cmd_create)
    for name, func in (("status", cmd_status), ("watch", cmd_watch), ("top-concepts", cmd_top)):
        p = esub.add_parser(name)
        p.add_argument("exploration_id")
        if name == "watch":
            p.add_argument("--timeout", type=float, default=None)
        if name == "top-concepts":
            p.add_argument("--limit", type=int, default=20)
        p.set_defaults(func=func)
    for name in ("pause", "resume", "cancel"):
        p = esub.add_parser(name)
        p.add_argument("exploration_id")
        p.set_defaults(func=cmd_lifecycle)
    lst = esub.add_parser("list")
    lst.add_argument("--limit", type=int, default=50)
    lst.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --json is accepted anywhere on the line (`iex explore status ID --json`), except inside `iex stack ...`,
    # whose options belong to python -m services.stack.
    as_json = False
    if "--json" in argv and not (argv and argv[0] == "stack"):
        as_json = True
        argv = [a for a in argv if a != "--json"]
    args = build_parser().parse_args(argv)
    args.json = args.json or as_json
    from services.cli.mainjob import MainJobError

    try:
        return args.func(args)
    except MainJobError as exc:
        print(f"iex: {exc}", file=sys.stderr)
        return 2
    except Unreachable as exc:
        print(f"iex: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"iex: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
