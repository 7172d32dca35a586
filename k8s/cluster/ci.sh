#!/usr/bin/env bash
# What `make cluster-ci` runs after the builds: up, helm install --wait, the cluster suite, and
# the teardown whatever happened (so a failed run leaves nothing behind either). Prints the time
# of each phase.
source "$(dirname "$0")/env.sh"
cd "$IEX_CLUSTER_ROOT"
trap 'bash k8s/cluster/down.sh' EXIT
phase() { local s=$SECONDS rc=0; "${@:2}" || rc=$?; log "$1: $((SECONDS - s)) s (exit $rc)"; return $rc; }
phase "cluster up" bash k8s/cluster/up.sh
phase "helm install --wait" bash k8s/cluster/install.sh
# -rP: what each test printed (helm test, the explorations' final states, Prometheus, the upgrade) in the log.
phase "cluster suite" env IEX_CLUSTER_SUITE=1 .venv/bin/python -m pytest tests/cluster -p no:cacheprovider -rP
