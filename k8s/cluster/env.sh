# Shared settings of the k8s/cluster scripts (sourced, not run). Everything built or downloaded
# lives under $IEX_CLUSTER_CACHE; everything the running cluster writes lives under $IEX_CLUSTER_RUN.
set -euo pipefail
IEX_CLUSTER_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
IEX_CLUSTER_CACHE=${IEX_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/iex/cluster}
# State of a running cluster (pids, data, logs): outside the repository, removed by `down`.
IEX_CLUSTER_RUN=${IEX_CLUSTER_RUN:-/var/lib/iex-cluster}

# Versions (Go module proxy); the cache is keyed by them, so a bump rebuilds.
K8S_VERSION=${K8S_VERSION:-v1.34.4}
ETCD_VERSION=${ETCD_VERSION:-v3.6.17}
COREDNS_VERSION=${COREDNS_VERSION:-v1.14.7}
HELM_BIN=${HELM_BIN:-$IEX_CLUSTER_ROOT/.venv/bin/helm}

BIN=$IEX_CLUSTER_CACHE/bin/k8s-$K8S_VERSION
ETCD_BIN=$IEX_CLUSTER_CACHE/bin/etcd-$ETCD_VERSION
COREDNS_BIN=$IEX_CLUSTER_CACHE/bin/coredns-$COREDNS_VERSION
IMAGES=$IEX_CLUSTER_CACHE/images

# Network: one bridge made here; node, pods and services live on it or behind it.
# Pod and service ranges are documentation-free private ranges that nothing else on this machine
# uses; nothing is ever routed off the machine (no default route through the bridge).
BRIDGE=${IEX_CLUSTER_BRIDGE:-iexbr0}
NODE_IP=${IEX_CLUSTER_NODE_IP:-10.244.0.1}
POD_CIDR=${IEX_CLUSTER_POD_CIDR:-10.244.0.0/24}
SERVICE_CIDR=${IEX_CLUSTER_SERVICE_CIDR:-10.96.0.0/16}
KUBERNETES_SVC_IP=10.96.0.1
DNS_IP=10.96.0.10
APISERVER_PORT=${IEX_CLUSTER_APISERVER_PORT:-16443}
NODE_NAME=${IEX_CLUSTER_NODE_NAME:-iex-node}

# Heavy work yields to everything else on the machine.
NICE=(nice -n 19 ionice -c3)

log() { echo "[cluster $(date -u +%H:%M:%S)] $*" >&2; }
die() { echo "cluster: $*" >&2; exit 1; }
