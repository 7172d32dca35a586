#!/usr/bin/env bash
# Imports the images build-images.sh made (buildah's storage) into containerd's k8s.io namespace,
# once per image content: a stamp per image holds the buildah image id last imported.
source "$(dirname "$0")/env.sh"
SOCK=/run/iex-cluster/containerd.sock
STAMPS=$IEX_CLUSTER_CACHE/containerd/imported
mkdir -p "$STAMPS"
bh() { buildah --root "$IEX_CLUSTER_CACHE/containers/storage" --runroot /run/iex-cluster-buildah --storage-driver overlay "$@"; }
ctr_() { ctr --address "$SOCK" -n k8s.io "$@"; }
refs=$(bh images --format '{{.Name}}:{{.Tag}}' | grep -E '^(docker\.io/internet-explorer/|localhost/iex-cluster/)' | sort -u)
[ -n "$refs" ] || die "no images in buildah's storage: run k8s/cluster/build-images.sh (make cluster-images)"
present=$(ctr_ images ls -q)
for ref in $refs; do
  id=$(bh inspect --type image --format '{{.FromImageID}}' "$ref" 2>/dev/null || bh images -q --no-trunc "$ref" | head -n1)
  stamp=$STAMPS/$(echo "$ref" | tr '/:' '__')
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$id" ] && grep -qx "$ref" <<<"$present"; then continue; fi
  if grep -qx "$ref" <<<"$present"; then
    # A changed image replaces its predecessor: every tag of the old content goes first (the trainer
    # and upgrade tags are re-made below), so that containerd drops its blobs and unpacked layers
    # (~14 GB for the service image) before the new ones arrive, instead of holding both on the disk.
    old=$(ctr_ images ls 2>/dev/null | awk -v r="$ref" '$1 == r {print $3}' || true)
    stale=$( [ -n "$old" ] && ctr_ images ls 2>/dev/null | awk -v d="$old" '$3 == d {print $1}' || true)
    if [ -n "$stale" ]; then
      log "removing the previous content of $ref from containerd ($(echo $stale | wc -w) tags)"
      ctr_ images rm --sync $stale >/dev/null 2>&1 || true
    fi
  fi
  log "importing $ref into containerd"
  # Streamed (no archive on disk: the service image alone is ~7 GB).
  "${NICE[@]}" buildah --root "$IEX_CLUSTER_CACHE/containers/storage" --runroot /run/iex-cluster-buildah --storage-driver overlay \
    push -q "$ref" "docker-archive:/dev/stdout:$ref" | "${NICE[@]}" ctr --address "$SOCK" -n k8s.io images import - >/dev/null \
    || die "importing $ref into containerd failed"
  echo "$id" > "$stamp"
done
log "images in containerd: $(ctr_ images ls -q | grep -cE 'internet-explorer|iex-cluster') (internet-explorer/*, iex-cluster/*)"
# No trainer image built (the default here: docker/trainer.Dockerfile installs the very same wheels
# as the service image, and a second ~7 GB image does not fit this machine's disk twice over): the
# service image serves as the trainer's too (IEX_CLUSTER_IMAGES=trainer builds the real one).
svc=$(ctr_ images ls -q | grep -E '^docker\.io/internet-explorer/service:' | grep -v -- '-upgrade$' | sed -n 1p || true)
if [ -n "$svc" ] && ! ctr_ images ls -q | grep -E '^docker\.io/internet-explorer/trainer:' >/dev/null; then
  ctr_ images tag --force "$svc" "docker.io/internet-explorer/trainer:${svc##*:}" >/dev/null
  log "trainer image: the service image, tagged docker.io/internet-explorer/trainer:${svc##*:}"
fi
# The same service and trainer images under a second tag: the cluster suite's `helm upgrade` to a
# new image tag (a real rollout of every service) without building or importing anything again.
UPGRADE_TAG=${IEX_CLUSTER_UPGRADE_TAG:-0.1.0-upgrade}
for repo in docker.io/internet-explorer/service docker.io/internet-explorer/trainer; do
  src=$(ctr_ images ls -q | grep -E "^$repo:" | grep -v -- "-upgrade$" | sed -n 1p || true)
  if [ -n "$src" ]; then ctr_ images tag --force "$src" "$repo:$UPGRADE_TAG" >/dev/null; fi
done
