"""Trainer throughput on this CPU: the service's training job against a minimal MoCo-v3 loop.

    .venv/bin/python -m bench.trainer [--rounds 3] [--images 128] [--epochs 10] [--threads 1]

Both train the small configuration (the service's CPU default: timm mobilenetv3_small_050 at 64 px,
batch 64, 1024-wide heads) on the same JPEGs, for the same number of steps, alternating round by
round. Ours is exactly the service's path: a TrainingJob built from TrainerSettings, run by the
JobRunner that the service and every torchrun rank use: the starting checkpoint is loaded, the
images are streamed from storage (a local folder behind the object-store interface) by decode
workers with prefetch and the decoded-pixel cache, LARS with the schedules, and the service's own
per-step bookkeeping (Prometheus metrics, GPU sampling). Its clock covers all of that, set-up
included. The reference (reference.py) decodes every image into memory before its clock starts.
Goal: ours >= 0.9 x the reference's images/s. Writes bench/results/trainer.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.trainer import reference
from services.common.settings import load_service_settings
from services.trainer import data
from services.trainer.encoder import EncoderState, ModelConfig
from services.trainer.jobs import JobRunner, TrainingJob
from services.trainer.run import RUN_BUCKET, DirectoryStore
from services.trainer.service import TrainerService, TrainerSettings

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "trainer.json"
WORK = ROOT / "bench" / "work" / "trainer"
GOAL = 0.9
BACKBONE, IMAGE_SIZE, BATCH = "mobilenetv3_small_050", 64, 64


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(), "torch": torch.__version__}


def make_images(folder: Path, count: int) -> list[str]:
    """Photo-like JPEGs (smooth colour fields with noise, 160x120 to 320x240), generated once."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        name = f"{i:05d}.jpg"
        names.append(name)
        path = folder / name
        if path.exists():
            continue
        w, h = (160, 120) if i % 2 else (320, 240)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = rng.uniform(0, 255, size=3)
        slope = rng.uniform(-1, 1, size=(2, 3))
        pixels = base + xx[..., None] * slope[0] * 0.5 + yy[..., None] * slope[1] * 0.5 + rng.normal(0, 20, size=(h, w, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        path.write_bytes(buffer.getvalue())
    return names


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trainer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both (1: the machine is shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    before = machine()

    image_dir = WORK / "images"
    names = make_images(image_dir, args.images)
    decode_size = round(IMAGE_SIZE * 8 / 7)
    steps = (len(names) // BATCH) * args.epochs

    with tempfile.TemporaryDirectory(prefix="iex-bench-trainer-") as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        settings = load_service_settings(
            TrainerSettings,
            "trainer",
            environ={},
            model_repository=str(Path(tmp) / "models"),
            trainer_backbone=BACKBONE,
            trainer_image_size=IMAGE_SIZE,
            trainer_batch_size=BATCH,
            trainer_epochs=args.epochs,
            trainer_early_stop_patience=0,  # the same number of steps in every round
            trainer_device="cpu",
        )
        service = TrainerService(settings)  # its per-step bookkeeping is part of what we measure
        store = DirectoryStore({"images": image_dir, RUN_BUCKET: run_dir}, run_dir / "writes.log")
        config = ModelConfig(backbone=BACKBONE, image_size=IMAGE_SIZE, mlp_dim=settings.trainer_mlp_dim, projection_dim=settings.trainer_projection_dim)
        base = EncoderState.create(config, torch.device("cpu"))
        store.put_bytes(RUN_BUCKET, "v1.pt", base.to_bytes())
        runner = JobRunner(store, RUN_BUCKET, torch.device("cpu"), 0.0)  # type: ignore[arg-type]

        def ours(round_index: int) -> dict:
            job = TrainingJob(
                exploration_id="bench",
                version=2,
                base_checkpoint_key="v1.pt",
                running_checkpoint_key=f"v2-running-{round_index}.pt",
                references=tuple(f"s3://images/{n}" for n in names),
                decode_size=decode_size,
                seed=round_index,
                config=settings.train_config("lars", torch.device("cpu")),
                loader=settings.loader_config(),
            )
            waited_before = service.m_data_wait._sum.get()
            clock = time.perf_counter()
            outcome = runner.run(job, on_step=service._observe_step, should_stop=service.stopping.is_set)
            seconds = time.perf_counter() - clock
            waited = service.m_data_wait._sum.get() - waited_before
            return {"steps": outcome.result.steps, "seconds": seconds, "images_per_second": outcome.result.steps * BATCH / seconds, "final_loss": outcome.result.final_loss, "data_wait_seconds": waited, "images_decoded": outcome.loader_stats.images_read, "cache_hits": outcome.loader_stats.cache_hits}

        # The reference decodes everything before its clock starts.
        pixels = torch.stack([torch.from_numpy(data.decode_square((image_dir / n).read_bytes(), decode_size).copy()).permute(2, 0, 1) for n in names])

        def theirs(round_index: int) -> dict:
            return reference.run(pixels, BACKBONE, IMAGE_SIZE, BATCH, steps, base.config.mean, base.config.std, seed=round_index)

        # Warm-up (allocator, lazy imports) for both, not counted.
        reference.run(pixels, BACKBONE, IMAGE_SIZE, BATCH, 2, base.config.mean, base.config.std)
        rows = []
        for r in range(args.rounds):
            order = [("reference", theirs), ("ours", ours)] if r % 2 == 0 else [("ours", ours), ("reference", theirs)]
            row = {}
            for name, fn in order:
                row[name] = fn(r)
                print(f"round {r + 1}: {name:9s} {row[name]['steps']} steps in {row[name]['seconds']:.1f} s = {row[name]['images_per_second']:.1f} images/s", flush=True)
            rows.append(row)

    ref_rate = statistics.median(r["reference"]["images_per_second"] for r in rows)
    our_rate = statistics.median(r["ours"]["images_per_second"] for r in rows)
    ratio = our_rate / ref_rate
    print()
    print(f"{'':28s} {'reference (plain loop)':>24s} {'ours (service job)':>20s}")
    print(f"{'images/s (median of ' + str(args.rounds) + ')':28s} {ref_rate:24.1f} {our_rate:20.1f}")
    print(f"{'ratio ours / reference':28s} {ratio:45.3f}   goal >= {GOAL}: {'PASS' if ratio >= GOAL else 'FAIL'}")
    result = {
        "benchmark": "trainer",
        "date": started_at,
        "machine": before,
        "machine_after": machine(),
        "note": "shared 2-core machine with other sessions running; both sides alternate round by round and use the same torch thread count",
        "configuration": {"backbone": BACKBONE, "image_size": IMAGE_SIZE, "decode_size": decode_size, "batch": BATCH, "images": len(names), "epochs": args.epochs, "steps_per_round": steps, "torch_threads": args.threads, "decode_workers": settings.trainer_fetch_workers, "prefetch_batches": settings.trainer_prefetch_batches, "decode_cache_mb": settings.trainer_decode_cache_mb},
        "reference": {"what": "minimal plain-PyTorch MoCo-v3 loop (SGD, images decoded into memory before timing)", "images_per_second": ref_rate},
        "ours": {"what": "the service's TrainingJob via JobRunner: checkpoint load, streaming decode + prefetch + cache, LARS, schedules, service metrics", "images_per_second": our_rate},
        "rounds": rows,
        "ratio": ratio,
        "goal": f"ours / reference >= {GOAL}",
        "pass": ratio >= GOAL,
    }
    for row in rows:
        for side in row.values():
            side.pop("losses", None)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
