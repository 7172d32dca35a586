#!/usr/bin/env bash
# Builds the cluster's images with buildah (no registry is reachable: every base is made here from
# a debootstrap rootfs) into buildah's storage under $IEX_CLUSTER_CACHE/containers. An image is
# rebuilt only when its inputs change (a stamp of their hash). up.sh imports them into containerd.
#
#   internet-explorer/service, /trainer    docker/service.Dockerfile, docker/trainer.Dockerfile
#                                          (the project at HEAD; wheels from a local wheelhouse)
#   internet-explorer/triton-python        docker/triton-python.Dockerfile (nvidia-pytriton's tritonserver)
#   internet-explorer/kafka                docker/kafka.Dockerfile (Maven Central jars + Debian JRE)
#   internet-explorer/minio                docker/minio.Dockerfile (go install github.com/minio/minio)
#   iex-cluster/prometheus, coredns, pause k8s/cluster/images/ (the cluster's own pods)
source "$(dirname "$0")/env.sh"
IMAGE_TAG=${IMAGE_TAG:-$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$IEX_CLUSTER_ROOT/helm/internet-explorer/Chart.yaml")}
ONLY=${IEX_CLUSTER_IMAGES:-service triton kafka minio prometheus coredns pause}  # add "trainer" for docker/trainer.Dockerfile (another ~7 GB)
WHEELHOUSE=$IEX_CLUSTER_CACHE/wheelhouse
KAFKA_VERSION=4.1.1
MINIO_BIN=${IEX_MINIO_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/iex/bin/minio}
STAMPS=$IEX_CLUSTER_CACHE/images/stamps
mkdir -p "$STAMPS"

bh() { "${NICE[@]}" buildah --root "$IEX_CLUSTER_CACHE/containers/storage" --runroot /run/iex-cluster-buildah --storage-driver overlay "$@"; }
want() { [[ " $ONLY " == *" $1 "* ]]; }
fresh() { # name key: true when the image exists with that stamp
  [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ] && bh inspect --type image "$3" >/dev/null 2>&1
}
hash_of() { sha256sum | cut -c1-16; }

base_image() { # name rootfs-tar ref
  local name=$1 tar=$2 ref=$3 key
  key=$(sha256sum < "$tar" | cut -c1-16)
  if fresh "$name" "$key" "$ref"; then log "image $ref: cached"; return; fi
  log "image $ref: from $tar"
  local c mnt
  c=$(bh from scratch); mnt=$(bh mount "$c")
  "${NICE[@]}" tar -C "$mnt" --numeric-owner -xf "$tar"
  bh umount "$c" >/dev/null
  bh config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 --cmd /bin/bash "$c"
  bh commit -q --rm "$c" "$ref" >/dev/null
  echo "$key" > "$STAMPS/$name"
}

bud() { # name ref key context dockerfile [args...]
  local name=$1 ref=$2 key=$3 ctx=$4 file=$5; shift 5
  if fresh "$name" "$key" "$ref"; then log "image $ref: cached"; return; fi
  # What a failed build left goes first. The previous build stays: its layers are this build's
  # cache (--layers), so a change of the sources alone rebuilds the service image's last, small
  # layer over the torch and dependency layers it has; the end of this script drops what no image
  # uses any more.
  bh rm --all >/dev/null 2>&1 || true
  log "image $ref: buildah bud -f $file"
  local started=$SECONDS
  bh bud --layers --isolation chroot --network host -f "$file" -t "$ref" "$@" "$ctx" >"$IEX_CLUSTER_CACHE/images/$name.log" 2>&1 \
    || { tail -n 30 "$IEX_CLUSTER_CACHE/images/$name.log" >&2; die "building $ref failed (log: $IEX_CLUSTER_CACHE/images/$name.log)"; }
  echo "$key" > "$STAMPS/$name"
  log "image $ref: built in $((SECONDS - started)) s"
}

ROOTFS=$IEX_CLUSTER_CACHE/rootfs
[ -f "$ROOTFS/bookworm-python.tar" ] && [ -f "$ROOTFS/bookworm-jre.tar" ] || bash "$(dirname "$0")/build-rootfs.sh"
PY_BASE=localhost/iex/bookworm-python:3.11
JRE_BASE=localhost/iex/bookworm-jre:17
base_image base-python "$ROOTFS/bookworm-python.tar" "$PY_BASE"
base_image base-jre "$ROOTFS/bookworm-jre.tar" "$JRE_BASE"
PY_BASE_ID=$(bh inspect --type image --format '{{.FromImageID}}' "$PY_BASE" 2>/dev/null || bh images -q "$PY_BASE")

# The wheelhouse: every wheel the Python images install, from PyPI (torch's CUDA build: the CPU
# index of the Dockerfile's default is not reachable here).
if [ ! -f "$WHEELHOUSE/.complete" ] || [ "$(cat "$WHEELHOUSE/.complete")" != "$(sha256sum < "$IEX_CLUSTER_ROOT/pyproject.toml" | cut -c1-16)" ]; then
  log "wheelhouse: pip download (PyPI) into $WHEELHOUSE"
  mkdir -p "$WHEELHOUSE"
  "${NICE[@]}" "$IEX_CLUSTER_ROOT/.venv/bin/pip" download -q -d "$WHEELHOUSE" "$IEX_CLUSTER_ROOT[stack]" "setuptools>=68" wheel pip
  sha256sum < "$IEX_CLUSTER_ROOT/pyproject.toml" | cut -c1-16 > "$WHEELHOUSE/.complete"
fi
WHEEL_ARGS=(-v "$WHEELHOUSE:/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels --build-arg PIP_NO_INDEX=1
  --build-arg TORCH_INDEX_URL=https://pypi.org/simple --build-arg "PYTHON_IMAGE=$PY_BASE")

# The project's context: the sources of a commit (IEX_CLUSTER_SOURCE_REF, default HEAD; never a
# half-edited tree) and this tree's docker/. The service image is rebuilt when services/, protos/,
# pyproject.toml or its Dockerfile change, not for any other commit.
SOURCE_REF=${IEX_CLUSTER_SOURCE_REF:-HEAD}
CTX=$IEX_CLUSTER_CACHE/ctx/src
rm -rf "$CTX"; mkdir -p "$CTX"
git -C "$IEX_CLUSTER_ROOT" archive "$SOURCE_REF" pyproject.toml README.md protos services | tar -C "$CTX" -xf -
cp -r "$IEX_CLUSTER_ROOT/docker" "$CTX/docker"
SRC_KEY=$( { git -C "$IEX_CLUSTER_ROOT" rev-parse "$SOURCE_REF:services" "$SOURCE_REF:protos" "$SOURCE_REF:pyproject.toml"; \
  cat "$CTX/docker/service.Dockerfile"; echo "$PY_BASE_ID"; } | hash_of)
TRAINER_KEY=$( { echo "$SRC_KEY"; cat "$CTX/docker/trainer.Dockerfile"; } | hash_of)

if want service; then
  bud service "docker.io/internet-explorer/service:$IMAGE_TAG" "$SRC_KEY" "$CTX" "$CTX/docker/service.Dockerfile" "${WHEEL_ARGS[@]}"
fi
if want trainer; then
  bud trainer "docker.io/internet-explorer/trainer:$IMAGE_TAG" "$TRAINER_KEY" "$CTX" "$CTX/docker/trainer.Dockerfile" "${WHEEL_ARGS[@]}"
fi
if want triton; then
  key=$( { cat "$CTX/docker/triton-python.Dockerfile" "$CTX"/docker/triton/*; echo "$PY_BASE_ID"; } | hash_of)
  bud triton "docker.io/internet-explorer/triton-python:$IMAGE_TAG" "$key" "$CTX" "$CTX/docker/triton-python.Dockerfile" "${WHEEL_ARGS[@]}"
fi
if want kafka; then
  kctx=$IEX_CLUSTER_CACHE/ctx/kafka
  if [ ! -f "$kctx/libs/kafka-tools-$KAFKA_VERSION.jar" ]; then
    log "kafka $KAFKA_VERSION: jars from Maven Central"
    rm -rf "$kctx"; mkdir -p "$kctx"
    "${NICE[@]}" mvn -B -q -f "$IEX_CLUSTER_ROOT/docker/kafka/pom.xml" \
      org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy-dependencies \
      -DoutputDirectory="$kctx/libs.partial" -DincludeScope=runtime
    mv "$kctx/libs.partial" "$kctx/libs"
  fi
  rm -rf "$kctx/docker"; mkdir -p "$kctx/docker"; cp -r "$IEX_CLUSTER_ROOT/docker/kafka" "$kctx/docker/kafka"
  key=$( { cat "$IEX_CLUSTER_ROOT/docker/kafka.Dockerfile"; (cd "$kctx" && find docker libs -type f | sort | xargs sha256sum); echo "$JRE_BASE"; } | hash_of)
  bud kafka "docker.io/internet-explorer/kafka:$KAFKA_VERSION" "$key" "$kctx" "$IEX_CLUSTER_ROOT/docker/kafka.Dockerfile" --build-arg "JRE_IMAGE=$JRE_BASE"
fi
if want minio; then
  [ -x "$MINIO_BIN" ] || (cd "$IEX_CLUSTER_ROOT" && "${NICE[@]}" .venv/bin/python -m services.stack.compat fetch >/dev/null) || die "no MinIO binary at $MINIO_BIN"
  mctx=$IEX_CLUSTER_CACHE/ctx/minio; mkdir -p "$mctx"; cp "$MINIO_BIN" "$mctx/minio"
  minio_version=$(sed -n 's/^MINIO_VERSION = "\(.*\)"$/\1/p' "$IEX_CLUSTER_ROOT/services/stack/compat.py")
  key=$( { cat "$IEX_CLUSTER_ROOT/docker/minio.Dockerfile"; sha256sum < "$mctx/minio"; echo "$PY_BASE"; } | hash_of)
  bud minio "docker.io/internet-explorer/minio:$minio_version" "$key" "$mctx" "$IEX_CLUSTER_ROOT/docker/minio.Dockerfile" --build-arg "BASE_IMAGE=$PY_BASE"
fi
if want prometheus; then
  key=$( { cat "$IEX_CLUSTER_ROOT/k8s/cluster/images/prometheus.Dockerfile"; echo "$PY_BASE_ID"; } | hash_of)
  bud prometheus "localhost/iex-cluster/prometheus:2.42" "$key" "$IEX_CLUSTER_ROOT/k8s/cluster/images" \
    "$IEX_CLUSTER_ROOT/k8s/cluster/images/prometheus.Dockerfile" --build-arg "BASE_IMAGE=$PY_BASE"
fi
for b in "coredns:$COREDNS_BIN/coredns:${COREDNS_VERSION}" "pause:$BIN/pause:3.10"; do
  name=${b%%:*}; rest=${b#*:}; file=${rest%%:*}; tag=${rest#*:}
  want "$name" || continue
  [ -x "$file" ] || die "$file is missing: run k8s/cluster/build-binaries.sh first"
  bctx=$IEX_CLUSTER_CACHE/ctx/$name; mkdir -p "$bctx"; cp "$file" "$bctx/bin"
  key=$( { sha256sum < "$file"; cat "$IEX_CLUSTER_ROOT/k8s/cluster/images/binary.Dockerfile"; } | hash_of)
  bud "$name" "localhost/iex-cluster/$name:$tag" "$key" "$bctx" "$IEX_CLUSTER_ROOT/k8s/cluster/images/binary.Dockerfile"
done
# Images no tag names any more and no other image builds on (a rebuilt image's predecessor, and
# with it the layers only it used); the layer cache of the current images stays.
bh rmi --prune >/dev/null 2>&1 || true
log "images ready"
