#!/usr/bin/env bash
# PREPARED, NOT RUN: the trainer's GPU benchmark (ResNet-50, 224 px, bf16, batch 256, DDP on one GPU).
# Run from the repository root on the GPU machine:  bash bench/gpu/trainer_gpu.sh
# Optional: PYTHON=python3, EXTRA_ARGS="--compile on --epochs 4".
# Writes bench/results/trainer_gpu.json; copy the table it prints into bench/README.md (trainer section).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
"$PYTHON" - <<'PY'
import importlib.util, sys
missing = [m for m in ("torch", "torchvision", "timm", "numpy", "PIL") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)} (the GPU machine has no network: bring them with the environment)")
import torch
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
print("GPU:", torch.cuda.get_device_name(0), "| bf16:", torch.cuda.is_bf16_supported())
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# Image generation (~20 s) + compile-on run (~2-3 min with compilation) + compile-off run (~1 min).
exec timeout 570 "$PYTHON" -m bench.gpu.trainer_gpu ${EXTRA_ARGS:-} "$@"
