#!/usr/bin/env bash
# Refresh the vendored KubeRay CRDs (k8s/crds/kuberay/) from ray-project/kuberay at REF.
# Usage: bash k8s/crds/refresh.sh REF     (a tag such as v1.6.0, a branch, or a commit)
set -euo pipefail
ref=${1:?usage: bash k8s/crds/refresh.sh REF (tag, branch or commit of ray-project/kuberay)}
dir=$(cd "$(dirname "$0")/kuberay" && pwd)
base="https://raw.githubusercontent.com/ray-project/kuberay/${ref}/ray-operator/config/crd/bases"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for f in ray.io_rayclusters.yaml ray.io_rayjobs.yaml; do
  curl -fsSL "$base/$f" -o "$tmp/$f"
  grep -q '^kind: CustomResourceDefinition' "$tmp/$f" || { echo "error: $base/$f is not a CRD" >&2; exit 1; }
done
mv "$tmp"/ray.io_*.yaml "$dir/"
sed -i "s|copied unchanged from .*|copied unchanged from ref \`${ref}\` on $(date -u +%Y-%m-%d)|" "$dir/SOURCE.md"
echo "refreshed $dir from ray-project/kuberay@${ref}; now run: pytest tests/unit/test_k8s_manifests.py"
