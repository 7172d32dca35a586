#!/usr/bin/env bash
# Stops the cluster up.sh started and undoes what it changed on this machine: every container and
# pod sandbox, the processes of $IEX_CLUSTER_RUN/pids (by PID), mounts under the cluster's
# directories, pod network namespaces, iptables chains (KUBE-*, CNI-*, IEX-CLUSTER-*), the bridge,
# ip_forward. Removes $IEX_CLUSTER_RUN. The build caches ($IEX_CLUSTER_CACHE) stay.
source "$(dirname "$0")/env.sh"
# Best effort to the end: one step that finds nothing to undo must not stop the others.
set +e +o pipefail
RUN=$IEX_CLUSTER_RUN
SOCK=/run/iex-cluster/containerd.sock
[ -d "$RUN" ] || [ -d /run/iex-cluster ] || ip link show "$BRIDGE" >/dev/null 2>&1 || { log "no cluster to stop"; exit 0; }

stop_pid() { # name [signal]: the recorded process, TERM then KILL after 20 s
  local f=$RUN/pids/$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "-${2:-TERM}" "$pid" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    log "$1: stopped (pid $pid)"
  fi
  rm -f "$f"
}

# 1. The node first (no new pods), then every container, then the control plane.
stop_pid kubelet
stop_pid kube-proxy
if [ -S "$SOCK" ]; then
  ctr_() { ctr --address "$SOCK" -n k8s.io "$@"; }
  for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true; done
  sleep 2
  for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$t" >/dev/null 2>&1 || true; done
  for c in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$c" >/dev/null 2>&1 || true; done
fi
for p in kube-scheduler kube-controller-manager kube-apiserver etcd containerd; do stop_pid "$p"; done
# containerd-shim processes are children of init once containerd is gone: those of our state dir.
for pid in $(pgrep -f 'containerd-shim-runc-v2 .*-address /run/iex-cluster/containerd.sock' || true); do
  kill -KILL "$pid" 2>/dev/null || true
done

# 2. Mounts under the cluster's directories (deepest first), pod network namespaces.
for root in "$RUN" /run/iex-cluster "$IEX_CLUSTER_CACHE/containerd"; do
  awk -v r="$root" '$5 == r || index($5, r "/") == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
done
before=" $(cat "$RUN/changes/netns_before" 2>/dev/null) "
for ns in $(ls /run/netns 2>/dev/null); do
  case "$ns" in cni-*) [[ "$before" == *" $ns "* ]] || { umount -l "/run/netns/$ns" 2>/dev/null || true; rm -f "/run/netns/$ns"; } ;; esac
done

# 3. iptables: the chains of kube-proxy, the CNI plugins and this script, and the rules that jump to them.
for table in filter nat mangle raw; do
  iptables -t "$table" -S 2>/dev/null | grep -E -- '-j (KUBE-|CNI-|IEX-CLUSTER-)' | sed 's/^-A/-D/' | while read -r rule; do
    eval iptables -t "$table" "$rule" 2>/dev/null || true
  done
  chains=$(iptables -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^(KUBE-|CNI-|IEX-CLUSTER-)/ {print $2}')
  for c in $chains; do iptables -t "$table" -F "$c" 2>/dev/null || true; done
  for c in $chains; do iptables -t "$table" -X "$c" 2>/dev/null || true; done
done
# kube-proxy also writes ip6tables chains and nftables tables named kube-proxy (nft mode only).
for table in filter nat mangle; do
  ip6tables -t "$table" -S 2>/dev/null | grep -E -- '-j KUBE-' | sed 's/^-A/-D/' | while read -r rule; do eval ip6tables -t "$table" "$rule" 2>/dev/null || true; done
  for c in $(ip6tables -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ {print $2}'); do ip6tables -t "$table" -F "$c"; ip6tables -t "$table" -X "$c" 2>/dev/null || true; done
done

# 4. The bridge, the veths left on it, sysctls.
if [ -f "$RUN/changes/bridge" ] && ip link show "$BRIDGE" >/dev/null 2>&1; then
  for v in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do ip link del "$v" 2>/dev/null || true; done
  ip link del "$BRIDGE"
  log "bridge $BRIDGE: removed"
fi
[ -f "$RUN/changes/ip_forward" ] && cat "$RUN/changes/ip_forward" > /proc/sys/net/ipv4/ip_forward
bnf=$(cat "$RUN/changes/bridge_nf" 2>/dev/null || echo none)
[ "$bnf" != none ] && [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ] && echo "$bnf" > /proc/sys/net/bridge/bridge-nf-call-iptables

# 5. What is left: the state directories (not the caches), and a report of any difference.
if [ -f "$RUN/changes/iptables_before" ]; then
  diff <(grep -vE '^(#|:|\*|COMMIT)' "$RUN/changes/iptables_before") <(iptables-save 2>/dev/null | grep -vE '^(#|:|\*|COMMIT)') >/dev/null \
    || log "note: iptables differs from before up (iptables-save and $RUN/changes/iptables_before)"
fi
[ "$(cat "$RUN/changes/containerd_s" 2>/dev/null)" = new ] && rm -rf /run/containerd
rm -rf "$RUN" /run/iex-cluster /run/iex-cluster-buildah
log "cluster down: processes stopped, mounts, netns, iptables chains, bridge and sysctls restored"
