"""`python -m services.trainer.run`: one training job on a local image folder, outside the service.

The same job, loader, training loop, checkpoints and rank protocol as the service, with a local
folder standing in for S3 and no Kafka: for benchmarks, GPU checks and trying a configuration.

    python -m services.trainer.run --images DIR --out DIR [--backbone resnet50 --image-size 224 ...]
    torchrun --nproc-per-node=8 -m services.trainer.run --images DIR --out DIR ...

`--out` receives (from rank 0 only) the starting checkpoint `v1.pt` (made from `--init` unless
present), mid-run checkpoints `v2-running.pt`, the result `v2.pt`, `report.json` (losses, rates,
GPU memory) and `writes.log`, one line per object written with the writing rank. Started again
with the same arguments after a crash, it resumes from the mid-run checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from services.trainer import distributed, followers, gpu, initialisation, moco, pretrained
from services.trainer.encoder import EncoderState, ModelConfig
from services.trainer.jobs import JobOutcome, JobRunner, LoaderConfig, TrainingJob
from services.trainer.training import PRECISIONS, RunProgress, StepReport, TrainConfig

log = logging.getLogger("services.trainer.run")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
RUN_BUCKET = "run"
IMAGES_BUCKET = "images"
INIT_BUCKET = "init"  # a --init checkpoint file is read as s3://init/<file name>


class DirectoryStore:
    """The object-store calls the trainer makes, on local folders (one per bucket). Every write
    is appended to `<run folder>/writes.log` with the writing rank."""

    def __init__(self, buckets: dict[str, Path], audit: Path) -> None:
        self.buckets = {name: path.resolve() for name, path in buckets.items()}
        self.audit = audit

    def _path(self, bucket: str, key: str) -> Path:
        root = self.buckets.get(bucket)
        if root is None:
            raise ValueError(f"unknown bucket {bucket!r}")
        path = (root / key).resolve()
        if not path.is_relative_to(root):
            raise ValueError(f"key outside its bucket: {key!r}")
        return path

    def get_or_none(self, bucket: str, key: str) -> bytes | None:
        try:
            return self._path(bucket, key).read_bytes()
        except FileNotFoundError:
            return None

    def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream", metadata: dict[str, str] | None = None) -> None:
        path = self._path(bucket, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(data)
        os.replace(partial, path)  # a kill mid-write never leaves a torn checkpoint
        self._record("put", bucket, key)

    def delete(self, bucket: str, key: str) -> None:
        self._path(bucket, key).unlink(missing_ok=True)
        self._record("delete", bucket, key)

    def _record(self, action: str, bucket: str, key: str) -> None:
        with self.audit.open("a") as log_file:
            log_file.write(f"{distributed.process_info().rank} {action} {bucket}/{key}\n")


def list_images(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def parameter_digest(model: torch.nn.Module) -> str:
    """Digest of every parameter (base and momentum encoders, heads): equal on every rank of a
    data-parallel run. BatchNorm running statistics are left out: each rank keeps its own."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.trainer.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, type=Path, help="folder of training images (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="folder for checkpoints and the report (rank 0 writes)")
    p.add_argument("--backbone", default="resnet50", help="timm backbone (default resnet50)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--decode-size", type=int, default=0, help="side of the decoded squares crops come from (0: image size * 8 / 7)")
    p.add_argument("--init", default="random", help="random, efficientnet-lite0 or a checkpoint file (any format the service's s3:// inits accept)")
    p.add_argument("--mlp-dim", type=int, default=4096)
    p.add_argument("--projection-dim", type=int, default=256)
    p.add_argument("--optimizer", default="lars", choices=("lars", "adamw"))
    p.add_argument("--batch-size", type=int, default=256, help="global batch over all ranks")
    p.add_argument("--base-lr", type=float, default=0.0, help="per 256 images; 0: MoCo-v3's for the optimiser")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps", type=int, default=0, help="cap on steps (0: epochs decide)")
    p.add_argument("--momentum", type=float, default=0.99)
    p.add_argument("--schedule", default="cosine", choices=("exploration", "cosine"), help="cosine: MoCo-v3's within this run; exploration: warm-up then constant")
    p.add_argument("--lr-warmup-steps", type=int, default=20, help="schedule=exploration: warm-up steps")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--early-stop-patience", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", *PRECISIONS))
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--workers", type=int, default=8, help="decode threads per rank")
    p.add_argument("--prefetch", type=int, default=4, help="batches decoded ahead")
    p.add_argument("--cache-mb", type=int, default=0, help="decoded-pixel cache per rank (MiB)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="mid-run checkpoint every N steps")
    p.add_argument("--warmup-steps", type=int, default=0, help="steps excluded from the reported rate (compilation, cuDNN autotuning)")
    return p.parse_args(argv)


def _auto(value: str, device: torch.device) -> bool:
    return value == "on" or (value == "auto" and device.type == "cuda")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    info = distributed.init_from_environment(kind)
    device = distributed.device_for(kind)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    group = followers.control_group() if info.world_size > 1 else None
    try:
        return _run(args, info, device, group)
    finally:
        distributed.shutdown()


def _run(args: argparse.Namespace, info: distributed.ProcessInfo, device: torch.device, group: Any) -> int:
    out = args.out.resolve()
    if info.is_leader:
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    store = DirectoryStore({IMAGES_BUCKET: args.images, RUN_BUCKET: out}, out / "writes.log")
    references = [f"s3://{IMAGES_BUCKET}/{name}" for name in list_images(args.images)]
    if info.is_leader:
        _ensure_base_checkpoint(args, store, device)
    distributed.barrier()

    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    defaults = moco.OPTIMIZER_DEFAULTS[args.optimizer]
    config = TrainConfig(
        batch_size=args.batch_size,
        base_lr=args.base_lr or defaults["base_lr"],
        weight_decay=defaults["weight_decay"],
        epochs=args.epochs,
        max_steps=args.steps,
        temperature=args.temperature,
        base_momentum=args.momentum,
        schedule=args.schedule,
        warmup_steps=args.lr_warmup_steps,
        early_stop_patience=args.early_stop_patience,
        precision=precision,
        channels_last=_auto(args.channels_last, device),
        checkpoint_every_steps=args.checkpoint_every,
    )
    job = TrainingJob(
        exploration_id="run",
        version=2,
        base_checkpoint_key="v1.pt",
        running_checkpoint_key="v2-running.pt",
        references=tuple(references),
        decode_size=args.decode_size or max(args.image_size, round(args.image_size * 8 / 7)),
        seed=args.seed,
        config=config,
        loader=LoaderConfig(workers=args.workers, prefetch_batches=args.prefetch, cache_bytes=args.cache_mb * 1024 * 1024),
        compile=_auto(args.compile, device),
    )
    runner = JobRunner(store, RUN_BUCKET, device, 0.0)  # type: ignore[arg-type]
    monitor = gpu.GpuMonitor(device)
    steps: list[dict[str, float]] = []
    lock = threading.Lock()

    def on_step(report: StepReport) -> None:
        with lock:
            steps.append({"step": report.step, "loss": report.loss, "lr": report.lr, "seconds": report.seconds, "data_wait_seconds": report.data_wait_seconds})
        if info.is_leader:
            print(f"step {report.step}/{report.total_steps} loss {report.loss:.6f} {report.images / max(report.seconds, 1e-9):.1f} images/s wait {report.data_wait_seconds * 1000:.1f} ms", flush=True)

    def on_checkpoint(progress: RunProgress) -> None:
        print(f"checkpoint {progress.step}", flush=True)

    def execute(current: TrainingJob) -> JobOutcome:
        monitor.reset_peak()
        outcome = runner.run(current, on_step=on_step, on_checkpoint_written=on_checkpoint)
        print(f"rank {info.rank} params {parameter_digest(outcome.state.model)} steps {outcome.result.steps}", flush=True)
        return outcome

    started = time.perf_counter()
    if group is None:
        outcome = execute(job)
    elif info.is_leader:
        coordinator = followers.Coordinator(group)
        try:
            outcome = coordinator.run(job, execute)
        finally:
            coordinator.close()
    else:
        return followers.follow(group, execute)
    wall = time.perf_counter() - started

    state, result = outcome.state, outcome.result
    store.put_bytes(RUN_BUCKET, "v2.pt", state.to_bytes(extra={"steps": result.steps}))
    store.delete(RUN_BUCKET, job.running_checkpoint_key)
    timed = [s for s in steps if s["step"] > args.warmup_steps]
    timed_seconds = sum(s["seconds"] for s in timed)
    sample = monitor.sample()
    report = {
        "backbone": state.config.backbone,
        "image_size": state.config.image_size,
        "global_batch": args.batch_size,
        "world_size": info.world_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "precision": precision,
        "compiled": job.compile,
        "channels_last": config.channels_last,
        "images": len(references),
        "steps": result.steps,
        "resumed_from_step": result.resumed_from_step,
        "epochs": result.epochs,
        "final_loss": result.final_loss,
        "wall_seconds": wall,
        "images_per_second": len(timed) * args.batch_size / timed_seconds if timed_seconds > 0 else 0.0,
        "data_wait_share": sum(s["data_wait_seconds"] for s in timed) / timed_seconds if timed_seconds > 0 else 0.0,
        "gpu_memory_peak_bytes": sample.peak_bytes,
        "gpu_memory_total_bytes": sample.total_bytes,
        "loader": {"images_read": outcome.loader_stats.images_read, "cache_hits": outcome.loader_stats.cache_hits, "skipped": outcome.loader_stats.skipped},
        "losses": [s["loss"] for s in steps],
        "step_seconds": [s["seconds"] for s in steps],
        "step_data_wait_seconds": [s["data_wait_seconds"] for s in steps],
        "first_step": steps[0]["step"] if steps else None,
    }
    store.put_bytes(RUN_BUCKET, "report.json", json.dumps(report, indent=2).encode())
    print(json.dumps({k: v for k, v in report.items() if k != "losses"}), flush=True)
    return 0


def _ensure_base_checkpoint(args: argparse.Namespace, store: DirectoryStore, device: torch.device) -> None:
    if store.get_or_none(RUN_BUCKET, "v1.pt") is not None:
        return
    init, read = args.init, store.get_or_none
    if init not in initialisation.NAMED_INITS:
        # A checkpoint file, read through the same strict loader as the service's s3:// inits.
        path = Path(init).resolve()
        if not path.is_file():
            raise SystemExit(f"--init: no such checkpoint file {init!r}")
        init = f"s3://{INIT_BUCKET}/{path.name}"
        files = DirectoryStore({INIT_BUCKET: path.parent}, store.audit)
        read = files.get_or_none
    requested = None if init == pretrained.LITE0 else args.backbone
    initial = initialisation.resolve(init, requested, read)
    heads = initial.head_dims() if initial is not None else {}
    config = ModelConfig(
        backbone=initial.backbone if initial is not None else args.backbone,
        image_size=args.image_size,
        init=init,
        seed=args.seed,
        mlp_dim=heads.get("mlp_dim", args.mlp_dim),
        projection_dim=heads.get("projection_dim", args.projection_dim),
        projector_layers=heads.get("projector_layers", 2),
        optimizer=args.optimizer,
    )
    state = EncoderState.create(config, torch.device("cpu"), initial=initial)
    store.put_bytes(RUN_BUCKET, "v1.pt", state.to_bytes())


if __name__ == "__main__":
    raise SystemExit(main())
