"""Scorer embedding throughput: Triton vs in-process torch (eager) vs in-process onnxruntime.

Same model, same batch, same pixels, same thread budget on the three paths:

- torch eager: the timm model in this process, uint8 NHWC in, the encoder's preprocessing and
  L2 normalisation in torch (what "just load the model in the scorer" would cost);
- onnxruntime: the exported graph (services.common.modelrepo) in this process;
- Triton: that graph served by the local tritonserver (nvidia-pytriton wheel: python backend running
  onnxruntime, the config the stack serves), called through the scorer's client over gRPC, one
  request in flight (same batch as the others) and pipelined (the scorer's default: several in
  flight, the dynamic batcher free to merge).

Rounds alternate between the paths so that load from other processes hits all of them alike; the
median of the rounds is reported. Goal (issue #5): Triton >= 0.9x in-process torch eager; the ratio
to in-process onnxruntime is reported as well (the cost of serving: gRPC, shared memory, queue).

    python -m bench.scorer [--model tf_efficientnet_lite0] [--size 224] [--batch 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from services.common import modelrepo as mr

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "scorer.json"
MODEL_NAME = "bench_encoder"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
GOAL = 0.9
SECONDS_PER_PATH = 3.0  # per round: enough batches to smooth a 2-core machine, few enough to alternate often


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def torch_encoder(model, mean, std):
    """uint8 NHWC -> unit-norm embeddings, the math the exported graph carries."""
    import torch
    import torch.nn.functional as F

    scale = 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1))
    shift = -torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1)

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() * scale + shift
            return F.normalize(model(x), dim=1).numpy()

    return run


def timed(fn: Callable[[], int], seconds: float, calls: int) -> float:
    """Images per second over `calls` calls of fn (each returns the images it embedded)."""
    started = time.perf_counter()
    images = sum(fn() for _ in range(calls))
    return images / (time.perf_counter() - started)


def calls_for(fn: Callable[[], int], seconds: float) -> int:
    started = time.perf_counter()
    fn()
    once = max(time.perf_counter() - started, 1e-3)
    return max(1, min(40, round(seconds / once)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scorer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0", help="timm model (weights do not change throughput; random init)")
    parser.add_argument("--size", type=int, default=224, help="input size")
    parser.add_argument("--batch", type=int, default=32, help="images per request / per in-process call")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads of every path (default: all cores)")
    parser.add_argument("--in-flight", type=int, default=2, help="requests in flight for the pipelined Triton path")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON results go")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import timm
    import torch

    from bench.scorer.triton_server import private_tritonserver

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="iex-bench-scorer-"))
    model = timm.create_model(args.model, pretrained=False, num_classes=0).eval()
    onnx_path = work / "model.onnx"
    mr.export_encoder_onnx(model, args.size, onnx_path, MEAN, STD)
    dim = mr.read_onnx_signature(onnx_path).embedding_dim
    spec = mr.EncoderModelSpec(MODEL_NAME, args.size, dim, max_batch_size=max(64, args.batch), cpu_threads=args.threads)
    repository = work / "models"
    mr.write_model_version(repository, MODEL_NAME, 1, onnx_path, args.size, dim, spec.max_batch_size, spec=spec)

    images = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    pipelined_images = np.concatenate([images] * (2 * args.in_flight))

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
    run_torch = torch_encoder(model, MEAN, STD)

    print(f"{args.model} @{args.size}, batch {args.batch}, {args.threads} thread(s) per path, {args.rounds} alternating rounds")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, load average {load_before[0]:.2f} at start")
    with private_tritonserver(repository, work, ort_threads=args.threads) as address:
        sequential = mr.TritonEncoder(address, max_in_flight=1, timeout_s=120.0, load_timeout_s=300.0)
        pipelined = mr.TritonEncoder(address, max_in_flight=args.in_flight, timeout_s=120.0)
        try:
            sequential.load(MODEL_NAME, 1)
            paths: dict[str, Callable[[], int]] = {
                "torch eager (in-process)": lambda: run_torch(images).shape[0],
                "onnxruntime (in-process)": lambda: session.run([mr.OUTPUT_NAME], {mr.INPUT_NAME: images})[0].shape[0],
                "Triton, 1 request in flight": lambda: sequential.embed(MODEL_NAME, 1, images, batch_size=args.batch).shape[0],
                f"Triton, {args.in_flight} requests in flight": lambda: pipelined.embed(
                    MODEL_NAME, 1, pipelined_images, batch_size=args.batch
                ).shape[0],
            }
            # The three paths must compute the same thing before their speed means anything.
            want = run_torch(images)
            for name, got in (
                ("onnxruntime", session.run([mr.OUTPUT_NAME], {mr.INPUT_NAME: images})[0]),
                ("Triton", sequential.embed(MODEL_NAME, 1, images)),
            ):
                cosine = float(np.min(np.sum(want * got, axis=1)))
                if cosine < 0.999:
                    print(f"{name} embeddings differ from torch (min cosine {cosine:.5f}): not the same model", file=sys.stderr)
                    return 1
            calls = {name: calls_for(fn, SECONDS_PER_PATH) for name, fn in paths.items()}  # doubles as warm-up
            samples: dict[str, list[float]] = {name: [] for name in paths}
            names = list(paths)
            for round_index in range(args.rounds):
                # Rotate the order: no path always runs first (or right after the slowest one).
                for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
                    samples[name].append(timed(paths[name], SECONDS_PER_PATH, calls[name]))
                print(f"  round {round_index + 1}: " + ", ".join(f"{n.split(' (')[0].split(',')[0]} {samples[n][-1]:.1f}" for n in names))
        finally:
            sequential.close()
            pipelined.close()
    load_after = os.getloadavg()
    shutil.rmtree(work, ignore_errors=True)

    median = {name: statistics.median(values) for name, values in samples.items()}
    torch_ips = median["torch eager (in-process)"]
    ort_ips = median["onnxruntime (in-process)"]
    triton_ips = median["Triton, 1 request in flight"]
    triton_pipelined_ips = median[f"Triton, {args.in_flight} requests in flight"]
    print()
    print("| path | images/s (median) | min .. max | vs torch eager | vs onnxruntime |")
    print("|---|---:|---:|---:|---:|")
    for name, values in samples.items():
        print(f"| {name} | {median[name]:.1f} | {min(values):.1f} .. {max(values):.1f} | {median[name] / torch_ips:.2f}x | {median[name] / ort_ips:.2f}x |")
    passed = triton_ips >= GOAL * torch_ips
    print()
    print(f"goal: Triton >= {GOAL}x in-process torch eager: {triton_ips / torch_ips:.2f}x -> {'PASS' if passed else 'FAIL'}")
    print(f"Triton vs in-process onnxruntime (same graph): {triton_ips / ort_ips:.2f}x (1 in flight), {triton_pipelined_ips / ort_ips:.2f}x (pipelined)")
    busy = max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1)
    if busy:
        print(f"note: the machine was shared (load average {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} cores); figures are noisy")

    result = {
        "benchmark": "scorer embedding throughput: Triton vs in-process",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average_start": load_before[0], "load_average_end": load_after[0], "shared": busy},
        "model": args.model,
        "image_size": args.size,
        "batch": args.batch,
        "threads_per_path": args.threads,
        "rounds": args.rounds,
        "triton": "nvidia-pytriton tritonserver, python backend running onnxruntime (CPU), explicit model control",
        "images_per_second": {name: {"median": median[name], "samples": values} for name, values in samples.items()},
        "ratio": {
            "triton_vs_torch_eager": triton_ips / torch_ips,
            "triton_vs_onnxruntime": triton_ips / ort_ips,
            "triton_pipelined_vs_torch_eager": triton_pipelined_ips / torch_ips,
            "triton_pipelined_vs_onnxruntime": triton_pipelined_ips / ort_ips,
        },
        "goal": f"Triton path >= {GOAL}x in-process torch eager (same model, same batch)",
        "pass": passed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
