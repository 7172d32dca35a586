"""PREPARED, NOT RUN: MoCo-v3 training throughput on one NVIDIA GPU (H200), data loading included.

Status: written and checked on CPU (`--smoke` runs the whole script with a tiny model), never run
on a GPU: no device was lent to the session that wrote it. Run it with bench/gpu/trainer_gpu.sh on
the GPU machine and put the figures in bench/README.md (trainer section).

What it measures: the trainer's own training job (`python -m services.trainer.run` under torchrun,
one process: DistributedDataParallel on one GPU, the production path) on ResNet-50 at 224 px, bf16
autocast, channels-last, global batch 256, 4096-wide MoCo-v3 heads, LARS: the full MoCo-v3 step
(two views through the base encoder with backward, two through the momentum encoder), with the
images streamed from local disk as JPEGs by the decode workers, and

- images/s over the steps after warm-up (torch.compile and cuDNN autotuning excluded),
- the same split into the first epoch (every image decoded from JPEG) and later epochs (decoded
  pixels served from the cache), and the share of step time spent waiting for data,
- peak GPU memory (torch's allocator).

Goal: >= 2,500 images/s, so that one paper-sized iteration (25k new + 50k replay/target images,
10 epochs) trains in about 5 minutes. Runs compile on and off when time allows.
Writes bench/results/trainer_gpu.json.

    python -m bench.gpu.trainer_gpu [--images 4096] [--epochs 3] [--batch 256] [--compile on,off]
    python -m bench.gpu.trainer_gpu --smoke      # CPU plumbing check with a tiny model
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "trainer_gpu.json"
GOAL_IMAGES_PER_SECOND = 2500.0
PAPER_ITERATION_IMAGES = 75_000
PAPER_EPOCHS = 10
PAPER_ITERATIONS = 40


def _make_image(args: tuple[Path, int]) -> None:
    """A web-photo-sized JPEG (400-640 px wide, 3:4 or 4:3) of smooth colour fields and noise."""
    from PIL import Image

    path, index = args
    rng = np.random.default_rng(index)
    w = int(rng.integers(400, 641))
    h = int(w * (0.75 if index % 2 else 1.333))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, size=3)
    slope = rng.uniform(-0.4, 0.4, size=(2, 3))
    pixels = base + xx[..., None] * slope[0] + yy[..., None] * slope[1] + rng.normal(0, 18, size=(h, w, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=88)
    path.write_bytes(buffer.getvalue())


def make_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(folder / f"{i:06d}.jpg", i) for i in range(count) if not (folder / f"{i:06d}.jpg").exists()]
    with ProcessPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1)) as pool:
        list(pool.map(_make_image, todo, chunksize=32))


def run_once(images: Path, out: Path, args: argparse.Namespace, compile_mode: str, timeout_s: float) -> dict:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
        "-m", "services.trainer.run",
        "--images", str(images), "--out", str(out),
        "--backbone", args.backbone, "--image-size", str(args.image_size), "--batch-size", str(args.batch),
        "--mlp-dim", str(args.mlp_dim), "--projection-dim", "256", "--epochs", str(args.epochs),
        "--precision", args.precision, "--compile", compile_mode, "--channels-last", "on" if args.device == "cuda" else "off",
        "--workers", str(args.workers), "--prefetch", str(args.prefetch), "--cache-mb", str(args.cache_mb),
        "--warmup-steps", str(args.warmup_steps), "--device", args.device,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1" if args.smoke else "4"))
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - started
    tail = (done.stdout[-3000:] + "\n" + done.stderr[-3000:]).strip()
    if done.returncode != 0:
        return {"compile": compile_mode, "ok": False, "returncode": done.returncode, "wall_seconds": wall, "output_tail": tail}
    report = json.loads((out / "report.json").read_text())
    steps_per_epoch = args.images // args.batch
    losses = report.pop("losses")
    split = epoch_split(report, args.batch, steps_per_epoch, args.warmup_steps)
    report.pop("step_seconds")
    report.pop("step_data_wait_seconds")
    return {"compile": compile_mode, "ok": True, "wall_seconds": wall, "steps_per_epoch": steps_per_epoch, "first_loss": losses[0], "last_loss": losses[-1], **split, **report}


def epoch_split(report: dict, batch: int, steps_per_epoch: int, warmup: int) -> dict:
    """Images/s and data-wait share of the first epoch (every image decoded from JPEG) and of the
    later ones (decoded pixels from the cache), warm-up steps left out."""
    seconds, waits = report["step_seconds"], report["step_data_wait_seconds"]
    out = {}
    for name, steps in (("first_epoch", range(warmup, min(steps_per_epoch, len(seconds)))), ("later_epochs", range(max(warmup, steps_per_epoch), len(seconds)))):
        total = sum(seconds[i] for i in steps)
        if steps and total > 0:
            out[name] = {"steps": len(steps), "images_per_second": len(steps) * batch / total, "data_wait_share": sum(waits[i] for i in steps) / total}
    return out


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu.trainer_gpu")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--mlp-dim", type=int, default=4096)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--compile", default="on,off", help="compile modes to run, in order")
    p.add_argument("--workers", type=int, default=max(2, (os.cpu_count() or 4) - 2), help="decode threads")
    p.add_argument("--prefetch", type=int, default=6)
    p.add_argument("--cache-mb", type=int, default=16384, help="decoded-pixel cache (a GPU node holds a paper-sized iteration in ~15 GB)")
    p.add_argument("--warmup-steps", type=int, default=8)
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget-s", type=float, default=500.0, help="stop starting new runs past this")
    p.add_argument("--smoke", action="store_true", help="CPU plumbing check: tiny model, few images")
    args = p.parse_args()
    if args.smoke:
        args.images, args.epochs, args.batch, args.backbone, args.image_size, args.mlp_dim = 64, 2, 16, "test_resnet", 32, 64
        args.precision, args.compile, args.workers, args.device, args.warmup_steps, args.cache_mb = "fp32", "off", 2, "cpu", 1, 64

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    gpu_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (smoke)"
    begin = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="iex-trainer-gpu-"))
    images = work / "images"
    make_images(images, args.images)
    print(f"{args.images} JPEGs ready in {time.perf_counter() - begin:.0f} s under {images}", flush=True)

    runs = []
    for mode in [m.strip() for m in args.compile.split(",") if m.strip()]:
        left = args.budget_s - (time.perf_counter() - begin)
        if left < 120 and runs:
            print(f"skipping compile={mode}: {left:.0f} s left of the budget", flush=True)
            break
        out = work / f"run-compile-{mode}"
        result = run_once(images, out, args, mode, timeout_s=max(60.0, left))
        runs.append(result)
        if result["ok"]:
            print(f"compile={mode}: {result['images_per_second']:.0f} images/s after {args.warmup_steps} warm-up steps, data wait {100 * result['data_wait_share']:.1f}% of step time, peak GPU memory {result['gpu_memory_peak_bytes'] / 2**30:.1f} GiB", flush=True)
        else:
            print(f"compile={mode}: FAILED (rc {result['returncode']})\n{result['output_tail']}", flush=True)

    ok = [r for r in runs if r["ok"]]
    best = max(ok, key=lambda r: r["images_per_second"]) if ok else None
    rate = best["images_per_second"] if best else 0.0
    iteration_minutes = PAPER_ITERATION_IMAGES * PAPER_EPOCHS / rate / 60 if rate else None
    result = {
        "benchmark": "trainer_gpu",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"gpu": gpu_name, "cpu_cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda},
        "configuration": {k: getattr(args, k) for k in ("images", "epochs", "batch", "backbone", "image_size", "mlp_dim", "precision", "workers", "prefetch", "cache_mb", "warmup_steps", "smoke")},
        "runs": runs,
        "best_images_per_second": rate,
        "paper_iteration_minutes": iteration_minutes,
        "paper_run_gpu_hours": iteration_minutes * PAPER_ITERATIONS / 60 if iteration_minutes else None,
        "goal": f">= {GOAL_IMAGES_PER_SECOND:.0f} images/s (full MoCo-v3 step, data loading included)",
        "pass": rate >= GOAL_IMAGES_PER_SECOND,
    }
    # A smoke run proves the plumbing only: its figures stay out of bench/results.
    target = work / "trainer_gpu_smoke.json" if args.smoke else RESULTS
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(images, ignore_errors=True)
    print()
    print("| run | images/s (after warm-up) | first epoch (JPEG decode) | later epochs (cache) | data wait | peak GPU memory |")
    print("|---|---|---|---|---|---|")
    for r in ok:
        first = r.get("first_epoch", {}).get("images_per_second", 0.0)
        later = r.get("later_epochs", {}).get("images_per_second", 0.0)
        print(f"| compile {r['compile']} | {r['images_per_second']:.0f} | {first:.0f} | {later:.0f} | {100 * r['data_wait_share']:.1f}% | {r['gpu_memory_peak_bytes'] / 2**30:.1f} GiB |")
    if iteration_minutes:
        print(f"paper-sized iteration ({PAPER_ITERATION_IMAGES} images x {PAPER_EPOCHS} epochs): {iteration_minutes:.1f} min; {PAPER_ITERATIONS} iterations: {result['paper_run_gpu_hours']:.1f} GPU-hours")
    print(f"wrote {target}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
