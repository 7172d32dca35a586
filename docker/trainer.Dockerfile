# syntax=docker/dockerfile:1.7
# The GPU trainer: the same project with PyPI's CUDA build of torch (its wheels carry the CUDA
# runtime, cuDNN and NCCL), so the base needs no CUDA toolkit; the node supplies the driver through
# the NVIDIA container runtime (a driver new enough for torch's CUDA 13 build).
#
#   docker build -f docker/trainer.Dockerfile -t internet-explorer/trainer:0.1.0 .
#
# From a local wheelhouse instead of an index: --build-arg PIP_FIND_LINKS=/wheels --build-arg PIP_NO_INDEX=1
# (see docker/service.Dockerfile).
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

# Layers as in docker/service.Dockerfile: torch, the other dependencies, then the project's sources,
# the environment built in the final image itself (no multi-GB copy from a build stage).
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="internet-explorer-trainer" \
      org.opencontainers.image.description="Internet Explorer GPU trainer (MoCo-v3 on target + web images, ONNX export for Triton)" \
      org.opencontainers.image.licenses="Apache-2.0"
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG PIP_FIND_LINKS=""
ARG PIP_NO_INDEX=0
# torch ships test helpers in newer Python syntax (torch/testing/_internal/py312_intrinsics.py):
# byte-compiling them fails the build on Python 3.11, and nothing imports them there.
ARG COMPILEALL_SKIP=/torch/testing/_internal/py3[0-9]+_intrinsics\.py$
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 iex \
 && useradd --system --uid 10001 --gid iex --home-dir /home/iex --create-home --shell /usr/sbin/nologin iex
RUN python3 -m venv /opt/iex
ENV PATH=/opt/iex/bin:$PATH
# torch and torchvision at the versions pyproject.toml pins (CUDA build from PyPI).
RUN pip install --upgrade pip wheel \
 && pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && python -m compileall -q -x "$COMPILEALL_SKIP" /opt/iex
COPY pyproject.toml /src/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt \
 && python -m compileall -q -x "$COMPILEALL_SKIP" /opt/iex
COPY README.md /src/README.md
COPY protos /src/protos
COPY services /src/services
RUN pip install --no-deps /src \
 && rm -rf /src \
 && python -c "import services.trainer.service" \
 && python -m compileall -q -x "$COMPILEALL_SKIP" /opt/iex
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    IEX_GRPC_HOST=0.0.0.0 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /home/iex
EXPOSE 50055 9105
ENTRYPOINT ["python", "-m"]
CMD ["services.trainer"]
