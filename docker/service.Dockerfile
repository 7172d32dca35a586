# syntax=docker/dockerfile:1.7
# The CPU image shared by planner, crawler, dedup, scorer and search: one image, one entry point
# per service (`python -m services.<name>`; the chart sets the module as the container's args).
#
#   docker build -f docker/service.Dockerfile -t internet-explorer/service:0.1.0 .
#
# Without PyTorch's CPU index (or any index), from a local wheelhouse (`pip download -d wheels ...`
# mounted or copied at /wheels; what k8s/cluster/build-images.sh does with buildah):
#   --build-arg TORCH_INDEX_URL=https://pypi.org/simple --build-arg PIP_FIND_LINKS=/wheels --build-arg PIP_NO_INDEX=1
#
# Any Debian-based image with python3 >= 3.10 and python3-venv can be the base (PYTHON_IMAGE): the
# steps call python3, never a python of the base's own PATH layout.
#
# Bases are pinned by exact version; pin them by digest too in a registry you control
# (--build-arg PYTHON_IMAGE=python:3.11.7-slim-bookworm@sha256:...).
#
# Layers, largest and most stable first: torch, the other dependencies (pyproject.toml's list), then
# the project's own sources (kilobytes). A code change rebuilds, pushes and pulls the last layer only.
# The virtual environment is built in the final stage itself, not copied from a build stage: a copy
# is a second multi-GB layer of the same files at every change, on the builder's disk and the node's.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

# ---- wordnet: WordNet 3.0 (Debian wordnet-base), the planner's default vocabulary -----------
# Unpacked here and copied, so the image neither keeps apt's lists nor fetches it on first use.
FROM ${PYTHON_IMAGE} AS wordnet
RUN apt-get update -qq \
 && cd /tmp && apt-get download wordnet-base \
 && dpkg-deb -x wordnet-base_*.deb /opt/debdata \
 && test -f /opt/debdata/usr/share/wordnet/data.noun \
 && rm -rf /tmp/*.deb /var/lib/apt/lists/*

# ---- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="internet-explorer-service" \
      org.opencontainers.image.description="Internet Explorer CPU services: planner, crawler, dedup, scorer, search" \
      org.opencontainers.image.licenses="Apache-2.0"
# torch comes from PyTorch's CPU index: the PyPI wheel pulls ~3 GB of CUDA libraries that no CPU
# service uses. The version matches pyproject.toml's pin.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# pip reads these from the environment: a directory of wheels, and whether to use it alone.
ARG PIP_FIND_LINKS=""
ARG PIP_NO_INDEX=0
# torch ships test helpers in newer Python syntax (torch/testing/_internal/py312_intrinsics.py):
# byte-compiling them fails the build on Python 3.11, and nothing imports them there.
ARG COMPILEALL_SKIP=/torch/testing/_internal/py3[0-9]+_intrinsics\.py$
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 iex \
 && useradd --system --uid 10001 --gid iex --home-dir /home/iex --create-home --shell /usr/sbin/nologin iex
COPY --from=wordnet /opt/debdata/usr/share/wordnet /usr/share/wordnet
RUN python3 -m venv /opt/iex
ENV PATH=/opt/iex/bin:$PATH
# Each layer byte-compiles what it installed, so that no later layer rewrites (copies) its files.
RUN pip install --upgrade pip wheel \
 && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && python -m compileall -q -x "$COMPILEALL_SKIP" /opt/iex
# The dependencies pyproject.toml lists (the file alone: a code change does not reinstall them).
COPY pyproject.toml /src/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt \
 && python -m compileall -q -x "$COMPILEALL_SKIP" /opt/iex
# The project itself.
COPY README.md /src/README.md
COPY protos /src/protos
COPY services /src/services
RUN pip install --no-deps /src \
 && rm -rf /src \
 && python -c "import services.planner.service, services.crawler.service, services.dedup.service, services.scorer.service, services.search.service" \
 && python -m compileall -q -x "$COMPILEALL_SKIP" /opt/iex
# HOME and caches under /tmp: pods run with a read-only root file system and an emptyDir at /tmp.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    IEX_WORDNET_DIR=/usr/share/wordnet \
    IEX_GRPC_HOST=0.0.0.0
USER 10001:10001
WORKDIR /home/iex
# planner gRPC; each service's ports are set by the chart (IEX_GRPC_PORT, IEX_METRICS_PORT).
EXPOSE 50051 9101
ENTRYPOINT ["python", "-m"]
CMD ["services.planner"]
