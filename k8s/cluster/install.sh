#!/usr/bin/env bash
# helm install --wait of the chart's default profile on the local cluster, with the images built
# here (k8s/cluster/values-local.yaml), then the in-cluster Prometheus of the cluster suite.
# Extra helm arguments pass through: install.sh --set image.tag=0.1.0-b (an upgrade).
source "$(dirname "$0")/env.sh"
RUN=$IEX_CLUSTER_RUN
NAMESPACE=${IEX_CLUSTER_NAMESPACE:-internet-explorer}
RELEASE=${IEX_CLUSTER_RELEASE:-iex}
export KUBECONFIG=$RUN/admin.kubeconfig
[ -f "$KUBECONFIG" ] || die "no cluster: run k8s/cluster/up.sh (make cluster-up)"
[ -x "$HELM_BIN" ] || die "helm not found at $HELM_BIN: make tools"
KUBECTL=("$BIN/kubectl" --request-timeout=60s)
# Retried: on this shared machine the cluster's processes (nice 19) may be paused for a while.
retry() { local i; for i in 1 2 3 4 5 6; do "$@" && return 0; log "retrying in 10 s: ${*:0:3}..."; sleep 10; done; return 1; }
apply_prometheus() { sed -e "s|@NAMESPACE@|$NAMESPACE|g" -e "s|@FULLNAME@|$RELEASE-internet-explorer|g" "$(dirname "$0")/manifests/prometheus.yaml" | "${KUBECTL[@]}" apply -f - >/dev/null; }
retry "${KUBECTL[@]}" apply -f "$IEX_CLUSTER_ROOT/k8s/namespace.yaml" >/dev/null
retry apply_prometheus
started=$SECONDS
"$HELM_BIN" upgrade --install "$RELEASE" "$IEX_CLUSTER_ROOT/helm/internet-explorer" --namespace "$NAMESPACE" \
  -f "$(dirname "$0")/values-local.yaml" --wait --timeout "${IEX_CLUSTER_HELM_TIMEOUT:-20m}" "$@"
log "helm upgrade --install $RELEASE: $((SECONDS - started)) s"
"${KUBECTL[@]}" -n iex-monitoring rollout status deploy/prometheus --timeout=120s >/dev/null
"${KUBECTL[@]}" -n "$NAMESPACE" get pods -o wide
