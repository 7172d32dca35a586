#!/bin/sh
# tritonserver of nvidia-pytriton with its python backend: the stub embeds libpython and must load
# this image's; the first python3 on PATH (the venv's) gives model.py its numpy and onnxruntime.
set -eu
. /opt/triton/env
export LD_LIBRARY_PATH="$TRITON_LD_LIBRARY_PATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="/opt/triton/bin:$PATH"
exec "$TRITON_ROOT/bin/tritonserver" \
  --backend-directory="$TRITON_BACKENDS" \
  --cache-directory=/tmp/triton-cache \
  --backend-config=python,shm-region-prefix-name=iex_triton_ \
  "$@"
