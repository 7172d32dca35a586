#!/usr/bin/env bash
# Debian bookworm root file systems (debootstrap --variant=minbase), cached as tarballs under
# $IEX_CLUSTER_CACHE/rootfs: the base of every image the cluster runs (no container registry is
# reachable here, so no base image can be pulled).
#   python: python3 (3.11) + venv + libpython (the Triton python-backend stub embeds it)
#   jre:    openjdk-17-jre-headless (Kafka)
source "$(dirname "$0")/env.sh"
SUITE=${IEX_CLUSTER_SUITE:-bookworm}
MIRROR=${IEX_CLUSTER_DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
command -v debootstrap >/dev/null || die "debootstrap is required (apt-get install debootstrap)"

build_rootfs() { # name packages
  local name=$1 include=$2 out=$IEX_CLUSTER_CACHE/rootfs/$SUITE-$1.tar
  [ -f "$out" ] && { log "rootfs $name: cached ($out)"; return; }
  local dir=$IEX_CLUSTER_CACHE/rootfs/$SUITE-$name.partial
  rm -rf "$dir"; mkdir -p "$dir"
  log "rootfs $name: debootstrap --variant=minbase $SUITE (+ $include)"
  "${NICE[@]}" debootstrap --variant=minbase --include="$include" "$SUITE" "$dir" "$MIRROR" >"$dir.log" 2>&1 \
    || { tail -n 20 "$dir.log" >&2; die "debootstrap failed (log: $dir.log)"; }
  # Smaller and reproducible-ish: no apt lists, caches, docs or man pages.
  rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb \
    "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/locale/* "$dir"/var/log/*
  tar -C "$dir" --numeric-owner -cf "$out.partial" .
  mv "$out.partial" "$out"; rm -rf "$dir" "$dir.log"
}

mkdir -p "$IEX_CLUSTER_CACHE/rootfs"
build_rootfs python python3,python3-venv,libpython3.11,ca-certificates,tini
build_rootfs jre openjdk-17-jre-headless,ca-certificates,tini
