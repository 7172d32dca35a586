#!/usr/bin/env bash
# Starts a single-node Kubernetes cluster on this machine: containerd, etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, kube-proxy (processes of this script, their
# PIDs in $IEX_CLUSTER_RUN/pids), then CoreDNS, local PersistentVolumes and (optionally) the
# in-cluster Prometheus as Kubernetes objects. Idempotent: a running cluster is left as it is.
#
# Network: one bridge ($BRIDGE, $NODE_IP) made here; pods get addresses on it (bridge CNI,
# host-local IPAM), services are kube-proxy iptables rules. A chain of this script drops anything
# from the bridge that would leave through another interface: no pod packet leaves the machine.
# Everything changed is recorded in $IEX_CLUSTER_RUN/changes and undone by down.sh.
source "$(dirname "$0")/env.sh"
[ "$(id -u)" = 0 ] || die "must run as root (containerd, mounts, iptables, the bridge)"
for b in containerd containerd-shim-runc-v2 runc iptables ip openssl; do
  command -v "$b" >/dev/null || die "$b is missing: apt-get install containerd runc containernetworking-plugins iptables iproute2 openssl"
done
[ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] || die "CNI plugins missing: apt-get install containernetworking-plugins"
[ -f "$BIN/.complete" ] && [ -f "$ETCD_BIN/.complete" ] || die "binaries missing: run k8s/cluster/build-binaries.sh (make cluster-build)"

RUN=$IEX_CLUSTER_RUN
SOCK=/run/iex-cluster/containerd.sock
PKI=$RUN/pki
KUBECONFIG_ADMIN=$RUN/admin.kubeconfig
CONTAINERD_ROOT=$IEX_CLUSTER_CACHE/containerd/root  # image content persists between clusters (a cache)
mkdir -p "$RUN"/{pids,logs,changes,etcd,kubelet,volumes,cni/net.d,config} /run/iex-cluster
LOGS=$RUN/logs

running() { local f=$RUN/pids/$1; [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; }
start() { # name cmd...: a detached process, niced, its PID recorded
  local name=$1; shift
  if running "$name"; then log "$name: running (pid $(cat "$RUN/pids/$name"))"; return; fi
  setsid "${NICE[@]}" "$@" >>"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$RUN/pids/$name"
  log "$name: started (pid $!, log $LOGS/$name.log)"
}
wait_for() { # what seconds cmd...
  local what=$1 secs=$2; shift 2
  for _ in $(seq "$secs"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  die "$what not ready after ${secs}s (logs: $LOGS)"
}
KUBECTL=("$BIN/kubectl" --kubeconfig "$KUBECONFIG_ADMIN")
# A running component that watches its file (kube-proxy exits when it changes) keeps it as it is.
put() { local f=$1 tmp; tmp=$(mktemp); cat > "$tmp"; if cmp -s "$tmp" "$f"; then rm -f "$tmp"; else mv "$tmp" "$f"; chmod 0644 "$f"; fi; }

# ---- host changes (each recorded once, undone by down.sh) ----------------------------------
record() { [ -f "$RUN/changes/$1" ] || printf '%s\n' "$2" > "$RUN/changes/$1"; }
record ip_forward "$(cat /proc/sys/net/ipv4/ip_forward)"
record bridge_nf "$(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null || echo none)"
record netns_before "$(ls /run/netns 2>/dev/null | tr '\n' ' ')"
record containerd_s "$([ -e /run/containerd ] && echo existed || echo new)"
[ -f "$RUN/changes/iptables_before" ] || { iptables-save > "$RUN/changes/iptables_before" 2>/dev/null || true; }

if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
  ip link add "$BRIDGE" type bridge
  ip addr add "$NODE_IP/${POD_CIDR#*/}" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  echo yes > "$RUN/changes/bridge"
  log "bridge $BRIDGE: $NODE_IP/${POD_CIDR#*/}"
fi
echo 1 > /proc/sys/net/ipv4/ip_forward
[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ] && echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables
# Pod traffic stays on the bridge or comes to this host: whatever would be forwarded out through
# another interface is dropped (and the crawler's "internet" is the in-cluster search service).
if ! iptables -L IEX-CLUSTER-EGRESS >/dev/null 2>&1; then
  iptables -N IEX-CLUSTER-EGRESS
  iptables -A IEX-CLUSTER-EGRESS -i "$BRIDGE" -o "$BRIDGE" -j RETURN
  iptables -A IEX-CLUSTER-EGRESS -i "$BRIDGE" -j DROP
  iptables -A IEX-CLUSTER-EGRESS -s "$POD_CIDR" ! -d "$POD_CIDR" ! -o "$BRIDGE" -j DROP
  iptables -I FORWARD 1 -j IEX-CLUSTER-EGRESS
fi

# ---- PKI and kubeconfigs -------------------------------------------------------------------
if [ ! -f "$PKI/ca.crt" ]; then
  mkdir -p "$PKI"; (
  cd "$PKI"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 -subj "/CN=iex-cluster-ca" 2>/dev/null
  openssl genrsa -out sa.key 2048 2>/dev/null; openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  cert() { # name subject [san]
    openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
    local ext="basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=${4:-clientAuth}"
    [ -n "${3:-}" ] && ext+="
subjectAltName=$3"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days 30 -extfile <(echo "$ext") 2>/dev/null
    rm -f "$1.csr"
  }
  cert apiserver "/CN=kube-apiserver" "IP:$NODE_IP,IP:$KUBERNETES_SVC_IP,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost" serverAuth
  cert kubelet-serving "/CN=$NODE_NAME" "IP:$NODE_IP,DNS:$NODE_NAME" serverAuth
  cert admin "/O=system:masters/CN=iex-cluster-admin"
  cert controller-manager "/CN=system:kube-controller-manager"
  cert scheduler "/CN=system:kube-scheduler"
  cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME"
  cert kube-proxy "/CN=system:kube-proxy"
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  )
  chmod 0600 "$PKI"/*.key
fi
kubeconfig() { # name cert
  put "$RUN/$1.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: iex
  cluster: {certificate-authority: $PKI/ca.crt, server: "https://$NODE_IP:$APISERVER_PORT"}
users:
- name: $1
  user: {client-certificate: $PKI/$2.crt, client-key: $PKI/$2.key}
contexts:
- name: iex
  context: {cluster: iex, user: $1}
current-context: iex
KC
}
for k in admin:admin controller-manager:controller-manager scheduler:scheduler kubelet:kubelet kube-proxy:kube-proxy; do
  kubeconfig "${k%%:*}" "${k#*:}"
done

# ---- containerd ----------------------------------------------------------------------------
put "$RUN/cni/net.d/10-iex.conflist" <<CNI
{
  "cniVersion": "0.4.0",
  "name": "iex",
  "plugins": [
    {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]],
              "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$RUN/cni/ipam"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
CNI
mkdir -p "$CONTAINERD_ROOT"
put "$RUN/config/containerd.toml" <<TOML
version = 2
root = "$CONTAINERD_ROOT"
state = "/run/iex-cluster/containerd"
[grpc]
  address = "$SOCK"
[ttrpc]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$IEX_CLUSTER_CACHE/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/iex-cluster/pause:3.10"
  # No CAP_SYS_RESOURCE here: runc cannot lower /proc/self/oom_score_adj below the parent's.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "/run/iex-cluster/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$RUN/cni/net.d"
TOML
start containerd containerd --config "$RUN/config/containerd.toml"
wait_for containerd 30 ctr --address "$SOCK" version

# Images: imported from buildah's storage once per content (containerd's root is a cache).
bash "$(dirname "$0")/import-images.sh"

# ---- control plane -------------------------------------------------------------------------
start etcd "$ETCD_BIN/etcd" --name iex --data-dir "$RUN/etcd" \
  --listen-client-urls http://127.0.0.1:12379 --advertise-client-urls http://127.0.0.1:12379 \
  --listen-peer-urls http://127.0.0.1:12380 --initial-advertise-peer-urls http://127.0.0.1:12380 \
  --initial-cluster iex=http://127.0.0.1:12380 --listen-metrics-urls http://127.0.0.1:12381 \
  --quota-backend-bytes 2147483648 --log-level warn
wait_for etcd 30 curl -sf http://127.0.0.1:12379/health

start kube-apiserver "$BIN/kube-apiserver" \
  --advertise-address="$NODE_IP" --bind-address="$NODE_IP" --secure-port="$APISERVER_PORT" \
  --etcd-servers=http://127.0.0.1:12379 --service-cluster-ip-range="$SERVICE_CIDR" \
  --client-ca-file="$PKI/ca.crt" --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
  --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
  --kubelet-certificate-authority="$PKI/ca.crt" --kubelet-preferred-address-types=InternalIP \
  --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --authorization-mode=Node,RBAC --allow-privileged=true --profiling=false \
  --enable-admission-plugins=NodeRestriction --endpoint-reconciler-type=lease
wait_for kube-apiserver 90 "${KUBECTL[@]}" get --raw /readyz

start kube-controller-manager "$BIN/kube-controller-manager" \
  --kubeconfig="$RUN/controller-manager.kubeconfig" --authentication-kubeconfig="$RUN/controller-manager.kubeconfig" \
  --authorization-kubeconfig="$RUN/controller-manager.kubeconfig" --bind-address=127.0.0.1 \
  --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" --root-ca-file="$PKI/ca.crt" \
  --service-account-private-key-file="$PKI/sa.key" --use-service-account-credentials=true \
  --service-cluster-ip-range="$SERVICE_CIDR" --leader-elect=false --profiling=false
start kube-scheduler "$BIN/kube-scheduler" --kubeconfig="$RUN/scheduler.kubeconfig" \
  --authentication-kubeconfig="$RUN/scheduler.kubeconfig" --authorization-kubeconfig="$RUN/scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --leader-elect=false --profiling=false

# ---- node ----------------------------------------------------------------------------------
put "$RUN/config/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
cgroupDriver: cgroupfs
failCgroupV1: false
containerRuntimeEndpoint: unix://$SOCK
clusterDNS: [$DNS_IP]
clusterDomain: cluster.local
# Pods get the cluster DNS only; nothing of the host's resolver configuration.
resolvConf: ""
failSwapOn: false
maxPods: 110
serializeImagePulls: false
# No image garbage collection: every image is imported from local storage and cannot be pulled
# again (a full shared disk once made the kubelet delete the pause image).
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# Absolute floors: the machine's disk is shared, and a percentage of a large disk would evict pods
# while gigabytes are free.
evictionHard: {memory.available: 200Mi, nodefs.available: 2Gi, imagefs.available: 2Gi}
evictionPressureTransitionPeriod: 30s
podPidsLimit: 4096
YAML
start kubelet "$BIN/kubelet" --config="$RUN/config/kubelet.yaml" --kubeconfig="$RUN/kubelet.kubeconfig" \
  --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --root-dir="$RUN/kubelet" --cert-dir="$RUN/kubelet/pki"
put "$RUN/config/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $RUN/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: [$NODE_IP/32]
iptables: {localhostNodePorts: false, masqueradeAll: false}
# Leave the host's conntrack sysctls as they are.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
start kube-proxy "$BIN/kube-proxy" --config="$RUN/config/kube-proxy.yaml"
node_ready() { [ "$("${KUBECTL[@]}" get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]; }
wait_for "node $NODE_NAME" 120 node_ready

# ---- cluster add-ons: CoreDNS, local volumes, Prometheus -----------------------------------
MANIFESTS=$(dirname "$0")/manifests
sed -e "s|@DNS_IP@|$DNS_IP|g" -e "s|@COREDNS_VERSION@|$COREDNS_VERSION|g" "$MANIFESTS/coredns.yaml" | "${KUBECTL[@]}" apply -f - >/dev/null
# hostPath PersistentVolumes (no class): what the chart's claims bind to. Owned by the chart's uid.
for i in $(seq 1 ${IEX_CLUSTER_VOLUMES:-8}); do
  mkdir -p "$RUN/volumes/pv$i"; chmod 0777 "$RUN/volumes/pv$i"
  cat <<PV
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: iex-local-pv$i, labels: {iex-cluster/volume: local}}
spec:
  capacity: {storage: 50Gi}
  accessModes: [ReadWriteOnce, ReadWriteMany]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  hostPath: {path: $RUN/volumes/pv$i, type: Directory}
PV
done | "${KUBECTL[@]}" apply -f - >/dev/null
"${KUBECTL[@]}" -n kube-system rollout status deploy/coredns --timeout=180s >/dev/null || die "CoreDNS did not become ready"
log "cluster up: node $NODE_NAME Ready; kubeconfig $KUBECONFIG_ADMIN"
