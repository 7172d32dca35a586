"""PREPARED, NOT RUN: scorer embedding throughput on an NVIDIA GPU (H200) with the production config.

Status: written and checked on CPU (argument parsing, export, repository layout with the production
config; `--dry-run`), never run on a GPU: no device was lent to the session that wrote it. Run it
with bench/gpu/scorer_gpu.sh on the GPU machine and put the figures in bench/README.md.

What it measures, same model (default ResNet-50 @224, the production backbone), same pixels:

- Triton (official image / a tritonserver with the onnxruntime backend): the production config
  written by services.common.modelrepo (platform onnxruntime_onnx, KIND_GPU instance groups,
  dynamic batching; `--tensorrt-fp16` adds the TensorRT execution accelerator), called through the
  scorer's own client (services.common.modelrepo.TritonEncoder) at each batch size, with several
  requests in flight as the scorer sends them;
- torch eager on the GPU, in-process (fp32; and fp16 autocast + channels_last as torch's best case);
- onnxruntime with the CUDA execution provider, in-process, on the same exported graph.

Requirements on the machine (nothing is installed by this script; the GPU machine has no network):
torch with CUDA, timm, onnx, numpy, tritonclient[grpc], onnxruntime-gpu (optional: its row is
skipped without it), and a tritonserver binary with backends/onnxruntime (TRITONSERVER=/path or
/opt/tritonserver/bin/tritonserver; optional: Triton rows are skipped without it, and the JSON says so).

    python -m bench.gpu.scorer_gpu [--model resnet50] [--batches 32,64,128] [--in-flight 4] [--seconds 10]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from services.common import endpoints
from services.common import modelrepo as mr

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "scorer_gpu.json"
MODEL_NAME = "encoder"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TRITON_CANDIDATES = ("/opt/tritonserver/bin/tritonserver",)


def find_tritonserver() -> Path | None:
    for candidate in (os.environ.get("TRITONSERVER"), shutil.which("tritonserver"), *TRITON_CANDIDATES):
        if candidate and Path(candidate).is_file():
            binary = Path(candidate)
            if (binary.parent.parent / "backends" / "onnxruntime").is_dir():
                return binary
    return None


def production_repository(onnx_path: Path, root: Path, image_size: int, dim: int, max_batch: int, instances: int, tensorrt_fp16: bool) -> Path:
    """The repository as the deployment installs it: config.production.pbtxt becomes config.pbtxt."""
    spec = mr.EncoderModelSpec(MODEL_NAME, image_size, dim, max_batch_size=max_batch, instance_count=instances, tensorrt_fp16=tensorrt_fp16)
    repository = root / "models"
    mr.write_model_version(repository, MODEL_NAME, 1, onnx_path, image_size, dim, max_batch, spec=spec)
    model_dir = repository / MODEL_NAME
    shutil.copyfile(model_dir / mr.PRODUCTION_CONFIG_FILENAME, model_dir / mr.CONFIG_FILENAME)
    (model_dir / "1" / mr.PYTHON_MODEL_FILENAME).unlink()  # the official image serves model.onnx itself
    return repository


def throughput(fn: Callable[[], int], seconds: float, sync: Callable[[], None] = lambda: None) -> float:
    fn()
    sync()  # warm
    images, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        images += fn()
    sync()
    return images / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu.scorer_gpu", description="PREPARED, NOT RUN: scorer GPU throughput")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", default="32,64,128", help="comma-separated batch sizes")
    parser.add_argument("--in-flight", type=int, default=4, help="requests in flight on the Triton path (scorer: IEX_SCORER_MAX_INFLIGHT_BATCHES)")
    parser.add_argument("--instances", type=int, default=2, help="Triton instance_group count on the GPU")
    parser.add_argument("--tensorrt-fp16", action="store_true", help="production config with the TensorRT accelerator (fp16)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per path and batch size")
    parser.add_argument("--dry-run", action="store_true", help="export and write the repository only (works on CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]

    import timm
    import torch

    work = Path(tempfile.mkdtemp(prefix="iex-scorer-gpu-"))
    model = timm.create_model(args.model, pretrained=False, num_classes=0).eval()
    onnx_path = work / "model.onnx"
    mr.export_encoder_onnx(model, args.size, onnx_path, MEAN, STD)
    dim = mr.read_onnx_signature(onnx_path).embedding_dim
    repository = production_repository(onnx_path, work, args.size, dim, max(batches), args.instances, args.tensorrt_fp16)
    config = (repository / MODEL_NAME / mr.CONFIG_FILENAME).read_text()
    print(f"repository: {repository}; " + ", ".join(line for line in config.splitlines() if line.startswith(("platform", "instance_group"))))
    if args.dry_run:
        shutil.rmtree(work, ignore_errors=True)
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark is for the GPU machine", file=sys.stderr)
        return 2

    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(0)
    rows: dict[str, dict[int, float]] = {}
    rng = np.random.default_rng(0)
    inputs = {b: rng.integers(0, 256, (b, args.size, args.size, 3), dtype=np.uint8) for b in batches}
    scale = 1.0 / (255.0 * torch.tensor(STD, device=device).view(1, 3, 1, 1))
    shift = -torch.tensor(MEAN, device=device).view(1, 3, 1, 1) / torch.tensor(STD, device=device).view(1, 3, 1, 1)
    gpu_model = model.to(device)

    def torch_path(fp16: bool) -> Callable[[np.ndarray], int]:
        net = gpu_model.to(memory_format=torch.channels_last) if fp16 else gpu_model

        def run(images: np.ndarray) -> int:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
                x = torch.from_numpy(images).to(device, non_blocking=True).permute(0, 3, 1, 2).float() * scale + shift
                if fp16:
                    x = x.contiguous(memory_format=torch.channels_last)
                out = torch.nn.functional.normalize(net(x).float(), dim=1).cpu()  # to host, as the scorer needs it
            return int(out.shape[0])

        return run

    for name, fp16 in (("torch eager fp32 (in-process)", False), ("torch eager fp16 autocast, channels_last (in-process)", True)):
        run = torch_path(fp16)
        rows[name] = {b: throughput(lambda b=b: run(inputs[b]), args.seconds, torch.cuda.synchronize) for b in batches}
        print(name, rows[name])

    notes: list[str] = []
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            session = ort.InferenceSession(str(onnx_path), providers=["CUDAExecutionProvider"])
            name = "onnxruntime CUDA EP (in-process)"
            rows[name] = {b: throughput(lambda b=b: session.run([mr.OUTPUT_NAME], {mr.INPUT_NAME: inputs[b]})[0].shape[0], args.seconds) for b in batches}
            print(name, rows[name])
        else:
            notes.append("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu): row skipped")
    except ImportError:
        notes.append("onnxruntime not installed: row skipped")

    binary = find_tritonserver()
    if binary is None:
        notes.append("no tritonserver with the onnxruntime backend (set TRITONSERVER): Triton rows skipped")
    else:
        grpc_port, http_port, metrics_port = endpoints.free_listen_port(), endpoints.free_listen_port(), endpoints.free_listen_port()
        log_path = work / "tritonserver.log"
        with open(log_path, "wb") as log:
            server = subprocess.Popen(  # noqa: S603 - fixed argv
                [
                    str(binary),
                    f"--model-repository={repository}",
                    "--model-control-mode=explicit",
                    f"--grpc-port={grpc_port}",
                    f"--http-port={http_port}",
                    f"--metrics-port={metrics_port}",
                    "--exit-timeout-secs=10",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            client = mr.TritonEncoder(f"127.0.0.1:{grpc_port}", max_in_flight=args.in_flight, timeout_s=120.0, load_timeout_s=900.0)
            deadline = time.monotonic() + 120
            while not client.server_ready():
                if server.poll() is not None or time.monotonic() > deadline:
                    print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
                    return 3
                time.sleep(0.5)
            client.load(MODEL_NAME, 1)
            # Correctness first: Triton must return the embeddings torch fp32 computes.
            with torch.inference_mode():
                x = torch.from_numpy(inputs[batches[0]]).to(device).permute(0, 3, 1, 2).float() * scale + shift
                reference = torch.nn.functional.normalize(gpu_model(x), dim=1).cpu().numpy()
            got = client.embed(MODEL_NAME, 1, inputs[batches[0]])
            cosine = float(np.min(np.sum(reference * got, axis=1)))
            notes.append(f"Triton vs torch fp32 embeddings: min cosine {cosine:.5f}")
            name = f"Triton onnxruntime_onnx KIND_GPU x{args.instances}{' +TensorRT fp16' if args.tensorrt_fp16 else ''}, {args.in_flight} in flight"
            rows[name] = {}
            for b in batches:
                stream = np.concatenate([inputs[b]] * (2 * args.in_flight))
                rows[name][b] = throughput(lambda b=b, stream=stream: client.embed(MODEL_NAME, 1, stream, batch_size=b).shape[0], args.seconds)
            print(name, rows[name])
            client.close()
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)

    print()
    print("| path | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|" + "---:|" * len(batches))
    for name, by_batch in rows.items():
        print(f"| {name} | " + " | ".join(f"{by_batch[b]:.0f}" for b in batches) + " |")
    for note in notes:
        print("note:", note)
    result = {
        "benchmark": "scorer embedding throughput on GPU (production Triton config)",
        "status": "run",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"gpu": gpu, "cpu_cores": os.cpu_count()},
        "model": args.model,
        "image_size": args.size,
        "images_per_second": {name: {str(b): v for b, v in by_batch.items()} for name, by_batch in rows.items()},
        "notes": notes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
