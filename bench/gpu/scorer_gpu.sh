#!/usr/bin/env bash
# PREPARED, NOT RUN: the scorer's GPU benchmark (production Triton config on an NVIDIA H200).
# Run from the repository root on the GPU machine:  bash bench/gpu/scorer_gpu.sh
# Optional: TRITONSERVER=/opt/tritonserver/bin/tritonserver (a build with backends/onnxruntime),
#           PYTHON=python3, EXTRA_ARGS="--tensorrt-fp16 --batches 64,128,256".
# Writes bench/results/scorer_gpu.json; copy the table it prints into bench/README.md (scorer section).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
"$PYTHON" - <<'PY'
import importlib.util, sys
missing = [m for m in ("torch", "timm", "onnx", "numpy", "tritonclient.grpc") if importlib.util.find_spec(m.split(".")[0]) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)} (the GPU machine has no network: bring them with the environment)")
import torch
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
print("GPU:", torch.cuda.get_device_name(0))
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# Each path x batch size measures for --seconds (default 10): about 2-4 minutes in all on one GPU.
exec timeout 540 "$PYTHON" -m bench.gpu.scorer_gpu ${EXTRA_ARGS:-} "$@"
