# syntax=docker/dockerfile:1.7
# Triton with the python backend only: the tritonserver build of PyPI nvidia-pytriton, the same
# server the local stack runs (services/stack/servers.py). model.py (written by the trainer beside
# each ONNX export) runs the model with onnxruntime on CPU. For clusters that cannot pull NVIDIA's
# image (nvcr.io/nvidia/tritonserver, ~15 GB): the chart selects it with
#   --set triton.image.repository=internet-explorer/triton-python --set triton.modelConfigName=local
#
#   docker build -f docker/triton-python.Dockerfile -t internet-explorer/triton-python:0.1.0 .
#
# The base must be the Python the stub was built for (3.8-3.11) with a shared libpython.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG PIP_FIND_LINKS=""
ARG PIP_NO_INDEX=0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/triton
ENV PATH=/opt/triton/bin:$PATH
# nvidia-pytriton 0.5 needs numpy 1.x; onnxruntime is what model.py runs the export with.
RUN pip install --upgrade pip wheel \
 && pip install "nvidia-pytriton>=0.5,<0.6" "numpy>=1.26,<2" "onnxruntime>=1.18"
COPY docker/triton/assemble.py /tmp/assemble.py
# The backend directory Triton expects (python backend + the stub of this Python), and an
# environment file for the launcher: libpython's directory and the wheel's vendored libraries.
# torch ships test helpers in newer Python syntax (torch/testing/_internal/py312_intrinsics.py):
# byte-compiling them fails the build on Python 3.11, and nothing imports them there.
ARG COMPILEALL_SKIP=/torch/testing/_internal/py3[0-9]+_intrinsics\.py$
RUN python /tmp/assemble.py /opt/triton/backends /opt/triton/env \
 && python -m compileall -q -x "$COMPILEALL_SKIP" /opt/triton

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="internet-explorer-triton-python" \
      org.opencontainers.image.description="tritonserver (python backend, from PyPI nvidia-pytriton) for Internet Explorer's encoder" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/triton /opt/triton
COPY docker/triton/tritonserver.sh /usr/local/bin/tritonserver
ENV PATH=/opt/triton/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
# The chart runs Triton as uid 1000 (the official image's triton-server user).
USER 1000:1000
EXPOSE 8000 8001 8002
ENTRYPOINT ["tritonserver"]
