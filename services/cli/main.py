"""`iex` command line, a thin client of the gRPC APIs.

    iex stack up|down|status|env           the local stack (python -m services.stack)
    iex data fetch [--out DIR] [--force]   build the offline web and the Tux Paint targets
    iex run [--branch animals] ...         the main job: one exploration on the embedded default, report
    iex explore create|list|status|watch|top-concepts|pause|resume|cancel
    iex report <exploration id>            Markdown + PNG plots + report.json
    iex demo                               the quick loop on the generated (synthetic) offline web

`--json` (anywhere on the line) prints machine-readable output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import grpc

from iex.v1 import common_pb2, planner_pb2
from services.cli import defaults
from services.cli.client import Unreachable, planner
from services.cli.display import concept_line, list_line, show, watch


def _names(text: str | None) -> list[str]:
    return [c.strip() for c in (text or "").split(",") if c.strip()]


def cmd_create(args) -> int:
    # Without concepts the planner's default vocabulary (the WordNet nouns unless configured otherwise).
    spec = defaults.exploration_spec(
        args,
        display_name=args.name or "",
        target_uri=args.target,
        concepts=_names(args.concepts),
        labels=_names(args.labels),
    )
    response = planner(args.planner).CreateExploration(planner_pb2.CreateExplorationRequest(spec=spec, exploration_id=args.id or ""))
    show(response.exploration, args.json)
    return 0


def cmd_status(args) -> int:
    response = planner(args.planner).GetExploration(planner_pb2.GetExplorationRequest(exploration_id=args.exploration_id))
    show(response.exploration, args.json)
    return 0


def cmd_list(args) -> int:
    response = planner(args.planner).ListExplorations(planner_pb2.ListExplorationsRequest(page_size=args.limit))
    if args.json:
        show(response, True)
    else:
        for e in response.explorations:
            print(list_line(e))
    return 0


def cmd_watch(args) -> int:
    last = watch(planner(args.planner), args.exploration_id, args.json, args.timeout)
    return 0 if last is not None and last.state == common_pb2.EXPLORATION_STATE_SUCCEEDED else 1


def cmd_top(args) -> int:
    response = planner(args.planner).TopConcepts(planner_pb2.TopConceptsRequest(exploration_id=args.exploration_id, limit=args.limit))
    if args.json:
        show(response, True)
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
    show(method(request).exploration, args.json)
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
    defaults.add_exploration_arguments(demo, defaults.DEMO)
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
    create = esub.add_parser("create", help="create an exploration (the same defaults as `iex run`, docs/cli.md)")
    create.add_argument("--target", required=True, help="s3://bucket/prefix with train/ images")
    create.add_argument("--concepts", help="comma-separated vocabulary (default: the planner's, the WordNet nouns)")
    create.add_argument("--labels", help="comma-separated class names for the label-guided modes")
    defaults.add_exploration_arguments(create)
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
