"""Exploration quality: relevant-image yield and k-NN of random, ie, ie+descriptors and labels, on the real stack.

    IEX_PORT_OFFSET=4000 IEX_STATE_DIR=/tmp/somewhere python -m bench.exploration \\
        --branch food/fruit --branch animals [--seeds 1,2] [--iterations 5] [--queries 8] [--images-per-query 16]

One local stack (six services, tansu, SeaweedFS, Triton) serving the offline web
(`make data`; IEX_SEARCH_CORPUS_DIR is set to it). For every target branch given, its Tux Paint photo
target is uploaded and one exploration per mode and seed is created through the planner's gRPC API,
all with the same budget (iterations x queries x images per query), the same ImageNet-pretrained
initial encoder (`efficientnet-lite0`) and the same seeds; several explorations run at once (the
planner keeps them apart). When they have ended, the benchmark reads the dedup decisions and the
trainer's evaluations from the topics and reports, per branch and mode (mean and spread over seeds):

- relevant-image yield per iteration: the share of the exploration's stored images whose corpus
  synset lies in the target's relevant WordNet subtree (bench/exploration/figures.py defines it),
  its cumulative value, and its ratio to `random`;
- k-NN top-1 (leave-one-out on the target's labelled split) of the initial encoder and of the last
  version (EvaluationFinished, iteration 0 and the last).

Modes: random (uniform over the 146,347 WordNet concepts), ie (the paper's GP, no labels, no
descriptors), ie+descriptors (ie with the offline WordNet descriptor source), labels (label-set guided:
labels = the branch's class names from target.json). Nothing here looks at the evaluation split or
the relevance ground truth while exploring; they are only read afterwards to score.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "chaos"))

from chaos_harness import decoded, read_topics  # noqa: E402

from bench.exploration import figures  # noqa: E402
from bench.load.__main__ import machine  # noqa: E402
from iex.v1 import common_pb2, events_pb2, planner_pb2, planner_pb2_grpc  # noqa: E402
from services.common import endpoints, security, topics  # noqa: E402
from services.common.objectstore import ObjectStore  # noqa: E402
from services.offlineweb import targets as target_sets  # noqa: E402
from services.offlineweb.build import default_data_dir  # noqa: E402
from services.offlineweb.upload import upload_target  # noqa: E402
from services.stack import servers  # noqa: E402

BUCKET = "iex"
INIT = "efficientnet-lite0"
ENDED = {common_pb2.EXPLORATION_STATE_SUCCEEDED, common_pb2.EXPLORATION_STATE_FAILED, common_pb2.EXPLORATION_STATE_CANCELLED}
MODE_SPECS = {
    "random": (common_pb2.EXPLORATION_MODE_RANDOM, "none", False),
    "ie": (common_pb2.EXPLORATION_MODE_IE, "none", False),
    "ie+descriptors": (common_pb2.EXPLORATION_MODE_IE, "wordnet", False),
    "labels": (common_pb2.EXPLORATION_MODE_LABELS, "none", True),
}


@dataclass
class Planned:
    branch: str
    mode: str
    seed: int
    exploration_id: str
    spec: planner_pb2.ExplorationSpec
    created: float = 0.0
    ended: float = 0.0
    state: int = 0
    error: str = ""


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")


def spec_seed(seed: int, branch_index: int, mode_index: int) -> int:
    """The planner seed of one run: fixed, and different for every branch and mode.

    Dedup is shared by the stack's explorations and the planner trains only on the images it
    stored as new objects, so two explorations issuing the same queries (random and ie sample
    uniformly at iteration 1; random ignores the target) would leave the later one nothing new to
    train on. Distinct seeds keep their query streams apart; what they still find in common is
    credited to both (and counted in both yields) but trained on by the first to store it."""
    return 1000 * seed + 10 * branch_index + mode_index


def exploration_id(run_tag: str, branch: str, mode: str, seed: int) -> str:
    mode_slug = {"ie+descriptors": "ied"}.get(mode, mode[:3])
    text = f"{run_tag}-{slug(branch)[:20]}-{mode_slug}-s{seed}"
    return text[:40].strip("-")


class LoadSampler(threading.Thread):
    """Load average (1 min) every 15 s: the machine is shared; its load says how noisy wall times are."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append(os.getloadavg()[0])
            self.done.wait(15.0)

    def summary(self) -> dict:
        xs = self.samples or [os.getloadavg()[0]]
        return {"load_avg_1m_min": round(min(xs), 2), "load_avg_1m_mean": round(sum(xs) / len(xs), 2), "load_avg_1m_max": round(max(xs), 2), "cpus": os.cpu_count()}


def planner_stub() -> planner_pb2_grpc.PlannerServiceStub:
    address = f"{endpoints.LOOPBACK}:{endpoints.SERVICE_PORTS['planner'].grpc}"
    return planner_pb2_grpc.PlannerServiceStub(security.client_channel(address, security.client_settings()))


def plan(args, targets: dict[str, dict], target_uris: dict[str, str], run_tag: str) -> list[Planned]:
    out = []
    for seed in args.seeds:
        for b, branch in enumerate(args.branch):
            for mode in args.modes:
                mode_enum, descriptors, with_labels = MODE_SPECS[mode]
                spec = planner_pb2.ExplorationSpec(
                    display_name=f"bench.exploration {branch} {mode} seed {seed}",
                    target_uri=target_uris[branch],
                    mode=mode_enum,
                    labels=figures.class_names(targets[branch]["images"]) if with_labels else [],
                    iterations=args.iterations,
                    queries_per_iteration=args.queries,
                    images_per_query=args.images_per_query,
                    search_backend="local",
                    seed=spec_seed(seed, b, list(MODE_SPECS).index(mode)),
                    init=INIT,
                    image_size=args.image_size,
                    iteration_deadline_seconds=args.iteration_deadline_s,
                    descriptors=descriptors,
                    vocabulary="wordnet",
                )
                out.append(Planned(branch, mode, seed, exploration_id(run_tag, branch, mode, seed), spec))
    return out


def run_all(stub, planned: list[Planned], parallel: int, timeout_s: float, echo) -> None:
    """Creates explorations, `parallel` at a time, and waits for each to end (or the timeout)."""
    waiting = list(planned)
    active: list[Planned] = []
    began = time.monotonic()
    last_note = 0.0
    while waiting or active:
        while waiting and len(active) < parallel:
            p = waiting.pop(0)
            stub.CreateExploration(planner_pb2.CreateExplorationRequest(spec=p.spec, exploration_id=p.exploration_id), timeout=60)
            p.created = time.monotonic()
            active.append(p)
            echo(f"created {p.exploration_id} ({p.branch}, {p.mode}, seed {p.seed})")
        time.sleep(5)
        notes = []
        for p in list(active):
            e = stub.GetExploration(planner_pb2.GetExplorationRequest(exploration_id=p.exploration_id), timeout=30).exploration
            notes.append(f"{p.exploration_id}: {common_pb2.ExplorationState.Name(e.state)[18:]} it {e.current_iteration}/{p.spec.iterations} {e.detail}".rstrip())
            if e.state in ENDED:
                p.state, p.error, p.ended = e.state, e.error, time.monotonic()
                active.remove(p)
                echo(f"ended {p.exploration_id}: {common_pb2.ExplorationState.Name(e.state)} after {p.ended - p.created:.0f}s {e.stop_reason} {e.error}".rstrip())
        if time.monotonic() - last_note > 60:
            last_note = time.monotonic()
            echo(f"[{time.monotonic() - began:5.0f}s] load {os.getloadavg()[0]:.1f}; " + "; ".join(notes))
        if time.monotonic() - began > timeout_s:
            for p in active:
                stub.CancelExploration(planner_pb2.CancelExplorationRequest(exploration_id=p.exploration_id), timeout=30)
                p.state, p.error, p.ended = common_pb2.EXPLORATION_STATE_CANCELLED, "benchmark timeout", time.monotonic()
                echo(f"cancelled {p.exploration_id}: benchmark timeout")
            for p in waiting:
                p.error = "not started: benchmark timeout"
            return


def warm_search_index(data_dir: Path) -> None:
    """Embeds the corpus captions into the search service's local index cache (<corpus>/.iex-index) once,
    exactly as the service would at start, so that its start stays within the stack's ready timeout."""
    from services.common import settings as settings_mod
    from services.search.corpus import load_corpus
    from services.search.index import IndexOptions, build_caption_index, shared_minilm
    from services.search.index_store import LocalIndexStore
    from services.search.service import SearchSettings

    s = settings_mod.load(SearchSettings, {**os.environ, "IEX_SEARCH_CORPUS_DIR": str(data_dir)})
    options = IndexOptions(s.search_index_type, s.search_hnsw_m, s.search_hnsw_ef_construction, s.search_hnsw_ef_search)
    began = time.monotonic()
    build_caption_index(s.search_default_index, load_corpus(data_dir), shared_minilm(), LocalIndexStore(s.index_cache_dir), options=options)
    print(f"search index ready in {s.index_cache_dir} ({time.monotonic() - began:.0f}s)", flush=True)


def stop_on_sigterm() -> None:
    """SIGTERM (and SIGINT, which background jobs ignore) unwind through `finally`: the stack is stopped."""

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def load_corpus_synsets(data_dir: Path) -> dict[str, str]:
    out = {}
    with open(data_dir / "corpus.jsonl") as f:
        for line in f:
            row = json.loads(line)
            out[row["id"]] = row.get("synset") or ""
    return out


def collect(bootstrap: str, planned: list[Planned], targets: dict[str, dict], synset_of: dict[str, str], iterations: int) -> list[figures.RunFigures]:
    names = [topics.DECISIONS.name, topics.EVALUATIONS.name]
    records = read_topics(bootstrap, names, timeout_s=300)
    ids = {p.exploration_id for p in planned}
    decisions: dict[str, list[figures.Decision]] = {i: [] for i in ids}
    for d in decoded(records[names[0]], events_pb2.ImageDecision):
        if d.exploration_id in ids:
            decisions[d.exploration_id].append(figures.Decision(d.exploration_id, d.iteration, d.url, int(d.kind), d.object_key))
    evaluations: dict[str, list[tuple[int, float, int]]] = {i: [] for i in ids}
    for e in decoded(records[names[1]], events_pb2.EvaluationFinished):
        if e.exploration_id in ids:
            evaluations[e.exploration_id].append((e.iteration, e.knn_top1, e.eval_images))
    runs = []
    for p in planned:
        target = targets[p.branch]
        per = figures.yields(decisions[p.exploration_id], synset_of, target["relevant_synsets"], iterations)
        before, after, images = figures.knn_before_after(evaluations[p.exploration_id], iterations)
        runs.append(
            figures.RunFigures(
                p.branch,
                p.mode,
                p.seed,
                per,
                knn_before=before,
                knn_after=after,
                eval_images=images,
                state=common_pb2.ExplorationState.Name(p.state) if p.state else "NOT_STARTED",
                wall_s=(p.ended - p.created) if p.created and p.ended else 0.0,
                extra={"exploration_id": p.exploration_id, "planner_seed": p.spec.seed, "error": p.error, "decisions": len(decisions[p.exploration_id])},
            )
        )
    return runs


def knn_note(targets: dict[str, dict]) -> dict[str, str]:
    """Says where the leave-one-out k-NN cannot mean anything: labels with a single eval image."""
    out = {}
    for branch, t in targets.items():
        counts: dict[str, int] = {}
        for image in t["images"]:
            if image.get("split") == "eval":
                counts[image["label"]] = counts.get(image["label"], 0) + 1
        singles = sum(1 for n in counts.values() if n == 1)
        out[branch] = f"{sum(counts.values())} eval images in {len(counts)} classes, {singles} of them with one image (never right under leave-one-out)"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.exploration", description=__doc__.split("\n\n")[0])
    parser.add_argument("--branch", action="append", required=True, help="target branch (repeatable): food/fruit, animals, ...")
    parser.add_argument("--modes", default=",".join(figures.MODES), help=f"comma-separated subset of {', '.join(figures.MODES)}")
    parser.add_argument("--seeds", default="1,2", help="comma-separated seeds")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--queries", type=int, default=8, help="queries per iteration")
    parser.add_argument("--images-per-query", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=96, help="encoder input size (EfficientNet-Lite0 was trained at 224)")
    parser.add_argument("--max-steps", type=int, default=3, help="IEX_TRAINER_MAX_STEPS: training steps per iteration on the CPU")
    parser.add_argument("--batch-size", type=int, default=16, help="IEX_TRAINER_BATCH_SIZE: images per training step (two views each)")
    parser.add_argument("--parallel", type=int, default=4, help="explorations running at once")
    parser.add_argument("--iteration-deadline-s", type=int, default=1200)
    parser.add_argument("--timeout-s", type=float, default=5400, help="longest time for all explorations together")
    parser.add_argument("--data-dir", default="", help="offline web (default: the `make data` directory)")
    parser.add_argument("--results", default="exploration", help="results file name under bench/results/ ('' writes none)")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODE_SPECS]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; known: {', '.join(MODE_SPECS)}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.branch = [target_sets.validate_branch(b) for b in args.branch]

    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    if not (data_dir / "corpus.jsonl").is_file():
        parser.error(f"no offline web at {data_dir}: run `make data` first")
    targets = {}
    for branch in args.branch:
        directory = target_sets.target_dir(data_dir, branch)
        target = json.loads((directory / target_sets.TARGET_FILE).read_text())
        if not target.get("relevant_synsets"):
            parser.error(f"{branch}: no WordNet root, nothing is relevant to it (see `python -m services.offlineweb list-branches`)")
        targets[branch] = target
    synset_of = load_corpus_synsets(data_dir)

    state = Path(tempfile.mkdtemp(prefix="exploration-", dir=os.environ.get("IEX_STATE_DIR") or None))
    os.environ["IEX_STATE_DIR"] = str(state)
    os.environ["IEX_SEARCH_CORPUS_DIR"] = str(data_dir)
    env = {**servers.stack_env(), "IEX_TRAINER_MAX_STEPS": str(args.max_steps), "IEX_TRAINER_BATCH_SIZE": str(args.batch_size)}
    stop_on_sigterm()
    stack = servers.Stack(servers=("s3", "kafka", "triton"), services=servers.SERVICE_NAMES, service_env=env, echo=print)
    run_tag = "xb" + dt.datetime.now().strftime("%H%M")
    load = LoadSampler()
    began = time.monotonic()
    planned: list[Planned] = []
    runs: list[figures.RunFigures] = []
    try:
        warm_search_index(data_dir)
        stack.up()
        load.start()
        stack_env = stack.env()
        store = ObjectStore(stack_env["IEX_S3_ENDPOINT"], stack_env["IEX_S3_ACCESS_KEY"], stack_env["IEX_S3_SECRET_KEY"])
        store.ensure_bucket(BUCKET)
        target_uris = {}
        for branch in args.branch:
            uri, count = upload_target(target_sets.target_dir(data_dir, branch), f"s3://{BUCKET}/targets/bench-{slug(branch)}", store)
            target_uris[branch] = uri
            print(f"target {branch}: {uri} ({count} objects, {len(targets[branch]['relevant_synsets'])} relevant synsets)")
        planned = plan(args, targets, target_uris, run_tag)
        run_all(planner_stub(), planned, args.parallel, args.timeout_s, print)
        runs = collect(stack_env["IEX_KAFKA_BOOTSTRAP"], planned, targets, synset_of, args.iterations)
    finally:
        load.done.set()
        stack.down()
        shutil.rmtree(state, ignore_errors=True)
    wall = time.monotonic() - began

    summaries = figures.summarise(runs, args.iterations)
    goal_rows = figures.goals(summaries, args.iterations)
    text = figures.table(summaries, args.iterations)
    print()
    print(text)
    print()
    for g in goal_rows:
        verdict = {True: "PASS", False: "MISS", None: "n/a "}[g["pass"]]
        measured = "n/a" if g["measured"] is None else f"{g['measured']:.3f}"
        print(f"{verdict}  {g['branch']}: {g['goal']} (measured {measured}, threshold {g['threshold']:g})")
    print(f"wall time {wall / 60:.1f} min; {load.summary()}")
    if args.results:
        base_rate = {b: sum(1 for s in synset_of.values() if s in set(t["relevant_synsets"])) / len(synset_of) for b, t in targets.items()}
        result = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "machine_load": {**load.summary(), "note": "1-minute load average over the run, the benchmark's own explorations included: wall times depend on it, yields do not"},
            "wall_s": round(wall),
            "budget": {
                "iterations": args.iterations,
                "queries_per_iteration": args.queries,
                "images_per_query": args.images_per_query,
                "seeds": args.seeds,
                "init": INIT,
                "image_size": args.image_size,
                "trainer_max_steps": args.max_steps,
                "trainer_batch_size": args.batch_size,
                "parallel_explorations": args.parallel,
            },
            "modes": {m: {"mode": common_pb2.ExplorationMode.Name(MODE_SPECS[m][0]), "descriptors": MODE_SPECS[m][1], "labels": MODE_SPECS[m][2]} for m in args.modes},
            "labels": {b: figures.class_names(t["images"]) for b, t in targets.items()},
            "corpus_relevant_share": base_rate,
            "knn_eval_split": knn_note(targets),
            "definitions": figures.__doc__,
            "table_markdown": text,
            "summaries": [s.as_dict() for s in summaries],
            "goals": goal_rows,
            "runs": [r.as_dict() for r in runs],
        }
        out = REPO / "bench" / "results" / f"{args.results}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {out.relative_to(REPO)}")
    ended_ok = all(r.state == "EXPLORATION_STATE_SUCCEEDED" for r in runs) and len(runs) == len(planned)
    return 0 if ended_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
