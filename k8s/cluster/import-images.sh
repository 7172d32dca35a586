#!/usr/bin/env bash
# Imports the images build-images.sh made (buildah's storage) into containerd's k8s.io namespace,
# once per image content: a stamp per image holds the buildah image id last imported.
source "$(dirname "$0")/env.sh"
SOCK=/run/iex-cluster/containerd.sock
STAMPS=$IEX_CLUSTER_CACHE/containerd/imported
mkdir -p "$STAMPS"
bh() { buildah --root "$IEX_CLUSTER_CACHE/containers/storage" --runroot /run/iex-cluster-buildah --storage-driver overlay "$@"; }
ctr_() { ctr --address "$SOCK" -n k8s.io "$@"; }
# Bytes of an image's layers that containerd's content store does not hold yet (buildah's manifest
# lists the uncompressed layers, which is what a docker-archive import stores).
missing_bytes() {
  bh inspect --type image --format '{{.Manifest}}' "$1" | python3 -c '
import json, sys
have = set(sys.argv[1].split())
print(sum(l["size"] for l in json.load(sys.stdin)["layers"] if l["digest"] not in have))' "$(ctr_ content ls -q 2>/dev/null)"
}
# Every name containerd gives the image content with this digest.
names_of() { [ -n "$1" ] && ctr_ images ls 2>/dev/null | awk -v d="$1" '$3 == d {print $1}' || true; }
refs=$(bh images --format '{{.Name}}:{{.Tag}}' | grep -E '^(docker\.io/internet-explorer/|localhost/iex-cluster/)' | sort -u)
[ -n "$refs" ] || die "no images in buildah's storage: run k8s/cluster/build-images.sh (make cluster-images)"
present=$(ctr_ images ls -q)
for ref in $refs; do
  id=$(bh inspect --type image --format '{{.FromImageID}}' "$ref" 2>/dev/null || bh images -q --no-trunc "$ref" | head -n1)
  stamp=$STAMPS/$(echo "$ref" | tr '/:' '__')
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$id" ] && grep -qx "$ref" <<<"$present"; then continue; fi
  # A changed image replaces its predecessor. Layers both share (the service image's torch and
  # dependency layers, ~7 GB, when only the sources changed) stay in containerd and are not written
  # again; so the new image comes first and the old content goes after it, unless the layers to write
  # are large: then every tag of the old content goes first, so that containerd drops its blobs and
  # unpacked layers (~14 GB for the service image) before the new ones arrive, instead of holding both.
  old=$(ctr_ images ls 2>/dev/null | awk -v r="$ref" '$1 == r {print $3}' || true)
  to_write=$(missing_bytes "$ref")
  if [ -n "$old" ] && [ "$to_write" -gt $((1024 * 1024 * 1024)) ]; then
    stale=$(names_of "$old")
    log "removing the previous content of $ref from containerd first ($((to_write >> 20)) MB of new layers)"
    ctr_ images rm --sync $stale >/dev/null 2>&1 || true
    old=""
  fi
  # The old content keeps a name while the new one is imported, so that removing that name
  # afterwards (--sync) is what collects its blobs, not some later garbage collection.
  [ -z "$old" ] || ctr_ images tag --force "$ref" "$ref-previous" >/dev/null
  log "importing $ref into containerd ($((to_write >> 20)) MB of layers not there yet)"
  # Streamed (no archive on disk: the service image alone is ~7 GB).
  "${NICE[@]}" buildah --root "$IEX_CLUSTER_CACHE/containers/storage" --runroot /run/iex-cluster-buildah --storage-driver overlay \
    push -q "$ref" "docker-archive:/dev/stdout:$ref" | "${NICE[@]}" ctr --address "$SOCK" -n k8s.io images import - >/dev/null \
    || die "importing $ref into containerd failed"
  if [ -n "$old" ]; then
    # Every name of the old content ($ref-previous, the trainer and upgrade tags, re-made below);
    # --sync: its blobs that no image names any more are gone when this returns.
    stale=$(names_of "$old" | grep -vx "$ref" || true)
    [ -z "$stale" ] || ctr_ images rm --sync $stale >/dev/null 2>&1 || true
  fi
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
