"""The embedded default: a generated target uploaded to S3, one exploration of the generated offline web."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from iex.v1 import common_pb2, planner_pb2
from services.cli.client import planner
from services.cli.defaults import exploration_spec
from services.cli.display import describe, watch
from services.common import settings as settings_mod
from services.common.objectstore import ObjectStore
from services.search import synthetic

DEMO_TARGET_CONCEPTS = ("red circle", "orange circle")


def upload_target(store: ObjectStore, bucket: str, prefix: str, concepts, n_train: int = 12, n_eval: int = 4) -> str:
    """Writes a generated target set under s3://bucket/prefix and returns its URI."""
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.make_target(tmp, concepts, n_train=n_train, n_eval=n_eval)
        root = Path(tmp)
        for path in sorted(root.rglob("*.png")):
            store.put_bytes(bucket, f"{prefix}/{path.relative_to(root).as_posix()}", path.read_bytes(), content_type="image/png")
        # The ground truth travels with the target, for reports and benchmarks, and so do the train
        # split's labels, for the trainer's evaluation (train -> test, the paper's protocol).
        for name in ("target.json", synthetic.TRAIN_LABELS_FILE):
            store.put_bytes(bucket, f"{prefix}/{name}", (root / name).read_bytes(), content_type="application/json")
    return f"s3://{bucket}/{prefix}"


def run_demo(args) -> int:
    settings = settings_mod.load_service_settings(settings_mod.ServiceSettings, "cli")
    stub = planner(args.planner)
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket(settings.s3_bucket)
    target_uri = upload_target(store, settings.s3_bucket, "targets/demo-red-round", DEMO_TARGET_CONCEPTS)
    print(f"target: {target_uri} ({', '.join(DEMO_TARGET_CONCEPTS)})")
    spec = exploration_spec(
        args,
        display_name="demo: red round things on the generated offline web",
        target_uri=target_uri,
        concepts=list(synthetic.CONCEPTS),
        labels=list(DEMO_TARGET_CONCEPTS) if args.mode.startswith("labels") else [],
    )
    if not spec.seed:  # DEMO.seed is 0: a different sample at every run unless --seed says otherwise
        spec.seed = int(time.time()) % 100_000
    created = stub.CreateExploration(planner_pb2.CreateExplorationRequest(spec=spec)).exploration
    print(f"exploration {created.exploration_id} created; watching (Ctrl-C stops watching, not the exploration)")
    final = watch(stub, created.exploration_id, args.json, args.timeout)
    final = stub.GetExploration(planner_pb2.GetExplorationRequest(exploration_id=created.exploration_id)).exploration
    print()
    print(describe(final))
    from services.cli.report import default_corpus_jsonl, write_report

    report = write_report(stub, store, settings.s3_bucket, created.exploration_id, Path(args.out), default_corpus_jsonl())
    print(f"\nreport: {report.resolve()}")
    if final.state != common_pb2.EXPLORATION_STATE_SUCCEEDED:
        print(f"iex demo: exploration ended {common_pb2.ExplorationState.Name(final.state)}; service logs are in .iex/logs/", file=sys.stderr)
        return 1
    return 0
