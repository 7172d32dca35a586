"""Sustained throughput of crawler -> dedup -> scorer on the local stack, against the crawler alone.

    IEX_PORT_OFFSET=4000 IEX_STATE_DIR=/tmp/somewhere python -m bench.pipeline [--queries 150] [--images-per-query 16] [--s3 minio]

Results go to bench/results/pipeline.json (pipeline-minio.json with --s3 minio; `--results -`: nowhere).

The full local stack (six services, tansu, SeaweedFS, Triton) serving the offline web (`make data`),
one exploration whose initial encoder (EfficientNet-Lite0, ImageNet weights) is served, then a
bounded batch of queries published at once on iex.planner.queries.v1, exactly as the planner
publishes them (a saturating rate: the queue is never empty until the batch is done), with a
bounded time to finish.

- **ours**: crawler, dedup and scorer all running; an image is done when dedup has decided it and,
  when accepted, the scorer has scored it. images/s = done images / (last completion - first publish).
- **reference**: the crawler alone on the same query texts (dedup and scorer stopped, the crawler's
  search cache off in both phases so every query searches again), images/s = fetched images / (last
  fetch - first publish). The ratio says what dedup + scoring cost on the same cores.

Measured per phase: images/s, Kafka consumer lag of the three groups when the phase ends (records
between each group's committed offset and the log end, tests/chaos/chaos_harness.group_lag), peak
lag the services reported, peak resident memory of every process, CPU seconds of each process and
CPU-ms per image, and what the servers themselves counted: S3 requests by type from the S3 server's
own Prometheus counters (SeaweedFS `SeaweedFS_s3_request_total`, MinIO `minio_s3_requests_total`)
and Kafka records the broker holds on every topic, both before and after the phase, per image.
The phases run in the order ours -> reference so that no backlog is left for dedup when it runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "chaos"))

from chaos_harness import decoded, group_lag, group_members, metrics_text, read_topics  # noqa: E402

from bench.exploration.__main__ import LoadSampler, planner_stub, stop_on_sigterm, warm_search_index  # noqa: E402
from bench.load.__main__ import PROCESSES, Phase, Sampler, machine  # noqa: E402
from iex.v1 import common_pb2, events_pb2, planner_pb2  # noqa: E402
from services.common import endpoints, topics  # noqa: E402
from services.common.kafka import KafkaConfig, Publisher, now_timestamp  # noqa: E402
from services.common.metrics import Metrics  # noqa: E402
from services.common.objectstore import ObjectStore  # noqa: E402
from services.offlineweb import targets as target_sets  # noqa: E402
from services.offlineweb.build import default_data_dir  # noqa: E402
from services.offlineweb.upload import upload_target  # noqa: E402
from services.stack import compat, servers  # noqa: E402

BUCKET = "iex"
EXPLORATION = "pipeline-1"
PIPELINE = ("crawler", "dedup", "scorer")
ACCEPTED = {common_pb2.DECISION_KIND_UNIQUE, common_pb2.DECISION_KIND_EXACT_DUPLICATE, common_pb2.DECISION_KIND_NEAR_DUPLICATE}
TICKS = os.sysconf("SC_CLK_TCK")


def group_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process group (the service and its children)."""
    return sum(int(fields[11]) + int(fields[12]) for _member, fields in group_members(pid)) / TICKS


def cpu_snapshot(stack) -> dict[str, float]:
    out = {}
    for name in (*servers.SERVICE_NAMES, "kafka", "s3", "triton"):
        pid = stack.process(name).pid()
        out[name] = group_cpu_s(pid) if pid else 0.0
    return out


def s3_metrics_text(s3: str) -> str:
    if s3 == "minio":
        url = f"http://{compat.MINIO_ENDPOINT}/minio/v2/metrics/cluster"
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
            return response.read().decode()
    return metrics_text(endpoints.S3_METRICS_PORT)


def s3_requests(s3: str = "seaweedfs") -> dict[str, float]:
    """Requests the S3 server counted, by type (GET, PUT, HEAD, DELETE, ...), from its own metrics."""
    return servers.s3_request_counts(s3_metrics_text(s3))


def kafka_records(bootstrap: str) -> dict[str, int]:
    """Records the broker holds on every topic of the system (read back from it, not counted by clients)."""
    names = [t.name for t in topics.ALL]
    return {name: len(records) for name, records in read_topics(bootstrap, names, timeout_s=180).items()}


def delta(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before)) if after.get(k, 0) - before.get(k, 0)}


def seconds(ts) -> float:
    return ts.seconds + ts.nanos / 1e9


def prepare(stack, data_dir: Path, branch: str, image_size: int) -> tuple[str, ObjectStore]:
    env = stack.env()
    store = ObjectStore(env["IEX_S3_ENDPOINT"], env["IEX_S3_ACCESS_KEY"], env["IEX_S3_SECRET_KEY"])
    store.ensure_bucket(BUCKET)
    uri, _ = upload_target(target_sets.target_dir(data_dir, branch), f"s3://{BUCKET}/targets/pipeline", store)
    stub = planner_stub()
    spec = planner_pb2.ExplorationSpec(
        target_uri=uri, mode=common_pb2.EXPLORATION_MODE_RANDOM, iterations=1, queries_per_iteration=1, images_per_query=1,
        seed=7, init="efficientnet-lite0", image_size=image_size, vocabulary="wordnet",
    )
    stub.CreateExploration(planner_pb2.CreateExplorationRequest(spec=spec, exploration_id=EXPLORATION), timeout=60)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        e = stub.GetExploration(planner_pb2.GetExplorationRequest(exploration_id=EXPLORATION), timeout=10).exploration
        if e.state in (common_pb2.EXPLORATION_STATE_SUCCEEDED, common_pb2.EXPLORATION_STATE_FAILED):
            break
        time.sleep(3)
    if e.state != common_pb2.EXPLORATION_STATE_SUCCEEDED:
        raise RuntimeError(f"the pipeline exploration did not get ready: {e}")
    return env["IEX_KAFKA_BOOTSTRAP"], store


def query_texts(data_dir: Path, n: int, seed: int) -> list[str]:
    """n distinct corpus concepts (what a query names), in a fixed random order."""
    concepts = set()
    with open(data_dir / "corpus.jsonl") as f:
        for line in f:
            c = json.loads(line).get("concept")
            if c:
                concepts.add(c)
    ordered = sorted(concepts)
    random.Random(seed).shuffle(ordered)
    return ordered[:n]


def lag_of(bootstrap: str) -> dict[str, int]:
    return {g: sum(group_lag(bootstrap, f"iex-{g}").values()) for g in PIPELINE}


def run_phase(stack, publisher, bootstrap: str, label: str, texts: list[str], images_per_query: int, limit_s: float, full: bool, s3: str) -> dict:
    prefix = f"{EXPLORATION}-{label}-"
    phase = Phase(label, rate=0.0, queries=len(texts))
    sampler = Sampler(stack, phase)
    cpu_before = cpu_snapshot(stack)
    s3_before, kafka_before = s3_requests(s3), kafka_records(bootstrap)
    sampler.start()
    t0 = time.time()
    for i, text in enumerate(texts):
        q = events_pb2.QueryIssued(
            query_id=f"{prefix}q{i}", exploration_id=EXPLORATION, iteration=1, concept=text, text=text,
            num_results=images_per_query, search_backend="local", issued_at=now_timestamp(),
        )
        publisher.publish(topics.QUERIES, q, key=q.query_id)
    publisher.flush()
    publish_s = time.time() - t0
    names = [topics.QUERIES_CRAWLED.name, topics.IMAGES_FETCHED.name, topics.DECISIONS.name, topics.IMAGES_SCORED.name]
    done_at = None
    counts = {}
    try:
        while True:
            time.sleep(3.0)
            records = read_topics(bootstrap, names, timeout_s=120)
            crawled = {c.query_id for c in decoded(records[names[0]], events_pb2.QueryCrawled) if c.query_id.startswith(prefix)}
            fetched = [e for e in decoded(records[names[1]], events_pb2.ImageFetched) if e.query_id.startswith(prefix)]
            decisions = [d for d in decoded(records[names[2]], events_pb2.ImageDecision) if d.query_id.startswith(prefix)]
            scored = [s for s in decoded(records[names[3]], events_pb2.ImageScored) if s.query_id.startswith(prefix)]
            accepted = [d for d in decisions if d.kind in ACCEPTED]
            counts = {
                "queries_crawled": len(crawled),
                "images_fetched": len(fetched),
                "images_decided": len(decisions),
                "images_accepted": len(accepted),
                "images_scored": len(scored),
                "images_stored_new": sum(1 for d in decisions if d.kind == common_pb2.DECISION_KIND_UNIQUE),
            }
            all_crawled = len(crawled) == len(texts)
            finished = all_crawled and (not full or (len(decisions) >= len(fetched) and len(scored) >= len(accepted)))
            if full:
                stamps = [seconds(d.decided_at) for d in decisions] + [seconds(s.scored_at) for s in scored]
                done = len(decisions)
            else:
                stamps = [seconds(f.fetched_at) for f in fetched]
                done = len(fetched)
            last = max(stamps) if stamps else t0
            if finished or time.time() - t0 > limit_s:
                done_at = time.time()
                break
    finally:
        lag_end = lag_of(bootstrap)
        sampler.done.set()
        sampler.join()
    cpu_after = cpu_snapshot(stack)
    s3_after, kafka_after = s3_requests(s3), kafka_records(bootstrap)
    span = max(1e-9, last - t0)
    cpu = {n: round(cpu_after[n] - cpu_before[n], 1) for n in cpu_after}
    images = max(1, counts.get("images_fetched", 0))
    s3 = delta(s3_after, s3_before)
    kafka = delta(kafka_after, kafka_before)
    return {
        "label": label,
        "queries": len(texts),
        "images_per_query": images_per_query,
        "finished_within_limit": finished,
        "limit_s": limit_s,
        "publish_s": round(publish_s, 2),
        "span_s": round(span, 1),
        "watched_s": round(done_at - t0, 1),
        **counts,
        "images_done": done,
        "images_per_s": round(done / span, 2),
        "consumer_lag_end": lag_end,
        "peak_lag_reported": phase.peak_lag,
        "peak_rss_mib": {n: round(phase.peak_rss.get(n, 0) / 2**20) for n in PROCESSES},
        "cpu_s": cpu,
        "cpu_ms_per_image": {n: round(1000 * v / images, 2) for n, v in cpu.items()},
        "cpu_ms_per_image_total": round(1000 * sum(cpu.values()) / images, 1),
        "s3_requests_at_server": s3,
        "s3_requests_per_image": round(sum(s3.values()) / images, 2),
        "kafka_records_at_broker": kafka,
        "kafka_records_per_image": round(sum(kafka.values()) / images, 2),
    }


# The paper's pace: ~25,000 images per iteration collected in under 5 minutes; and ten times that.
CAPACITY_RATES = {"paper (25,000 images / 5 min)": 25_000 / 300, "10x paper": 250_000 / 300}
CAPACITY_PROCESSES = ("crawler", "dedup", "scorer", "triton", "planner", "search", "kafka", "s3")


def capacity(ours: dict) -> dict:
    """Cores, S3 requests and Kafka records per second each target rate needs, from the measured costs per image."""
    per_image = ours["cpu_ms_per_image"]
    model = {
        "images_per_s_per_core": {n: round(1000 / per_image[n], 1) if per_image.get(n) else None for n in CAPACITY_PROCESSES},
        "rates": {},
    }
    for label, rate in CAPACITY_RATES.items():
        model["rates"][label] = {
            "images_per_s": round(rate, 1),
            "cores": {n: round(rate * per_image.get(n, 0.0) / 1000, 2) for n in CAPACITY_PROCESSES},
            "cores_total": round(rate * sum(per_image.get(n, 0.0) for n in CAPACITY_PROCESSES) / 1000, 1),
            "s3_requests_per_s": round(rate * ours["s3_requests_per_image"]),
            "kafka_records_per_s": round(rate * ours["kafka_records_per_image"]),
        }
    return model


def capacity_table(model: dict) -> str:
    labels = list(model["rates"])
    lines = ["| process | images/s per core | " + " | ".join(f"cores for {label}" for label in labels) + " |", "|---|---:|" + "---:|" * len(labels)]
    for n in CAPACITY_PROCESSES:
        per_core = model["images_per_s_per_core"][n]
        lines.append(f"| {n} | {per_core if per_core is not None else '-'} | " + " | ".join(str(model["rates"][l]["cores"][n]) for l in labels) + " |")
    lines.append("| **all** | | " + " | ".join(f"**{model['rates'][l]['cores_total']}**" for l in labels) + " |")
    lines.append("| S3 requests/s | | " + " | ".join(f"{model['rates'][l]['s3_requests_per_s']:,}" for l in labels) + " |")
    lines.append("| Kafka records/s | | " + " | ".join(f"{model['rates'][l]['kafka_records_per_s']:,}" for l in labels) + " |")
    return "\n".join(lines)


def fmt_counts(counts: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in counts.items()) or "-"


def table(ours: dict, ref: dict) -> str:
    rows = [
        ("queries x images per query", f"{ref['queries']} x {ref['images_per_query']}", f"{ours['queries']} x {ours['images_per_query']}"),
        ("images through the path", ref["images_done"], ours["images_done"]),
        ("finished within the limit", ref["finished_within_limit"], ours["finished_within_limit"]),
        ("seconds (first publish -> last image)", ref["span_s"], ours["span_s"]),
        ("images/s", ref["images_per_s"], ours["images_per_s"]),
        ("accepted / scored", "-", f"{ours['images_accepted']} / {ours['images_scored']}"),
        ("consumer lag at the end crawler/dedup/scorer", "/".join(str(ref["consumer_lag_end"][g]) for g in PIPELINE), "/".join(str(ours["consumer_lag_end"][g]) for g in PIPELINE)),
        ("peak lag reported by the services", ref["peak_lag_reported"], ours["peak_lag_reported"]),
    ]
    for n in ("crawler", "dedup", "scorer", "search", "kafka", "s3", "triton"):
        rows.append((f"peak RSS {n} (MiB)", ref["peak_rss_mib"][n], ours["peak_rss_mib"][n]))
    for n in ("crawler", "dedup", "scorer", "search", "kafka", "s3", "triton", "planner"):
        rows.append((f"CPU ms per image {n}", ref["cpu_ms_per_image"][n], ours["cpu_ms_per_image"][n]))
    rows.append(("CPU ms per image, all processes", ref["cpu_ms_per_image_total"], ours["cpu_ms_per_image_total"]))
    rows.append(("S3 requests per image (counted by the S3 server)", ref["s3_requests_per_image"], ours["s3_requests_per_image"]))
    rows.append(("  by type", fmt_counts(ref["s3_requests_at_server"]), fmt_counts(ours["s3_requests_at_server"])))
    rows.append(("Kafka records per image (held by the broker)", ref["kafka_records_per_image"], ours["kafka_records_per_image"]))
    lines = ["| | reference: crawler alone | ours: crawler -> dedup -> scorer |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    ratio = ours["images_per_s"] / ref["images_per_s"] if ref["images_per_s"] else 0.0
    lines.append(f"| ratio ours / reference (images/s) | | **{ratio:.2f}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=150, help="queries per phase, published at once")
    parser.add_argument("--images-per-query", type=int, default=16)
    parser.add_argument("--limit-s", type=float, default=600.0, help="longest time a phase may take")
    parser.add_argument("--image-size", type=int, default=96, help="input size of the served encoder")
    parser.add_argument("--branch", default="food/fruit", help="target whose initial encoder is served (its bank scores the images)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--s3", choices=("seaweedfs", "minio"), default="seaweedfs", help="S3 server: the embedded stack's SeaweedFS, or MinIO (built by `python -m services.stack.compat fetch`)")
    parser.add_argument("--env", action="append", default=[], metavar="IEX_NAME=VALUE", help="a setting for every service (repeatable), e.g. IEX_DEDUP_DECISION_THREADS=1")
    parser.add_argument("--results", default="", help="results name under bench/results (default: pipeline, pipeline-minio)")
    args = parser.parse_args(argv)
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    if not (data_dir / "corpus.jsonl").is_file():
        parser.error(f"no offline web at {data_dir}: run `make data` first")
    texts = query_texts(data_dir, args.queries, args.seed)

    state = Path(tempfile.mkdtemp(prefix="pipeline-", dir=os.environ.get("IEX_STATE_DIR") or None))
    os.environ["IEX_STATE_DIR"] = str(state)
    os.environ["IEX_SEARCH_CORPUS_DIR"] = str(data_dir)
    # Every query searches again in both phases (the crawler's search cache would answer the second).
    env = {**servers.stack_env(), "IEX_TRAINER_MAX_STEPS": "1", "IEX_TRAINER_BATCH_SIZE": "16", "IEX_CRAWLER_SEARCH_CACHE_ENTRIES": "0", "IEX_CRAWLER_SEARCH_CACHE_SHARED": "false"}
    minio = None
    if args.s3 == "minio":
        # The services reach MinIO through the usual IEX_S3_* settings; tansu keeps its log in memory.
        os.environ.update({k: v for k, v in compat.compat_env().items() if k.startswith("IEX_S3_")})
        minio = compat.minio()
        minio.start()
        minio.wait_ready()
    env = {**servers.stack_env(), **{k: v for k, v in env.items() if not k.startswith("IEX_S3_")}}
    for item in args.env:
        name, _, value = item.partition("=")
        if not name.startswith("IEX_") or not _:
            parser.error(f"--env wants IEX_NAME=VALUE, got {item!r}")
        env[name] = value
    stack = servers.Stack(servers=("kafka", "triton") if minio else ("s3", "kafka", "triton"), services=servers.SERVICE_NAMES, service_env=env, echo=print)
    if minio is not None:
        stack._processes["s3"] = minio  # sampled (RSS, CPU) under the name "s3" like SeaweedFS
    stop_on_sigterm()
    load = LoadSampler()
    began = time.monotonic()
    phases = {}
    try:
        warm_search_index(data_dir)
        stack.up()
        load.start()
        bootstrap, _ = prepare(stack, data_dir, args.branch, args.image_size)
        publisher = Publisher(KafkaConfig(bootstrap=bootstrap, client_id="bench-pipeline"), Metrics("bench_pipeline"))
        print(f"ours: {len(texts)} queries x {args.images_per_query} images through crawler -> dedup -> scorer", flush=True)
        phases["ours"] = run_phase(stack, publisher, bootstrap, "ours", texts, args.images_per_query, args.limit_s, full=True, s3=args.s3)
        print(json.dumps(phases["ours"]), flush=True)
        for name in ("dedup", "scorer"):
            stack.process(name).stop()
        print("reference: the crawler alone on the same queries (dedup and scorer stopped)", flush=True)
        phases["reference"] = run_phase(stack, publisher, bootstrap, "ref", texts, args.images_per_query, args.limit_s, full=False, s3=args.s3)
        print(json.dumps(phases["reference"]), flush=True)
        publisher.close()
    finally:
        load.done.set()
        stack.down()
        if minio is not None:
            minio.stop()
        shutil.rmtree(state, ignore_errors=True)
    text = table(phases["ours"], phases["reference"])
    print(text)
    model = capacity(phases["ours"])
    capacity_text = capacity_table(model)
    print(capacity_text)
    ratio = phases["ours"]["images_per_s"] / phases["reference"]["images_per_s"] if phases["reference"]["images_per_s"] else None
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "machine_load": {**load.summary(), "note": "1-minute load average sampled over the run, the benchmark's own stack included"},
        "wall_s": round(time.monotonic() - began),
        "s3_server": f"MinIO {compat.MINIO_VERSION}" if minio else "SeaweedFS (the embedded stack)",
        "settings": args.env,
        "served_encoder": {"init": "efficientnet-lite0", "image_size": args.image_size, "target": args.branch},
        "reference": "the crawler alone on the same queries (dedup and scorer stopped)",
        "ours": "crawler -> dedup -> scorer",
        "phases": phases,
        "ratio_images_per_s": ratio,
        "table_markdown": text,
        "capacity": model,
        "capacity_markdown": capacity_text,
    }
    name = args.results or ("pipeline-minio" if minio else "pipeline")
    if name != "-":
        out = REPO / "bench" / "results" / f"{name}.json"
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {out.relative_to(REPO)}")
    return 0 if phases["ours"]["finished_within_limit"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
